/*! \file
 *  \brief The CUDA backend's GEMMs: the Linear layer's forward and backward on row-major
 *         activations through cuBLAS (cublasGemmEx), fp32 or bf16 inputs, fp32 accumulation.
 *
 *  Why cuBLAS: the projections of a Mamba block are plain dense GEMMs (in_proj, x_proj,
 *  dt_proj, out_proj, the head) whose best kernels on Hopper are NVIDIA's (WGMMA, TMA,
 *  per-shape heuristics); writing our own would cost months to match. cublasGemmEx routes
 *  through cuBLASLt's heuristics and tensor cores; bf16 inputs with CUBLAS_COMPUTE_32F keep the
 *  accumulation in fp32 (the mixed-precision contract: bf16 compute, fp32 accumulators).
 *
 *  Layout (row-major, PyTorch nn.Linear): y(M, N) = x(M, K) W(N, K)^T [+ bias]. cuBLAS is
 *  column-major, so a row-major (R, C) matrix with leading dimension ld is its column-major
 *  transpose (C, R) with the same ld, and
 *      y^T = W^T(as col-major K x N, transposed) * x^T          -> gemm(T, N, N, M, K)
 *      dx^T = W(as col-major K x N) * dy^T                       -> gemm(N, N, K, M, N)
 *      dW^T += x^T * dy                                          -> gemm(N, T, K, N, M), beta = 1
 *  Types: TI (inputs x, W, dy) float or __nv_bfloat16; outputs float or TI. The handle's
 *  stream is set per call; the handle is owned by a Blas object (one per stream user).
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/core/error.hpp"

namespace mambabyte::backend::cuda {

namespace detail {
[[noreturn]] inline void throw_cublas_error(cublasStatus_t s, char const* expr, char const* file, int line) {
  fail(file, ":", line, ": cuBLAS error ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ") from ",
       expr);
}
template <class T>
constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  else static_assert(std::is_same_v<T, float>, "GEMM types are float or __nv_bfloat16");
}
}  // namespace detail

#define MAMBABYTE_CUBLAS_CHECK(expr)                                                          \
  do {                                                                                        \
    cublasStatus_t const mambabyte_cublas_status_ = (expr);                                   \
    if (mambabyte_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                    \
      ::mambabyte::backend::cuda::detail::throw_cublas_error(mambabyte_cublas_status_, #expr, \
                                                             __FILE__, __LINE__);             \
  } while (0)

/// An owned cuBLAS handle with a fixed workspace (so that GEMMs can be captured in CUDA graphs:
/// cuBLAS must not allocate during capture) on one device.
class Blas {
 public:
  Blas() = default;
  explicit Blas(Cuda const& be, std::size_t workspace_bytes = std::size_t(32) << 20) : device_(be.device) {
    ScopedDevice guard(be.device);
    MAMBABYTE_CUBLAS_CHECK(cublasCreate(&handle_));
    workspace_ = DeviceBuffer<std::uint8_t>(workspace_bytes);
    MAMBABYTE_CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace_.data(), workspace_.size_bytes()));
    // fp32 GEMMs stay fp32 (no TF32): the fp32 path is the accuracy reference of the backend
    MAMBABYTE_CUBLAS_CHECK(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
  }
  ~Blas() {
    if (handle_) (void)cublasDestroy(handle_);
  }
  Blas(Blas&& o) noexcept
      : handle_(std::exchange(o.handle_, nullptr)), workspace_(std::move(o.workspace_)), device_(o.device_) {}
  Blas& operator=(Blas&& o) noexcept {
    if (this != &o) {
      if (handle_) (void)cublasDestroy(handle_);
      handle_ = std::exchange(o.handle_, nullptr);
      workspace_ = std::move(o.workspace_);
      device_ = o.device_;
    }
    return *this;
  }
  Blas(Blas const&) = delete;
  Blas& operator=(Blas const&) = delete;

  cublasHandle_t handle(Cuda const& be) const {
    require(handle_ != nullptr, "Blas: used before construction");
    require(be.device == device_, "Blas: handle of device ", device_, " used on device ", be.device);
    MAMBABYTE_CUBLAS_CHECK(cublasSetStream(handle_, be.stream));
    return handle_;
  }

 private:
  cublasHandle_t handle_ = nullptr;
  DeviceBuffer<std::uint8_t> workspace_;
  int device_ = 0;
};

/// Column-major C(m, n) = alpha op(A) op(B) + beta C, fp32 accumulation.
template <class TA, class TB, class TC>
void gemm_cm(Blas const& blas, Cuda const& be, bool ta, bool tb, int m, int n, int k, TA const* A,
             std::int64_t lda, TB const* B, std::int64_t ldb, TC* C, std::int64_t ldc, float alpha, float beta) {
  if (m == 0 || n == 0) return;
  static_assert(std::is_same_v<TA, TB>, "both GEMM inputs have one type");
  ScopedDevice guard(be.device);
  MAMBABYTE_CUBLAS_CHECK(cublasGemmEx(blas.handle(be), ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      m, n, k, &alpha, A, detail::cuda_type<TA>(), static_cast<int>(lda), B,
                                      detail::cuda_type<TB>(), static_cast<int>(ldb), &beta, C,
                                      detail::cuda_type<TC>(), static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
}

/// y(M, N) = x(M, K) W(N, K)^T (+ y when accumulate). Row-major, leading dimensions in elements.
template <class TI, class TO>
void linear_forward(Blas const& blas, Cuda const& be, int M, int N, int K, TI const* x, std::int64_t ld_x,
                    TI const* W, TO* y, std::int64_t ld_y, bool accumulate = false) {
  gemm_cm(blas, be, true, false, N, M, K, W, K, x, ld_x, y, ld_y, 1.f, accumulate ? 1.f : 0.f);
}

/// dx(M, K) = dy(M, N) W(N, K) (+ dx when accumulate).
template <class TI, class TO>
void linear_backward_data(Blas const& blas, Cuda const& be, int M, int N, int K, TI const* dy, std::int64_t ld_dy,
                          TI const* W, TO* dx, std::int64_t ld_dx, bool accumulate = false) {
  gemm_cm(blas, be, false, false, K, M, N, W, K, dy, ld_dy, dx, ld_dx, 1.f, accumulate ? 1.f : 0.f);
}

/// dW(N, K) += dy(M, N)^T x(M, K)   (fp32 gradient accumulator).
template <class TI>
void linear_backward_weight(Blas const& blas, Cuda const& be, int M, int N, int K, TI const* dy, std::int64_t ld_dy,
                            TI const* x, std::int64_t ld_x, float* dW) {
  gemm_cm(blas, be, false, true, K, N, M, x, ld_x, dy, ld_dy, dW, K, 1.f, 1.f);
}

/// dbias(N) += sum over the M rows of dy(M, N), as the GEMV dy^T * ones (ones: M elements of TI).
template <class TI>
void linear_backward_bias(Blas const& blas, Cuda const& be, int M, int N, TI const* dy, std::int64_t ld_dy,
                          TI const* ones, float* dbias) {
  gemm_cm(blas, be, false, false, N, 1, M, dy, ld_dy, ones, M, dbias, N, 1.f, 1.f);
}

}  // namespace mambabyte::backend::cuda
