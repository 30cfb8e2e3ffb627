/*! \file
 *  \brief CUDA specialisations ssm::SelectiveScan<backend::Cuda, TS, scan::Associative> and
 *         ssm::SelectiveScanBackward<backend::Cuda, TS, scan::Associative>, TS = float or
 *         __nv_bfloat16 (same Arguments as the other CUDA policies: ssm::SelectiveScanArguments
 *         <float> for float, backend::cuda::MixedScanArguments<__nv_bfloat16> for bf16).
 *
 *  Forward: a block-level parallel associative scan over time with a prefix carried across
 *  chunks (the structure of mamba_ssm's selective_scan_fwd_kernel). The recurrence
 *  h_t = a_t h_{t-1} + b_t, a_t = exp(delta_t A[d,n]), b_t = delta_t u_t B_t[n], is the
 *  composition of the affine maps h -> a_t h + b_t, i.e. a scan of the pairs (a_t, b_t) under
 *      (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)        (apply (a1, b1) first; associative).
 *  One block = kAssocThreads threads covers kAssocCh consecutive channels of one batch
 *  (grid: channel blocks x batch) and walks the sequence in chunks of kAssocChunk =
 *  kAssocThreads x kAssocItems time steps; thread i owns the kAssocItems consecutive steps
 *  [i kAssocItems, (i+1) kAssocItems) of the chunk. Per chunk:
 *   1. u and delta (bias and softplus applied once) of the block's channels are staged in shared
 *      memory, channel-major (threads read kAssocCh consecutive channels of a row: coalesced);
 *      steps past the length are (delta, u) = 0, i.e. the identity pair (1, 0).
 *   2. for each group of kAssocStateGroup states: B_t, C_t of the group are staged in shared
 *      memory (state-major, float); then for each state n and channel c: the thread forms its
 *      pairs (a = ex2.approx(delta A log2 e), b = delta u B) in registers, folds them into one
 *      pair, and the block runs an exclusive scan of those pairs: Hillis-Steele with warp
 *      shuffles (5 levels), warp totals through shared memory (one __syncthreads), each thread
 *      then folds the totals of the warps before its own into the carried state. The carried
 *      state of (c, n) (initial_state, or 0, for chunk 0; the end state of chunk k-1 for chunk
 *      k) lives in shared memory, double-buffered by chunk parity; thread 0 writes the chunk's
 *      end state (the carry folded with every warp total). With its exclusive prefix state the
 *      thread re-walks its steps (h = a h + b, the a's kept in registers: one exponential per
 *      state-step) and accumulates y_t += h_t C_t[n] for its steps in registers.
 *   3. out_t = (y_t + D u_t) silu(z_t): y goes through shared memory so that the stores (and
 *      the loads of z) are coalesced like the loads of step 1; bf16 rounds once, at the store.
 *  final_state = the carried state after the last chunk. All arithmetic fp32 (bf16 loads
 *  widen), exponentials as scan::Sequential's (ex2_approx with A pre-scaled by log2 e); the
 *  delta's softplus by softplus_fast and the gate by a division, where Sequential's and
 *  Chunked's kernel use the one-MUFU softplus_fma / silu_gate_fma (a few ulp apart), so the
 *  two differ by the association of the sums and those ulps (tests: 1e-5 relative in fp32).
 *
 *  Complexity per (batch, channel, state), length L, P = kAssocThreads, K = kAssocItems: work
 *  O(L) - one exponential, ~3 FMAs per step (the in-register fold, the re-walk, the output
 *  dot product) plus O(P log 32 + P x warps) per chunk for the block scan, i.e. O(L (1 + log
 *  32 / K)); step count (depth) O(L / P x (K + log2 32 + P / 32)): the L / (P K) chunks follow
 *  each other (the carried prefix), the steps inside a chunk run in parallel. Parallelism
 *  across blocks is batch x ceil(d_inner / kAssocCh); no workspace. d_state <= 64.
 *
 *  Backward (scan::Associative): runs the Chunked<kAssociativeBackwardSegment = 256> backward
 *  of selective_scan_backward.cuh (bitwise the same results), as the CPU backend's Associative
 *  backward runs its chunked one: a tree over the whole length would have to store an (a, b)
 *  pair per (batch, time, channel, state) - the O(B L D N) memory the backward avoids - while
 *  the segmented reduce-then-scan is the two-level, memory-bounded evaluation of the same
 *  associative operator and as parallel along time. 256 steps: the shortest segment the CUDA
 *  backward's Auto rule considers.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/backend/cuda/selective_scan_backward.cuh"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/ssm/selective_scan.hpp"
#include "mambabyte/ssm/selective_scan_backward.hpp"

namespace mambabyte::backend::cuda::scan_assoc_detail {

using scan_detail::ex2_approx;
using scan_detail::from_f;
using scan_detail::kMaxState;
using scan_detail::load_f;
using scan_detail::softplus_fast;

inline constexpr int kAssocThreads = 128;                            ///< threads per block
inline constexpr int kAssocItems = 4;                                ///< consecutive steps per thread
inline constexpr int kAssocChunk = kAssocThreads * kAssocItems;      ///< steps per chunk
inline constexpr int kAssocCh = 8;                                   ///< channels per block
inline constexpr int kAssocStateGroup = 8;                           ///< states per B/C staging
inline constexpr int kAssocWarps = kAssocThreads / 32;
/// Row length of the shared-memory tiles: a chunk plus 4 floats (rows stay 16-byte aligned; the
/// column-wise stores of the staging spread over the banks).
inline constexpr int kAssocRow = kAssocChunk + 4;
/// Time segment of the Chunked backward that scan::Associative's backward runs.
inline constexpr int kAssociativeBackwardSegment = 256;

static_assert(kAssocItems == 4, "a thread's steps are read as one float4");
static_assert(kAssocThreads % 32 == 0 && kAssocThreads % kAssocCh == 0, "block shape");

/// Dynamic shared memory, in floats: delta and u (kAssocCh rows), B and C of a state group
/// (2 kAssocStateGroup rows), A log2 e (kAssocCh x kMaxState), carried states (2 parities x
/// kAssocCh x kMaxState).
inline constexpr std::size_t kAssocSmemFloats =
    static_cast<std::size_t>(2 * kAssocCh + 2 * kAssocStateGroup) * kAssocRow +
    static_cast<std::size_t>(3) * kAssocCh * kMaxState;
inline constexpr std::size_t kAssocSmemBytes = kAssocSmemFloats * sizeof(float);
static_assert(kAssocSmemBytes <= 227 * 1024, "shared memory of the associative scan");

/// Exclusive block scan of one pair (a, b) per thread, seeded with the state h_in: returns the
/// state entering the thread's steps, (pairs of threads 0..tid-1) applied to h_in. `wt` holds
/// kAssocWarps warp totals (double-buffered by the caller). Thread 0 stores the block's end
/// state (every pair applied to h_in) to *h_out. Contains one __syncthreads (block-uniform call).
__device__ __forceinline__ float block_scan_pairs(float a, float b, float h_in, float2* wt, float* h_out) {
  int const lane = threadIdx.x & 31;
  int const warp = threadIdx.x >> 5;
  // Inclusive warp scan (Hillis-Steele): (earlier) o (later) = (a_e a_l, a_l b_e + b_l).
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    float const pa = __shfl_up_sync(0xffffffffu, a, o);
    float const pb = __shfl_up_sync(0xffffffffu, b, o);
    if (lane >= o) {
      b = fmaf(a, pb, b);
      a = pa * a;
    }
  }
  if (lane == 31) wt[warp] = make_float2(a, b);
  // Exclusive within the warp: the inclusive value of the lane before (identity for lane 0).
  float ea = __shfl_up_sync(0xffffffffu, a, 1);
  float eb = __shfl_up_sync(0xffffffffu, b, 1);
  if (lane == 0) {
    ea = 1.f;
    eb = 0.f;
  }
  __syncthreads();
  float h = h_in;
#pragma unroll
  for (int w = 0; w < kAssocWarps; ++w) {
    if (w < warp) {
      float2 const t = wt[w];
      h = fmaf(t.x, h, t.y);
    }
  }
  if (threadIdx.x == 0) {
    float e = h_in;
#pragma unroll
    for (int w = 0; w < kAssocWarps; ++w) {
      float2 const t = wt[w];
      e = fmaf(t.x, e, t.y);
    }
    *h_out = e;
  }
  return fmaf(ea, h, eb);
}

namespace kernel {

/// The whole scan of channels blockIdx.x * kAssocCh + [0, kAssocCh) of batch blockIdx.y (see
/// the file comment).
template <class TS>
MAMBABYTE_KERNEL void __launch_bounds__(kAssocThreads) scan_associative(MixedScanArguments<TS> const a) {
  extern __shared__ __align__(16) float assoc_smem[];
  __shared__ float2 warp_totals[2][kAssocWarps];
  float* const dt_s = assoc_smem;                               // [kAssocCh][kAssocRow]; later y + ...
  float* const u_s = dt_s + kAssocCh * kAssocRow;               // [kAssocCh][kAssocRow]
  float* const b_s = u_s + kAssocCh * kAssocRow;                // [kAssocStateGroup][kAssocRow]
  float* const c_s = b_s + kAssocStateGroup * kAssocRow;        // [kAssocStateGroup][kAssocRow]
  float* const a2_s = c_s + kAssocStateGroup * kAssocRow;       // [kAssocCh][kMaxState]
  float* const carry_s = a2_s + kAssocCh * kMaxState;           // [2][kAssocCh][kMaxState]

  constexpr float kLog2e = 1.4426950408889634f;
  int const tid = threadIdx.x;
  int const N = a.d_state;
  int const d0 = blockIdx.x * kAssocCh;
  int const b = blockIdx.y;
  int const nch = min(kAssocCh, a.d_inner - d0);  // channels of this block (block-uniform)
  std::int64_t const row0 = static_cast<std::int64_t>(b) * a.length;

  // Parameters and the carried state entering chunk 0.
  for (int i = tid; i < kAssocCh * N; i += kAssocThreads) {
    int const c = i / N, n = i - c * N;
    bool const valid = c < nch;
    std::int64_t const dn = static_cast<std::int64_t>(d0 + c) * N + n;
    a2_s[c * kMaxState + n] = valid ? a.A[dn] * kLog2e : 0.f;
    carry_s[c * kMaxState + n] =
        (valid && a.initial_state) ? a.initial_state[static_cast<std::int64_t>(b) * a.d_inner * N + dn] : 0.f;
  }

  // The staging / output threads always serve the same channel (kAssocThreads % kAssocCh == 0).
  int const my_c = tid % kAssocCh;
  bool const my_valid = my_c < nch;
  int const my_d = d0 + (my_valid ? my_c : 0);
  float const bias = (my_valid && a.delta_bias) ? a.delta_bias[my_d] : 0.f;
  float const Dd = (my_valid && a.D) ? a.D[my_d] : 0.f;
  bool const has_z = a.z != nullptr;

  int const n_chunks = (a.length + kAssocChunk - 1) / kAssocChunk;
  int sp = 0;  // parity of the warp-total buffer, flipped after every block scan
  for (int k = 0; k < n_chunks; ++k) {
    int const t0 = k * kAssocChunk;
    int const nt = min(kAssocChunk, a.length - t0);
    float const* const carry_in = carry_s + (k & 1) * kAssocCh * kMaxState;
    float* const carry_out = carry_s + ((k & 1) ^ 1) * kAssocCh * kMaxState;

    __syncthreads();  // the previous chunk's output pass is done with dt_s / u_s
    // 1. delta (bias, softplus) and u; identity steps (0, 0) past the length / d_inner.
    for (int i = tid; i < kAssocChunk * kAssocCh; i += kAssocThreads) {
      int const t = i / kAssocCh;
      float dt = 0.f, u = 0.f;
      if (t < nt && my_valid) {
        std::int64_t const r = row0 + t0 + t;
        dt = load_f(a.delta + r * a.ld_delta + my_d) + bias;
        if (a.delta_softplus) dt = softplus_fast(dt);
        u = load_f(a.u + r * a.ld_u + my_d);
      }
      dt_s[my_c * kAssocRow + t] = dt;
      u_s[my_c * kAssocRow + t] = u;
    }

    float y[kAssocCh][kAssocItems];
#pragma unroll
    for (int c = 0; c < kAssocCh; ++c)
#pragma unroll
      for (int j = 0; j < kAssocItems; ++j) y[c][j] = 0.f;

    for (int g0 = 0; g0 < N; g0 += kAssocStateGroup) {
      int const ng = min(kAssocStateGroup, N - g0);
      if (g0 > 0) __syncthreads();  // the previous group's readers are done with b_s / c_s
      // 2a. B_t, C_t of states [g0, g0 + ng), state-major; zero past the length.
      for (int i = tid; i < kAssocChunk * 2 * kAssocStateGroup; i += kAssocThreads) {
        int const t = i / (2 * kAssocStateGroup);
        int const j = i - t * (2 * kAssocStateGroup);
        bool const is_c = j >= kAssocStateGroup;
        int const jn = is_c ? j - kAssocStateGroup : j;
        float v = 0.f;
        if (t < nt && jn < ng) {
          std::int64_t const r = row0 + t0 + t;
          v = is_c ? load_f(a.C + r * a.ld_C + g0 + jn) : load_f(a.B + r * a.ld_B + g0 + jn);
        }
        (is_c ? c_s : b_s)[jn * kAssocRow + t] = v;
      }
      __syncthreads();  // also publishes step 1 and the parameters

      // 2b. per state and channel: pairs, fold, block scan from the carried state, re-walk.
      for (int jn = 0; jn < ng; ++jn) {
        int const n = g0 + jn;
        float4 const B4 = *reinterpret_cast<float4 const*>(b_s + jn * kAssocRow + tid * kAssocItems);
        float4 const C4 = *reinterpret_cast<float4 const*>(c_s + jn * kAssocRow + tid * kAssocItems);
        float const Bv[kAssocItems] = {B4.x, B4.y, B4.z, B4.w};
        float const Cv[kAssocItems] = {C4.x, C4.y, C4.z, C4.w};
#pragma unroll
        for (int c = 0; c < kAssocCh; ++c) {
          if (c < nch) {  // block-uniform
            float4 const dt4 = *reinterpret_cast<float4 const*>(dt_s + c * kAssocRow + tid * kAssocItems);
            float4 const u4 = *reinterpret_cast<float4 const*>(u_s + c * kAssocRow + tid * kAssocItems);
            float const dtv[kAssocItems] = {dt4.x, dt4.y, dt4.z, dt4.w};
            float const uv[kAssocItems] = {u4.x, u4.y, u4.z, u4.w};
            float const A2 = a2_s[c * kMaxState + n];
            float av[kAssocItems], bv[kAssocItems];
#pragma unroll
            for (int j = 0; j < kAssocItems; ++j) {
              av[j] = ex2_approx(dtv[j] * A2);
              bv[j] = dtv[j] * uv[j] * Bv[j];
            }
            float fa = av[0], fb = bv[0];
#pragma unroll
            for (int j = 1; j < kAssocItems; ++j) {
              fb = fmaf(av[j], fb, bv[j]);
              fa *= av[j];
            }
            float h = block_scan_pairs(fa, fb, carry_in[c * kMaxState + n], warp_totals[sp],
                                       carry_out + c * kMaxState + n);
            sp ^= 1;
#pragma unroll
            for (int j = 0; j < kAssocItems; ++j) {
              h = fmaf(av[j], h, bv[j]);
              y[c][j] = fmaf(h, Cv[j], y[c][j]);
            }
          }
        }
      }
    }

    // 3. outputs: y to shared memory (over delta), then coalesced (y + D u) silu(z) stores.
    __syncthreads();  // every thread is done reading dt_s
#pragma unroll
    for (int c = 0; c < kAssocCh; ++c)
      *reinterpret_cast<float4*>(dt_s + c * kAssocRow + tid * kAssocItems) =
          make_float4(y[c][0], y[c][1], y[c][2], y[c][3]);
    __syncthreads();
    if (my_valid) {
      for (int i = tid; i < nt * kAssocCh; i += kAssocThreads) {
        int const t = i / kAssocCh;
        std::int64_t const r = row0 + t0 + t;
        float v = fmaf(Dd, u_s[my_c * kAssocRow + t], dt_s[my_c * kAssocRow + t]);
        if (has_z) {
          float const zz = load_f(a.z + r * a.ld_z + my_d);
          v = __fdividef(v * zz, 1.f + __expf(-zz));
        }
        a.out[r * a.ld_out + my_d] = from_f<TS>(v);
      }
    }
  }

  if (a.final_state) {
    __syncthreads();  // thread 0's last carried states are visible
    float const* const fin = carry_s + (n_chunks & 1) * kAssocCh * kMaxState;
    for (int i = tid; i < nch * N; i += kAssocThreads) {
      int const c = i / N, n = i - c * N;
      a.final_state[(static_cast<std::int64_t>(b) * a.d_inner + d0 + c) * N + n] = fin[c * kMaxState + n];
    }
  }
}

}  // namespace kernel

/// Launches the associative scan on be.stream (a.batch, a.length > 0, checked arguments).
template <class TS>
void run(MixedScanArguments<TS> const& a, Cuda const& be) {
  static_assert(is_scan_storage_v<TS>, "CUDA scan storage: float or __nv_bfloat16");
  require(a.batch <= 65535, "selective scan (CUDA, associative): batch ", a.batch,
          " exceeds the grid limit 65535");
  ScopedDevice guard(be.device);
  auto* fn = &kernel::scan_associative<TS>;
  if constexpr (kAssocSmemBytes > 48 * 1024)
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(kAssocSmemBytes)));
  dim3 const grid((a.d_inner + kAssocCh - 1) / kAssocCh, a.batch);
  fn<<<grid, kAssocThreads, kAssocSmemBytes, be.stream>>>(a);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mambabyte::backend::cuda::scan_assoc_detail

namespace mambabyte::ssm {

/// scan::Associative on CUDA: the block-level associative scan over time with a carried prefix
/// (see the file comment). No workspace.
template <class TS>
struct SelectiveScan<backend::Cuda, TS, scan::Associative,
                     std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, TS, scan::Associative>, TS> {
  using Base = CudaSelectiveScanBase<SelectiveScan, TS>;
  using typename Base::Arguments;
  using Base::run;
  static constexpr bool kWritesCheckpoints = false;  // the backward's checkpoints: not written here
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static std::size_t workspace_bytes(A const&, backend::Cuda const&) { return 0; }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static void run(A const& a, void*, backend::Cuda const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cuda::scan_assoc_detail::run(backend::cuda::to_mixed(a), be);
  }
};

/// scan::Associative's backward on CUDA: the Chunked<kAssociativeBackwardSegment> backward
/// (see the file comment for why).
template <class TS>
struct SelectiveScanBackward<backend::Cuda, TS, scan::Associative,
                             std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, TS, scan::Associative>, TS> {
  using Arguments = backend::cuda::scan_bwd_detail::BackwardArgumentsFor<TS>;
  template <class A>
  static int seg_chunks(A const& a, backend::Cuda const& be) {
    return SelectiveScanBackward<backend::Cuda, TS,
                                 scan::Chunked<backend::cuda::scan_assoc_detail::kAssociativeBackwardSegment>>::
        seg_chunks(a, be);
  }
};

}  // namespace mambabyte::ssm
