/*! \file
 *  \brief The CUDA backend's foundation: the backend::Cuda tag (stream + device), error
 *         checking, an owning device buffer, the kernel-declaration macro, and device_fill, the
 *         smallest real kernel (it proves the host/device seam and the build).
 *
 *  Layout of the backend: one .cuh per operator under backend/cuda/, each with its kernels
 *  (namespace backend::cuda::kernel, declared MAMBABYTE_KERNEL) and a host launcher that takes
 *  `Cuda const&`, selects the device with ScopedDevice, launches on `be.stream` and checks the
 *  launch with MAMBABYTE_CUDA_CHECK(cudaGetLastError()). device_fill below is the template.
 *  Reached only through <mambabyte/cuda.hpp>.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <sstream>
#include <type_traits>
#include <utility>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"

/// Declares a kernel. Hidden visibility keeps each shared object's kernels its own: with default
/// visibility, two .so files built from these headers would share one kernel symbol and a launch
/// from the other library can silently do nothing (NVIDIA/cccl#166).
#define MAMBABYTE_KERNEL __global__ __attribute__((visibility("hidden")))

/// Evaluates a CUDA runtime call; on failure throws mambabyte::Error naming the file, line,
/// the call and CUDA's own description of the error.
#define MAMBABYTE_CUDA_CHECK(expr)                                                           \
  do {                                                                                       \
    cudaError_t const mambabyte_cuda_status_ = (expr);                                       \
    if (mambabyte_cuda_status_ != cudaSuccess)                                               \
      ::mambabyte::backend::cuda::detail::throw_cuda_error(mambabyte_cuda_status_, #expr,   \
                                                           __FILE__, __LINE__);              \
  } while (0)

namespace mambabyte::backend {

/// CUDA backend: where work runs. `stream` nullptr is the device's legacy default stream.
/// Completes the declaration in policy/policy.hpp.
struct Cuda {
  cudaStream_t stream = nullptr;
  int device = 0;
};

namespace cuda {

namespace detail {
[[noreturn]] inline void throw_cuda_error(cudaError_t status, char const* expr, char const* file,
                                          int line) {
  fail(file, ":", line, ": CUDA error ", cudaGetErrorName(status), " (",
       cudaGetErrorString(status), ") from ", expr);
}
}  // namespace detail

/// Makes `device` current for the guard's lifetime and restores the previous one afterwards
/// (only touches the runtime when they differ).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    MAMBABYTE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) MAMBABYTE_CUDA_CHECK(cudaSetDevice(device));
    current_ = device;
  }
  ~ScopedDevice() {
    if (current_ != previous_) (void)cudaSetDevice(previous_);  // never throw from a destructor
  }
  ScopedDevice(ScopedDevice const&) = delete;
  ScopedDevice& operator=(ScopedDevice const&) = delete;

 private:
  int previous_ = 0;
  int current_ = 0;
};

/// What DeviceBuffer throws when cudaMalloc fails: a mambabyte::Error whose message names the
/// size, the device and its free memory (callers may catch it to add what the memory was for).
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

/// Owning, move-only array of `size()` elements of T in device memory (cudaMalloc/cudaFree).
/// The contents start uninitialised. Host copies are ordered on the given stream and complete
/// before they return (the host pointer may be pageable memory).
template <class T>
class DeviceBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "DeviceBuffer holds trivially copyable types");

 public:
  DeviceBuffer() = default;
  /// Allocates on the current device.
  explicit DeviceBuffer(std::size_t n) { allocate(n); }
  /// Allocates on `be.device`.
  DeviceBuffer(std::size_t n, Cuda const& be) {
    ScopedDevice guard(be.device);
    allocate(n);
  }
  ~DeviceBuffer() { release(); }

  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;

  [[nodiscard]] T* data() noexcept { return data_; }
  [[nodiscard]] T const* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }

  /// Copies `n` elements from host memory `src` into the start of the buffer.
  void copy_from_host(T const* src, std::size_t n, cudaStream_t stream = nullptr) {
    check_count(n, "copy_from_host");
    if (n == 0) return;
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(data_, src, n * sizeof(T), cudaMemcpyHostToDevice, stream));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  /// Copies the first `n` elements of the buffer into host memory `dst`.
  void copy_to_host(T* dst, std::size_t n, cudaStream_t stream = nullptr) const {
    check_count(n, "copy_to_host");
    if (n == 0) return;
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(dst, data_, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

 private:
  void allocate(std::size_t n) {
    if (n == 0) return;
    require(n <= std::numeric_limits<std::size_t>::max() / sizeof(T), "device memory: ", n, " elements of ",
            sizeof(T), " bytes overflow the address space");
    void* p = nullptr;
    cudaError_t const st = cudaMalloc(&p, n * sizeof(T));
    if (st != cudaSuccess) {
      (void)cudaGetLastError();  // an allocation failure is not sticky: clear it for the caller
      int dev = -1;
      (void)cudaGetDevice(&dev);
      std::size_t free_b = 0, total_b = 0;
      bool const known = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
      (void)cudaGetLastError();
      auto gib = [](std::size_t b) { return static_cast<double>(b) / double(1ull << 30); };
      std::ostringstream os;
      os.setf(std::ios::fixed);
      os.precision(2);
      os << "device memory: cannot allocate " << n * sizeof(T) << " bytes (" << gib(n * sizeof(T)) << " GiB) on device "
         << dev << ": " << cudaGetErrorString(st);
      if (known) os << " (" << gib(free_b) << " GiB free of " << gib(total_b) << " GiB)";
      throw OutOfMemory(os.str());
    }
    data_ = static_cast<T*>(p);
    size_ = n;
  }
  void release() noexcept {
    if (data_) (void)cudaFree(data_);  // never throw from a destructor
    data_ = nullptr;
    size_ = 0;
  }
  void check_count(std::size_t n, char const* what) const {
    require(n <= size_, "DeviceBuffer::", what, ": ", n, " elements requested but the buffer holds ",
            size_);
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Fast single-precision math shared by the kernels (special-function unit based).
namespace fast {

/// 2^x by the special-function unit (ex2.approx.ftz: about 2 ulp; results below 2^-126 flush
/// to zero, which only ends a decayed state's tail).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// 1 / (1 + e^-x) by ex2.approx and __fdividef; e^-x overflowing to +inf gives 0.
__device__ __forceinline__ float sigmoid_fast(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  return __fdividef(1.f, 1.f + ex2_approx(-x * kLog2e));
}

}  // namespace fast

namespace kernel {
/// ptr[i] = value for i < n (grid-stride loop).
template <class T>
MAMBABYTE_KERNEL void fill(T* MAMBABYTE_RESTRICT ptr, std::size_t n, T value) {
  std::size_t const stride = std::size_t(blockDim.x) * gridDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    ptr[i] = value;
}
}  // namespace kernel

/// Sets `n` elements of device memory `ptr` to `value`, asynchronously on `be.stream`.
template <class T>
void device_fill(Cuda const& be, T* ptr, std::size_t n, T value) {
  static_assert(std::is_trivially_copyable_v<T>, "device_fill needs a trivially copyable type");
  if (n == 0) return;
  require(ptr != nullptr, "device_fill: null pointer for ", n, " elements");
  constexpr unsigned kThreads = 256;
  constexpr std::size_t kMaxBlocks = 65535;  // the grid-stride loop covers the rest
  auto const blocks =
      static_cast<unsigned>(std::min<std::size_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
  ScopedDevice guard(be.device);
  kernel::fill<T><<<blocks, kThreads, 0, be.stream>>>(ptr, n, value);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mambabyte::backend
