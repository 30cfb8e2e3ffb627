/*! \file
 *  \brief The decode step of the selective SSM on CUDA (mamba_ssm's selective_state_update):
 *         one new token of every sequence, the state updated in place.
 *
 *  For batch b, channel d, state n (fp32 math; T = float or __nv_bfloat16 storage of the
 *  activations, parameters and state in float):
 *      delta   = softplus(dt[b,d] + delta_bias[d])     (or dt + bias without softplus)
 *      h[n]    = exp(delta A[d,n]) h[n] + delta u[b,d] B[b,n]
 *      y       = sum_n h[n] C[b,n] + D[d] u[b,d]
 *      out     = y silu(z[b,d])                        (y when z is null)
 *  With a DeltaProjection the raw delta is computed in the kernel as round_T(x[b, :rank] W[d,
 *  :rank]^T) (the decode step's dt_proj: one GEMM launch fewer per layer and step).
 *  state (batch, d_inner, d_state) float, contiguous, read and written in place. Row b of an
 *  activation x lives at x + b * ld_x (so u, delta, z can be columns of in_proj / dt_proj rows
 *  and B, C slices of x_proj's output row, as in the scan). delta_bias, D, z may be null.
 *  Exactly the scan's per-step arithmetic (same softplus, ex2.approx with A pre-scaled by
 *  log2 e, same silu), so T steps reproduce the scan's outputs and final state to rounding.
 *
 *  Kernel: kStepSplit = 4 threads per channel, each owning d_state / 4 states (4 for d_state
 *  16: one float4 of the state and of A, coalesced: a warp reads 8 channels x 64 contiguous
 *  bytes); the output's dot product is finished with two shuffles. kStepChannels = 16 channels
 *  per 64-thread block, grid (ceil(d_inner / 16), batch): 128 blocks at batch 1, d_inner 2048.
 *  Every load of a thread is issued before the first use (one memory latency per call).
 *  d_state 16 with 16-byte aligned state and A: the float4 path; any d_state <= 64 (or
 *  unaligned pointers): the guarded scalar path. More than 64: an Error is thrown.
 *
 *  Capturable in a CUDA graph: one kernel launch on be.stream, no allocation, no host
 *  synchronisation (argument errors are thrown before any CUDA call).
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/core/error.hpp"

namespace mambabyte::backend::cuda {

namespace step_detail {

inline constexpr int kStepSplit = 4;       ///< threads per channel
inline constexpr int kStepChannels = 16;   ///< channels per block
inline constexpr int kStepThreads = kStepSplit * kStepChannels;
inline constexpr int kStepMaxState = 64;   ///< largest d_state supported

template <class T>
struct StepParams {
  int batch = 0, d_inner = 0, d_state = 0;
  float* state = nullptr;
  T const* u = nullptr;          std::int64_t ld_u = 0;
  T const* delta = nullptr;      std::int64_t ld_delta = 0;
  float const* delta_bias = nullptr;
  bool delta_softplus = true;
  float const* A = nullptr;
  bool a_log = false;            ///< A holds A_log: the kernel takes A = -expf(A_log)
  T const* B = nullptr;          std::int64_t ld_B = 0;
  T const* C = nullptr;          std::int64_t ld_C = 0;
  float const* D = nullptr;
  T const* z = nullptr;          std::int64_t ld_z = 0;
  T* out = nullptr;              std::int64_t ld_out = 0;
  // delta = round_T(x[b, :rank] W[d, :rank]^T) computed here when W is set (else read from delta)
  T const* px = nullptr;         std::int64_t ld_px = 0;
  T const* pW = nullptr;
  int rank = 0;
  bool p_vec = false;            ///< 16-byte loads: rank / kStepSplit a multiple of 16 / sizeof(T), aligned rows
};

/// The delta projection's dot product of channel d (row W[d]) with x's row of this batch: the
/// kStepSplit threads of the channel each sum a quarter of the rank (a contiguous quarter in
/// 16-byte loads on the vector path, else every kStepSplit-th element), in order, with fmaf;
/// two shuffles add the quarters as (q0 + q1) + (q2 + q3) (the same in every thread).
template <class T>
__device__ __forceinline__ float delta_projection(StepParams<T> const& p, T const* wr, T const* xr, int sub) {
  float s = 0.f;
  if (p.p_vec) {
    constexpr int E = 16 / static_cast<int>(sizeof(T));
    int const per = p.rank / kStepSplit;
    for (int r0 = sub * per; r0 < (sub + 1) * per; r0 += E) {
      uint4 const w4 = __ldg(reinterpret_cast<uint4 const*>(wr + r0));
      uint4 const x4 = __ldg(reinterpret_cast<uint4 const*>(xr + r0));
      T const* w = reinterpret_cast<T const*>(&w4);
      T const* x = reinterpret_cast<T const*>(&x4);
#pragma unroll
      for (int e = 0; e < E; ++e) s = fmaf(scan_detail::to_f(w[e]), scan_detail::to_f(x[e]), s);
    }
  } else {
    for (int r = sub; r < p.rank; r += kStepSplit) s = fmaf(scan_detail::load_f(wr + r), scan_detail::load_f(xr + r), s);
  }
  static_assert(kStepSplit == 4, "two shuffle levels");
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  return s;
}

namespace kernel {

/// Channel blockIdx.x * kStepChannels + threadIdx.x / kStepSplit of batch blockIdx.y.
/// kN: states per channel capacity (kN / kStepSplit per thread); kVec: d_state == kN == 16 and
/// state / A 16-byte aligned (float4 loads and stores, no guards).
template <int kN, bool kVec, class T>
MAMBABYTE_KERNEL void __launch_bounds__(kStepThreads) state_update(StepParams<T> const p) {
  static_assert(!kVec || kN == 4 * kStepSplit, "the float4 path holds 4 states per thread");
  constexpr int kNT = kN / kStepSplit;  // states per thread
  constexpr float kLog2e = 1.4426950408889634f;
  int const tid = threadIdx.x;
  int const sub = tid % kStepSplit;
  int const d = blockIdx.x * kStepChannels + tid / kStepSplit;
  int const b = blockIdx.y;
  // The kStepSplit lanes of a channel are all active or all idle; idle ones (past d_inner) run
  // on the last channel's data and store nothing, so that the shuffles see full warps.
  bool const active = d < p.d_inner;
  int const dc = active ? d : p.d_inner - 1;
  int const N = kVec ? kN : p.d_state;
  int const n0 = sub * kNT;

  // All loads first.
  float const dt_raw = p.pW ? scan_detail::to_f(scan_detail::from_f<T>(delta_projection(
                                  p, p.pW + static_cast<std::int64_t>(dc) * p.rank, p.px + b * p.ld_px, sub)))
                            : scan_detail::load_f(p.delta + b * p.ld_delta + dc);
  float const u = scan_detail::load_f(p.u + b * p.ld_u + dc);
  float const zz = p.z ? scan_detail::load_f(p.z + b * p.ld_z + dc) : 0.f;
  float const bias = p.delta_bias ? __ldg(p.delta_bias + dc) : 0.f;
  float const Dd = p.D ? __ldg(p.D + dc) : 0.f;
  float* st = p.state + (static_cast<std::int64_t>(b) * p.d_inner + dc) * N + n0;
  float const* Ar = p.A + static_cast<std::int64_t>(dc) * N + n0;
  T const* Br = p.B + b * p.ld_B + n0;
  T const* Cr = p.C + b * p.ld_C + n0;
  float h[kNT], A2[kNT], Bv[kNT], Cv[kNT];
  if constexpr (kVec) {
    float4 const h4 = *reinterpret_cast<float4 const*>(st);
    float4 const a4 = __ldg(reinterpret_cast<float4 const*>(Ar));
    h[0] = h4.x; h[1] = h4.y; h[2] = h4.z; h[3] = h4.w;
    A2[0] = a4.x; A2[1] = a4.y; A2[2] = a4.z; A2[3] = a4.w;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      Bv[i] = scan_detail::load_f(Br + i);
      Cv[i] = scan_detail::load_f(Cr + i);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      bool const in = n0 + i < N;
      h[i] = in ? st[i] : 0.f;
      A2[i] = in ? __ldg(Ar + i) : 0.f;
      Bv[i] = in ? scan_detail::load_f(Br + i) : 0.f;
      Cv[i] = in ? scan_detail::load_f(Cr + i) : 0.f;
    }
  }

#pragma unroll
  for (int i = 0; i < kNT; ++i) {  // A = -exp(A_log) exactly as the model's neg_exp kernel, then scaled
    float const a = p.a_log ? -expf(A2[i]) : A2[i];
    A2[i] = (kVec || n0 + i < N) ? a * kLog2e : 0.f;
  }
  float dt = dt_raw + bias;
  if (p.delta_softplus) dt = scan_detail::softplus_dev(dt);
  float const du = dt * u;
  float y0 = 0.f, y1 = 0.f;
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    h[i] = fmaf(scan_detail::ex2_approx(dt * A2[i]), h[i], du * Bv[i]);  // 0 for n >= N
    if (i & 1) y1 = fmaf(h[i], Cv[i], y1);
    else y0 = fmaf(h[i], Cv[i], y0);
  }
  float y = y0 + y1;
#pragma unroll
  for (int m = 1; m < kStepSplit; m <<= 1) y += __shfl_xor_sync(0xffffffffu, y, m);
  y = fmaf(Dd, u, y);
  if (p.z) y = __fdividef(y * zz, 1.f + __expf(-zz));

  if (!active) return;
  if constexpr (kVec) {
    *reinterpret_cast<float4*>(st) = make_float4(h[0], h[1], h[2], h[3]);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i)
      if (n0 + i < N) st[i] = h[i];
  }
  if (sub == 0) p.out[b * p.ld_out + d] = scan_detail::from_f<T>(y);
}

}  // namespace kernel

template <int kN, bool kVec, class T>
void launch(StepParams<T> const& p, cudaStream_t stream) {
  dim3 const grid((p.d_inner + kStepChannels - 1) / kStepChannels, p.batch);
  kernel::state_update<kN, kVec, T><<<grid, kStepThreads, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace step_detail

/// The decode step's dt_proj computed inside selective_state_update (one launch fewer per layer
/// and step): delta[b, d] = round_T(sum_r x[b * ld_x + r] W[d * rank + r]) (the fp32 sum rounded
/// to T, as the GEMM's T output would be), then delta_bias and softplus as usual.
template <class T>
struct DeltaProjection {
  T const* x = nullptr;          ///< (batch, >= rank) rows: x_proj's output, dt part first
  std::int64_t ld_x = 0;
  T const* W = nullptr;          ///< (d_inner, rank) row-major: dt_proj's weight
  int rank = 0;
};

/// One decode step of the selective SSM for every sequence of the batch (see the file
/// comment): `state` (batch, d_inner, d_state) float is updated in place, out[b*ld_out + d]
/// written. T: float or __nv_bfloat16. Asynchronous on be.stream; graph-capturable.
/// delta_bias, D, z may be null; everything else is required (leading dimensions >= d_inner,
/// resp. >= d_state for B and C, when batch > 1). 1 <= d_state <= 64. A_is_log: `A` holds the
/// model's A_log and the kernel uses A = -expf(A_log) (the value the model's neg_exp kernel
/// would store: bitwise the same step without that launch per layer and step). proj.W set: delta
/// is computed in the kernel from proj (DeltaProjection) and `delta` is not read (it may be null).
template <class T>
void selective_state_update(Cuda const& be, int batch, int d_inner, int d_state, float* state,
                            T const* u, std::int64_t ld_u, T const* delta, std::int64_t ld_delta,
                            float const* delta_bias, bool delta_softplus, float const* A,
                            T const* B, std::int64_t ld_B, T const* C, std::int64_t ld_C,
                            float const* D, T const* z, std::int64_t ld_z, T* out,
                            std::int64_t ld_out, bool A_is_log = false, DeltaProjection<T> const& proj = {}) {
  static_assert(is_scan_storage_v<T>, "selective_state_update: T is float or __nv_bfloat16");
  using namespace step_detail;
  require(batch >= 0 && d_inner > 0 && d_state > 0,
          "selective_state_update (CUDA): bad shape batch=", batch, " d_inner=", d_inner,
          " d_state=", d_state);
  require(d_state <= kStepMaxState, "selective_state_update (CUDA): d_state ", d_state,
          " exceeds ", kStepMaxState);
  require(batch <= 65535, "selective_state_update (CUDA): batch ", batch, " exceeds 65535");
  if (batch == 0) return;
  bool const project = proj.W != nullptr;
  require(state && u && (delta || project) && A && B && C && out,
          "selective_state_update (CUDA): null state / u / delta / A / B / C / out");
  require(project || (!proj.x && proj.rank == 0),
          "selective_state_update (CUDA): a delta projection's x or rank without its weight W");
  require(!project || (proj.x && proj.rank >= 1 && (batch == 1 || proj.ld_x >= proj.rank)),
          "selective_state_update (CUDA): delta projection needs x, rank >= 1 and ld_x >= rank (got rank ", proj.rank,
          ", ld_x ", proj.ld_x, ")");
  require(batch == 1 || (ld_u >= d_inner && (project || ld_delta >= d_inner) && ld_out >= d_inner &&
                         ld_B >= d_state && ld_C >= d_state && (!z || ld_z >= d_inner)),
          "selective_state_update (CUDA): leading dimension smaller than the row");
  StepParams<T> p;
  p.batch = batch; p.d_inner = d_inner; p.d_state = d_state;
  p.state = state;
  p.u = u; p.ld_u = ld_u;
  p.delta = delta; p.ld_delta = ld_delta;
  p.delta_bias = delta_bias; p.delta_softplus = delta_softplus;
  p.A = A;
  p.a_log = A_is_log;
  p.B = B; p.ld_B = ld_B;
  p.C = C; p.ld_C = ld_C;
  p.D = D;
  p.z = z; p.ld_z = ld_z;
  p.out = out; p.ld_out = ld_out;
  if (project) {
    constexpr int E = 16 / static_cast<int>(sizeof(T));
    auto const a16 = [](void const* q) { return reinterpret_cast<std::uintptr_t>(q) % 16 == 0; };
    p.px = proj.x; p.ld_px = proj.ld_x; p.pW = proj.W; p.rank = proj.rank;
    p.p_vec = proj.rank % (kStepSplit * E) == 0 && (batch == 1 || proj.ld_x % E == 0) && a16(proj.x) && a16(proj.W);
  }
  bool const aligned = reinterpret_cast<std::uintptr_t>(state) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(A) % 16 == 0;
  ScopedDevice guard(be.device);
  if (d_state == 16 && aligned) launch<16, true>(p, be.stream);   // the model's d_state
  else if (d_state <= 16) launch<16, false>(p, be.stream);
  else launch<kStepMaxState, false>(p, be.stream);
}

}  // namespace mambabyte::backend::cuda
