/*! \file
 *  \brief CUDA specialisations of ssm::SelectiveScan for float (fp32 storage, state and math),
 *         device pointers in the arguments: scan::Sequential, scan::Chunked<L> and scan::Auto.
 *
 *  One kernel does all the scanning (kernel::scan_chunk). A block covers kThreads consecutive
 *  channels of one batch and one time chunk; each channel's d_state states live in registers
 *  (of one thread, or of kSplit adjacent threads that finish the output's dot product with a
 *  shuffle). Time runs in tiles of kTileT steps: the block copies the next tiles of u, delta, z
 *  (warps read 32 consecutive channels of a row: coalesced) and of B_t, C_t (shared by the
 *  block) into shared memory with cp.async while it computes the current one (kScanStages: 3
 *  for bf16, 2 for float), one block barrier per tile.
 *  Per step, fused: delta = softplus(delta + bias) (branch-free, e^-|v| by ex2.approx:
 *  softplus_fast), h = exp(delta A) h +
 *  delta u B_t (ex2.approx with A pre-scaled by log2 e), y = <h, C_t> + D u, out = y silu(z).
 *  Within a tile every step's delta comes first, then the recurrence, then the outputs, so
 *  that the exponentials of different steps overlap.
 *
 *  - Sequential: one chunk per (batch, channel block), the whole length in time order, two
 *    threads per channel (d_state 16; the pair shares the per-(step, channel) softplus and
 *    gate, each doing alternate steps): the fewest exponentials; latency-bound when
 *    batch x d_inner is small.
 *  - Chunked<L>: reduce-then-scan along time, as the CPU backend. Phase 1 (kReduce) scans every
 *    chunk but the last from a zero state and stores its end state and sum of deltas in the
 *    workspace; phase 2 (kernel::carry_chunks, a thread per (batch, state, channel)) turns those into
 *    each chunk's carried-in state (decay of a chunk = exp(A sum delta)); phase 3 (kWrite)
 *    rescans every chunk from its carried-in state and writes the outputs. About 1.9x the
 *    exponentials of Sequential, but batch x channel-blocks x chunks blocks.
 *  - Auto: resolve_auto_cuda() below: one chunk when the channel blocks fill more than 2/5 of
 *    a wave of resident blocks (two threads per channel while they do not fill it), the
 *    shortest chunks when a wave would need 8 or more, else chunks to fill one wave
 *    (docs/cuda.md has the measurements).
 *
 *  d_state up to 64 (an exact 16-state fast path and a general one for d_state <= 64); larger
 *  d_state: can_implement() says kUnsupported. Launches are asynchronous on be.stream; the
 *  workspace (Chunked, Auto) is device memory of workspace_bytes() bytes, owned by the caller
 *  and in use until the stream passes the scan.
 *
 *  bf16 storage: ssm::SelectiveScan<backend::Cuda, __nv_bfloat16, Policy> (same policies) takes
 *  backend::cuda::MixedScanArguments<__nv_bfloat16>: the activations u, delta, B, C, z, out are
 *  __nv_bfloat16, the parameters (A, D, delta_bias) and the states (initial_state, final_state,
 *  and the chunked workspace) float; all arithmetic is fp32 as in the float scan, outputs are
 *  rounded to bf16 (nearest even) once, at the store. The same kernels serve both: they are
 *  templated on the storage type TS, and the float specialisations map their
 *  ssm::SelectiveScanArguments<float> onto MixedScanArguments<float> (same fields), whose code
 *  path is the fp32 one unchanged (`if constexpr` on TS). What differs for bf16:
 *   - u, delta, z tiles stay bf16 in shared memory (half the bytes) and are converted on read.
 *     When a tensor's base is 16-byte aligned and its leading dimension a multiple of 8
 *     (checked on the host: ScanParams::vec_x), each cp.async moves 8 channels (16 bytes; a
 *     ragged last group is zero-filled by cp.async's src-size); otherwise the tile is staged by
 *     plain 2-byte loads (correct for any layout, slower: the loads' latency is not hidden).
 *   - B_t, C_t rows: cp.async of 16-byte groups into a bf16 copy (vec_bc: B and C 16-byte
 *     aligned, ld_B and ld_C multiples of 8; else plain loads), then converted once per tile
 *     by every warp into its own float copy (no block barrier), so the inner loop reads them as
 *     float4 broadcasts exactly like the float scan.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/ssm/selective_scan.hpp"

namespace mambabyte::backend::cuda {

/// Storage types of the CUDA scans' activations: float and __nv_bfloat16.
template <class TS>
inline constexpr bool is_scan_storage_v =
    std::is_same_v<TS, float> || std::is_same_v<TS, __nv_bfloat16>;

/// Arguments of the CUDA scan with activations stored as TS (float or __nv_bfloat16) and
/// parameters / states in float. Same fields, meaning and layout as
/// ssm::SelectiveScanArguments (see ssm/selective_scan.hpp); all pointers are device memory.
template <class TS>
struct MixedScanArguments {
  int batch = 0, length = 0, d_inner = 0, d_state = 0;
  TS const* u = nullptr;          std::int64_t ld_u = 0;      ///< (batch, length, d_inner)
  TS const* delta = nullptr;      std::int64_t ld_delta = 0;  ///< (batch, length, d_inner), before bias
  float const* delta_bias = nullptr;                          ///< (d_inner) or null
  bool delta_softplus = true;
  float const* A = nullptr;                                   ///< (d_inner, d_state)
  TS const* B = nullptr;          std::int64_t ld_B = 0;      ///< (batch, length, d_state)
  TS const* C = nullptr;          std::int64_t ld_C = 0;      ///< (batch, length, d_state)
  float const* D = nullptr;                                   ///< (d_inner) or null
  TS const* z = nullptr;          std::int64_t ld_z = 0;      ///< (batch, length, d_inner) or null
  TS* out = nullptr;              std::int64_t ld_out = 0;    ///< (batch, length, d_inner)
  float const* initial_state = nullptr;                       ///< (batch, d_inner, d_state) or null
  float* final_state = nullptr;                               ///< (batch, d_inner, d_state) or null
  /// Optional output for a later backward (MixedScanBackwardArguments::checkpoints, which then
  /// skips its own forward sweep): the state entering every kCheckpointInterval-th step
  /// (t = 0, 4, 8, ...; slot 0 is the initial state), [batch][ceil(length / 4)][d_inner][d_state]
  /// floats, states innermost (checkpoint_floats()). Written by the Sequential, Auto and
  /// Chunked<L> (L a multiple of 4) scans; Associative does not take it. Null: not written.
  float* checkpoints = nullptr;
};

/// Steps between the scan states a forward stores for the backward (MixedScanArguments::
/// checkpoints); the backward's recompute chunk is the same length.
inline constexpr int kCheckpointInterval = 4;

/// Floats of MixedScanArguments::checkpoints (and MixedScanBackwardArguments::checkpoints).
inline std::size_t checkpoint_floats(int batch, int length, int d_inner, int d_state) {
  if (batch <= 0 || length <= 0) return 0;
  return static_cast<std::size_t>(batch) * ((length + kCheckpointInterval - 1) / kCheckpointInterval) *
         static_cast<std::size_t>(d_inner) * d_state;
}

/// The checks of ssm::validate(SelectiveScanArguments) for the mixed arguments.
template <class TS>
Status validate(MixedScanArguments<TS> const& a) {
  if (a.batch < 0 || a.length < 0 || a.d_inner <= 0 || a.d_state <= 0) return Status::kInvalidArgument;
  if (a.batch == 0 || a.length == 0) return Status::kSuccess;  // nothing to do, still valid
  if (!a.u || !a.delta || !a.A || !a.B || !a.C || !a.out) return Status::kInvalidArgument;
  if (a.ld_u < a.d_inner || a.ld_delta < a.d_inner || a.ld_out < a.d_inner) return Status::kInvalidArgument;
  if (a.ld_B < a.d_state || a.ld_C < a.d_state) return Status::kInvalidArgument;
  if (a.z && a.ld_z < a.d_inner) return Status::kInvalidArgument;
  return Status::kSuccess;
}

/// The float arguments as MixedScanArguments<float> (field by field).
inline MixedScanArguments<float> to_mixed(ssm::SelectiveScanArguments<float> const& f) {
  MixedScanArguments<float> a;
  a.batch = f.batch; a.length = f.length; a.d_inner = f.d_inner; a.d_state = f.d_state;
  a.u = f.u; a.ld_u = f.ld_u;
  a.delta = f.delta; a.ld_delta = f.ld_delta;
  a.delta_bias = f.delta_bias; a.delta_softplus = f.delta_softplus;
  a.A = f.A;
  a.B = f.B; a.ld_B = f.ld_B;
  a.C = f.C; a.ld_C = f.ld_C;
  a.D = f.D;
  a.z = f.z; a.ld_z = f.ld_z;
  a.out = f.out; a.ld_out = f.ld_out;
  a.initial_state = f.initial_state; a.final_state = f.final_state;
  return a;
}
inline MixedScanArguments<__nv_bfloat16> const& to_mixed(MixedScanArguments<__nv_bfloat16> const& a) { return a; }
inline MixedScanArguments<float> const& to_mixed(MixedScanArguments<float> const& a) { return a; }

}  // namespace mambabyte::backend::cuda

namespace mambabyte::backend::cuda::scan_detail {

/// Element loads and stores with fp32 arithmetic: to_f / load_f widen (load_f through the
/// read-only cache), from_f rounds to nearest even for bf16.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float load_f(float const* p) { return __ldg(p); }
__device__ __forceinline__ float load_f(__nv_bfloat16 const* p) { return __bfloat162float(__ldg(p)); }
template <class TS>
__device__ __forceinline__ TS from_f(float x) {
  if constexpr (std::is_same_v<TS, float>) return x;
  else return __float2bfloat16_rn(x);
}

/// True when rows of TS at p with leading dimension ld start on 16-byte boundaries (or p is
/// null: an absent input never stops the vector path).
template <class TS>
inline bool rows_aligned16(TS const* p, std::int64_t ld) {
  return p == nullptr ||
         (reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (ld * static_cast<std::int64_t>(sizeof(TS))) % 16 == 0);
}

/// cp.async of 16 bytes (L2 only) from global `src` to shared `dst`, both 16-byte aligned; only
/// the first src_bytes (1..16) are read, the rest of the 16 are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, void const* src, int src_bytes) {
  unsigned const s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
}

inline constexpr int kThreads = 128;  ///< channels per block (kSplit threads each)
inline constexpr int kTileT = 16;     ///< time steps per shared-memory stage
inline constexpr int kMaxState = 64;  ///< largest d_state supported
/// Threads per channel of the d_state == 16 path in scan::Sequential's single-chunk launch:
/// there the few warps are latency-bound, and two threads per channel (8 states each) double
/// them. The chunked launches fill the SMs already and use one (fewer instructions per state).
inline constexpr int kSplitSequential = 2;
/// Resident 128-thread blocks per SM asked of ptxas for the d_state 16 path (128 registers a
/// thread: 16 warps per SM; without it ptxas took 130-140 and 3 blocks fit).
inline constexpr int kScanMinBlocks = 4;
/// The same for the two-threads-per-channel kernel (256 threads, scan::Sequential's single
/// chunk): 3 blocks (85 registers; its tile runs in halves).
inline constexpr int kScanMinBlocksSplit = 3;

/// Where a state array lives: element (b, chunk c, channel d, state n) at
/// p[b*sb + c*sc + d*sd + n*sn]. p == nullptr means "zero" (as input) / "not wanted" (output).
struct StateView {
  float* p = nullptr;
  std::int64_t sb = 0, sc = 0, sd = 0, sn = 0;
};

/// scan_chunk's pass: kReduce (chunk end states from zero), kWrite (outputs), kWriteCk (outputs
/// and the backward's checkpoints: a separate instantiation, so that the plain write pass keeps
/// its registers).
enum class Mode { kReduce, kWrite, kWriteCk };

template <class TS = float>
struct ScanParams {
  MixedScanArguments<TS> a;
  int chunk_len = 0;    ///< time steps per chunk (>= length for one chunk)
  int n_chunks = 1;
  StateView h_in;       ///< kWrite: carried-in state per chunk (null: zero)
  StateView h_out;      ///< kReduce: end state of every chunk; kWrite: of the last chunk only
  float* dsum = nullptr;  ///< kReduce: sum of deltas, [(b*n_chunks + c)*d_inner + d]
  float* ck = nullptr;    ///< kWriteCk: a.checkpoints, [(b*ceil(L/4) + t/4)*d_inner + d]*d_state + n
  bool vec_x = false;   ///< bf16: u, delta, z rows 16-byte aligned (cp.async of 8 channels)
  bool vec_bc = false;  ///< bf16: B, C rows 16-byte aligned (cp.async of 8 states)
};

using fast::ex2_approx;    // common.cuh
using fast::sigmoid_fast;  // common.cuh

/// max(v, 0) + log1p(e) for e = e^-|v| in (0, 1]: log1p(e) = 2 atanh(s), s = e / (2 + e) in
/// (0, 1/3], summed to s^13 (truncation < 2e-8 relative).
__device__ __forceinline__ float softplus_from_exp(float v, float e) {
  float const s = __fdividef(e, 2.f + e);
  float const s2 = s * s;
  float q = 1.f / 13.f;
  q = fmaf(q, s2, 1.f / 11.f);
  q = fmaf(q, s2, 1.f / 9.f);
  q = fmaf(q, s2, 1.f / 7.f);
  q = fmaf(q, s2, 1.f / 5.f);
  q = fmaf(q, s2, 1.f / 3.f);
  q = fmaf(q, s2, 1.f);
  return fmaf(2.f * s, q, fmaxf(v, 0.f));
}

/// softplus(v) = log(1 + e^v), branch-free: max(v, 0) + log1p(e^-|v|) (softplus_from_exp).
/// For v > 20 this is v to within rounding (mamba_ssm returns v there).
__device__ __forceinline__ float softplus_dev(float v) { return softplus_from_exp(v, expf(-fabsf(v))); }

/// The same with e^-|v| by ex2.approx (a few ulp; about 8 instructions fewer per call): the
/// scans' per-(step, channel) delta (5-9% of the forward scan's time on the H200). decode.cuh's
/// step kernels keep softplus_dev (the persistent step takes softplus_fma); they agree with the
/// scans to ~1e-7 relative.
__device__ __forceinline__ float softplus_fast(float v) {
  constexpr float kLog2e = 1.4426950408889634f;
  return softplus_from_exp(v, ex2_approx(-fabsf(v) * kLog2e));
}

/// softplus with one special-function op: max(v, 0) + e P(e), e = e^-|v| by ex2.approx and P a
/// degree-8 fit of log1p(e) / e on [0, 1] (relative error of the fit 3e-8, 2e-7 in float with
/// Horner's rule; softplus_fast's series needs a reciprocal, a second MUFU op). The forward
/// scans' per-(step, channel) delta, where the MUFU pipe is the busiest unit.
__device__ __forceinline__ float softplus_fma(float v) {
  constexpr float kLog2e = 1.4426950408889634f;
  float const e = ex2_approx(-fabsf(v) * kLog2e);
  float p = 5.232709460e-03f;
  p = fmaf(p, e, -2.950531244e-02f);
  p = fmaf(p, e, 7.822609693e-02f);
  p = fmaf(p, e, -1.366326064e-01f);
  p = fmaf(p, e, 1.910601556e-01f);
  p = fmaf(p, e, -2.484298497e-01f);
  p = fmaf(p, e, 3.331909776e-01f);
  p = fmaf(p, e, -4.999949336e-01f);
  p = fmaf(p, e, 9.999999404e-01f);
  return fmaf(e, p, fmaxf(v, 0.f));
}

/// y silu(z) = y z / (1 + e^-z) with one special-function op: the reciprocal by Newton's method
/// from the exponent-bit estimate (5% -> 2.5e-3 -> 6e-6 -> ~1e-7 relative), e^-z capped at
/// 1e30 so that 1 + e^-z stays a normal float for the estimate (the result is then ~0 either
/// way).
__device__ __forceinline__ float silu_gate_fma(float y, float z) {
  constexpr float kLog2e = 1.4426950408889634f;
  float const d = 1.f + fminf(ex2_approx(-z * kLog2e), 1e30f);
  float r = __int_as_float(0x7EF311C3 - __float_as_int(d));
  r *= fmaf(-d, r, 2.f);
  r *= fmaf(-d, r, 2.f);
  r *= fmaf(-d, r, 2.f);
  return y * z * r;
}

/// A thread's kNT states h into dst (states n0 .. n0 + kNT - 1 of a channel's contiguous row):
/// as float4 vectors when kVec (kNT a multiple of 4, dst 16-byte aligned), else one by one up
/// to state N. The forward's states for the backward and the backward's own checkpoints.
template <bool kVec, int kNT>
__device__ __forceinline__ void store_states(float* dst, float const (&h)[kNT], int n0, int N) {
  if constexpr (kVec) {
    static_assert(kNT % 4 == 0, "float4 groups");
#pragma unroll
    for (int q = 0; q < kNT / 4; ++q)
      reinterpret_cast<float4*>(dst)[q] = make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i)
      if (n0 + i < N) dst[i] = h[i];
  }
}

/// Shared memory of one stage: u, delta, z columns (kTileT x kThreads) and B, C rows, in the
/// storage type TS (bf16: rows of 2 kN >= 32 elements, so every row starts 16-byte aligned).
template <int kN, class TS = float>
struct alignas(16) Stage {
  static_assert(kN % 8 == 0, "B/C rows are read as float4 (float) / 16-byte groups (bf16)");
  TS u[kTileT][kThreads];
  TS dt[kTileT][kThreads];
  TS z[kTileT][kThreads];
  alignas(16) TS bc[kTileT][2 * kN];  // B_t[0..N) then C_t[0..N); rows 16-byte aligned
};

/// bf16 only: the current tile's B, C rows converted to float, one copy per warp (after the
/// stages): each warp widens the rows it reads, so the widening needs no block barrier.
template <int kN>
struct alignas(16) BcFloat {
  float bc[kTileT][2 * kN];
};

/// Stages of scan_chunk's tile pipeline: with three (bf16), the stage a tile refills was last
/// read two tiles earlier, so one block barrier per tile (the one that makes the landed tile
/// visible) also frees it; float keeps two (three would not fit 4 blocks per SM), also with one
/// barrier per tile but the next tile's copies issued after it.
template <class TS>
inline constexpr int kScanStages = std::is_same_v<TS, float> ? 2 : 3;

/// Dynamic shared memory of scan_chunk: the stages (+ the per-warp float B/C rows for bf16).
template <int kN, class TS, int kSplit = 1>
constexpr std::size_t scan_smem_bytes() {
  return kScanStages<TS> * sizeof(Stage<kN, TS>) +
         (std::is_same_v<TS, float> ? 0 : (kThreads * kSplit / 32) * sizeof(BcFloat<kN>));
}

namespace kernel {

/// Scans time chunk blockIdx.y (kWrite) or chunk blockIdx.y of the first n_chunks-1 (kReduce)
/// for channels blockIdx.x*kThreads + [0, kThreads) of batch blockIdx.z, with kSplit adjacent
/// threads per channel, each holding d_state/kSplit of its states (more warps for the same
/// work; the output's dot product is finished with shuffles).
///  kExact (d_state == kN): every thread runs the tile code, threads of channels past d_inner
///  on zeros, and only stores are masked; registers across the whole tile.
///  !kExact (kSplit 1): d_state <= kN with guards, the plain step loop.
template <int kN, bool kExact, int kSplit, Mode kMode, class TS = float>
MAMBABYTE_KERNEL void __launch_bounds__(kThreads * kSplit, kExact ? (kSplit == 1 ? kScanMinBlocks : kScanMinBlocksSplit) : 1)
    scan_chunk(ScanParams<TS> const p) {
  static_assert(kExact || kSplit == 1, "the general path has one thread per channel");
  static_assert(kN % (4 * kSplit) == 0, "each thread holds whole float4 groups of states");
  constexpr bool kFloat = std::is_same_v<TS, float>;
  constexpr int kNT = kN / kSplit;  // states per thread
  constexpr int kBlock = kThreads * kSplit;
  constexpr bool kWrites = kMode != Mode::kReduce;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kStages = kScanStages<TS>;
  auto* stages = reinterpret_cast<Stage<kN, TS>*>(smem_raw);
  // bf16: this warp's copy of the current tile's B / C rows as float (unused for float storage).
  [[maybe_unused]] auto* bcf =
      reinterpret_cast<BcFloat<kN>*>(smem_raw + kStages * sizeof(Stage<kN, TS>)) + threadIdx.x / 32;

  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;  // kExact: the guards fold away
  int const tid = threadIdx.x;
  int const ch = tid / kSplit;            // channel within the block
  int const sub = tid % kSplit;           // which part of the states
  int const n0 = sub * kNT;               // first state of this thread
  int const d = blockIdx.x * kThreads + ch;
  int const c = blockIdx.y;
  int const b = blockIdx.z;
  bool const active = d < a.d_inner;
  int const dc = active ? d : a.d_inner - 1;  // parameters of a real channel for idle threads
  int const t0 = c * p.chunk_len;
  int const t1 = min(a.length, t0 + p.chunk_len);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * a.length;

  constexpr float kLog2e = 1.4426950408889634f;
  float A2[kNT], h[kNT];
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    A2[i] = (n0 + i < N) ? a.A[static_cast<std::int64_t>(dc) * N + n0 + i] * kLog2e : 0.f;
    h[i] = 0.f;
  }
  if constexpr (kWrites) {
    if (active && p.h_in.p) {
      float const* src = p.h_in.p + b * p.h_in.sb + c * p.h_in.sc + d * p.h_in.sd;
#pragma unroll
      for (int i = 0; i < kNT; ++i)
        if (n0 + i < N) h[i] = src[(n0 + i) * p.h_in.sn];
    }
  }
  float const bias = a.delta_bias ? a.delta_bias[dc] : 0.f;
  float const Dd = a.D ? a.D[dc] : 0.f;
  bool const has_z = a.z != nullptr;
  float dsum = 0.f;

  // kWriteCk: the state entering step t (t a multiple of kCheckpointInterval)
  // into slot t / kCheckpointInterval of this thread's channel (its kNT states contiguous).
  [[maybe_unused]] float* const ckw =
      (kMode == Mode::kWriteCk && active)
          ? p.ck + (static_cast<std::int64_t>(b) * ((a.length + kCheckpointInterval - 1) / kCheckpointInterval) *
                        a.d_inner + d) * N + n0
          : nullptr;
  [[maybe_unused]] std::int64_t const ck_step = static_cast<std::int64_t>(a.d_inner) * N;
  auto store_checkpoint = [&](int t) {
    store_states<kExact && kNT % 4 == 0>(ckw + static_cast<std::int64_t>(t / kCheckpointInterval) * ck_step, h, n0,
                                         N);
  };

  // Issues the copies of the tile starting at time t into stage s: the block's threads walk
  // the (step, channel) columns so that each warp reads consecutive channels of one row.
  // Columns of channels past d_inner are zero-filled.
  auto issue = [&](int s, int t) {
    int const nt = min(kTileT, t1 - t);
    Stage<kN, TS>& st = stages[s];
    if constexpr (kFloat) {
      // float: one cp.async of 4 bytes per element.
      int const col = tid % kThreads;
      int const dl = blockIdx.x * kThreads + col;
      if (dl < a.d_inner) {
        std::int64_t const row = row0 + t;
        for (int k = tid / kThreads; k < nt; k += kSplit) {
          __pipeline_memcpy_async(&st.u[k][col], a.u + (row + k) * a.ld_u + dl, sizeof(float));
          __pipeline_memcpy_async(&st.dt[k][col], a.delta + (row + k) * a.ld_delta + dl, sizeof(float));
          if (kWrites && has_z)
            __pipeline_memcpy_async(&st.z[k][col], a.z + (row + k) * a.ld_z + dl, sizeof(float));
        }
      } else if constexpr (kExact) {
        for (int k = tid / kThreads; k < nt; k += kSplit) {
          st.u[k][col] = 0.f;
          st.dt[k][col] = 0.f;
          st.z[k][col] = 0.f;
        }
      }
      int const per_row = (kWrites) ? 2 * N : N;  // kReduce needs no C
      for (int i = tid; i < nt * per_row; i += kBlock) {
        int const k = i / per_row, j = i - k * per_row;
        std::int64_t const row = row0 + t + k;
        float const* src = j < N ? a.B + row * a.ld_B + j : a.C + row * a.ld_C + (j - N);
        int const cj = j < N ? j : kN + (j - N);
        __pipeline_memcpy_async(&st.bc[k][cj], src, sizeof(float));
      }
    } else {
      // bf16, u / delta / z: groups of 8 channels (16 bytes) per cp.async when aligned.
      if (p.vec_x) {
        constexpr int kG = kThreads / 8;  // groups per row of the block
        for (int i = tid; i < nt * kG; i += kBlock) {
          int const k = i / kG, g = i - k * kG;
          int const dl = blockIdx.x * kThreads + 8 * g;
          int const valid = min(8, a.d_inner - dl);
          std::int64_t const row = row0 + t + k;
          if (valid > 0) {
            int const bytes = valid * static_cast<int>(sizeof(TS));
            cp_async16(&st.u[k][8 * g], a.u + row * a.ld_u + dl, bytes);
            cp_async16(&st.dt[k][8 * g], a.delta + row * a.ld_delta + dl, bytes);
            if (kWrites && has_z) cp_async16(&st.z[k][8 * g], a.z + row * a.ld_z + dl, bytes);
          } else if constexpr (kExact) {
            uint4 const zero = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(&st.u[k][8 * g]) = zero;
            *reinterpret_cast<uint4*>(&st.dt[k][8 * g]) = zero;
            *reinterpret_cast<uint4*>(&st.z[k][8 * g]) = zero;
          }
        }
      } else {
        // Any layout: plain 2-byte loads (the loads' latency is not hidden).
        int const col = tid % kThreads;
        int const dl = blockIdx.x * kThreads + col;
        if (dl < a.d_inner) {
          std::int64_t const row = row0 + t;
          for (int k = tid / kThreads; k < nt; k += kSplit) {
            st.u[k][col] = a.u[(row + k) * a.ld_u + dl];
            st.dt[k][col] = a.delta[(row + k) * a.ld_delta + dl];
            if (kWrites && has_z) st.z[k][col] = a.z[(row + k) * a.ld_z + dl];
          }
        } else if constexpr (kExact) {
          TS const zero = from_f<TS>(0.f);
          for (int k = tid / kThreads; k < nt; k += kSplit) {
            st.u[k][col] = zero;
            st.dt[k][col] = zero;
            st.z[k][col] = zero;
          }
        }
      }
      // bf16, B / C rows: groups of 8 states per cp.async when aligned (ragged tail zero-filled).
      int const halves = (kWrites) ? 2 : 1;  // kReduce needs no C
      if (p.vec_bc) {
        int const gN = (N + 7) / 8;
        int const per_row = halves * gN;
        for (int i = tid; i < nt * per_row; i += kBlock) {
          int const k = i / per_row, j = i - k * per_row;
          bool const is_c = j >= gN;
          int const g = is_c ? j - gN : j;
          std::int64_t const row = row0 + t + k;
          TS const* src = (is_c ? a.C + row * a.ld_C : a.B + row * a.ld_B) + 8 * g;
          cp_async16(&st.bc[k][(is_c ? kN : 0) + 8 * g], src,
                     min(8, N - 8 * g) * static_cast<int>(sizeof(TS)));
        }
      } else {
        int const per_row = halves * N;
        for (int i = tid; i < nt * per_row; i += kBlock) {
          int const k = i / per_row, j = i - k * per_row;
          std::int64_t const row = row0 + t + k;
          TS const* src = j < N ? a.B + row * a.ld_B + j : a.C + row * a.ld_C + (j - N);
          st.bc[k][j < N ? j : kN + (j - N)] = *src;
        }
      }
    }
    __pipeline_commit();
  };

  // B_t / C_t row k of the current tile as float: the stage itself (float) or the converted
  // copy (bf16).
  auto bc_row = [&](Stage<kN, TS> const& st, int k) -> float const* {
    if constexpr (kFloat) return st.bc[k];
    else return bcf->bc[k];
  };

  // kExact path, one tile (kSplit 2: in halves of kH steps, fewer live registers). kGuarded: a partial
  // tile (steps >= nt skipped). kSplit 2: the two threads of a channel hold half the states
  // each and share the per-(step, channel) work: each widens dt (softplus) for alternate steps
  // and swaps it with its partner, and each gates and stores alternate steps' outputs, so that
  // a channel's step costs the exponentials of one thread, not two.
  auto tile_exact = [&](Stage<kN, TS> const& st, int t, auto guarded) {
    constexpr bool kGuarded = decltype(guarded)::value;
    constexpr int kH = kSplit == 1 ? kTileT : kTileT / 2;  // halves for the 80-register kernel
    static_assert(kSplit == 1 || kSplit == 2, "one or two threads per channel");
    static_assert(kH % kCheckpointInterval == 0, "a checkpoint step is h0 + k with k % 4 == 0");
    int const nt = min(kTileT, t1 - t);
#pragma unroll 1
    for (int h0 = 0; h0 < kTileT; h0 += kH) {
      if (kGuarded && h0 >= nt) break;
      float dtv[kH], uv[kH];
      if constexpr (kSplit == 1) {
#pragma unroll
        for (int k = 0; k < kH; ++k) {
          if (!kGuarded || h0 + k < nt) {
            float dt = to_f(st.dt[h0 + k][ch]) + bias;
            if (a.delta_softplus) dt = softplus_fma(dt);
            dtv[k] = dt;
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kH / 2; ++j) {
          // this thread widens step 2j + sub (a row past nt in a partial tile holds stale,
          // finite-or-not values that are never used)
          float dt = to_f(st.dt[h0 + 2 * j + sub][ch]) + bias;
          if (a.delta_softplus) dt = softplus_fma(dt);
          float const other = __shfl_xor_sync(0xffffffffu, dt, 1);
          dtv[2 * j] = sub ? other : dt;
          dtv[2 * j + 1] = sub ? dt : other;
        }
      }
      float yv[kH];
#pragma unroll
      for (int k = 0; k < kH; ++k) {
        if constexpr (kSplit == 1) {
          if (!kGuarded || h0 + k < nt) uv[k] = to_f(st.u[h0 + k][ch]);
        } else {  // the output swap below reads every step's u and y (rows past nt: stale, unused)
          uv[k] = to_f(st.u[h0 + k][ch]);
          yv[k] = 0.f;
        }
      }
#pragma unroll
      for (int k = 0; k < kH; ++k) {
        if (!kGuarded || h0 + k < nt) {
          // the tile starts on a checkpoint step (chunks are multiples of 4 when ck is set)
          if constexpr (kMode == Mode::kWriteCk)
            if (k % kCheckpointInterval == 0 && ckw) store_checkpoint(t + h0 + k);  // k unrolled: folds
          float const du = dtv[k] * uv[k];
          float y0 = 0.f, y1 = 0.f;
          // B_t, C_t: the same for every thread (broadcast), read 16 bytes at a time.
          float4 const* bc4 = reinterpret_cast<float4 const*>(bc_row(st, h0 + k) + n0);
#pragma unroll
          for (int q = 0; q < kNT / 4; ++q) {
            float4 const B4 = bc4[q];
            float const Bq[4] = {B4.x, B4.y, B4.z, B4.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              int const i = 4 * q + j;
              h[i] = fmaf(ex2_approx(dtv[k] * A2[i]), h[i], du * Bq[j]);
            }
            if constexpr (kWrites) {
              float4 const C4 = bc4[kN / 4 + q];
              y0 = fmaf(h[4 * q + 0], C4.x, y0);
              y1 = fmaf(h[4 * q + 1], C4.y, y1);
              y0 = fmaf(h[4 * q + 2], C4.z, y0);
              y1 = fmaf(h[4 * q + 3], C4.w, y1);
            }
          }
          yv[k] = y0 + y1;
          if constexpr (kMode == Mode::kReduce) dsum += dtv[k];
        }
      }
      if constexpr (kWrites) {
        if constexpr (kSplit == 1) {
          TS* po = a.out + (row0 + t + h0) * a.ld_out + d;
#pragma unroll
          for (int k = 0; k < kH; ++k) {
            if (!kGuarded || h0 + k < nt) {
              float y = fmaf(Dd, uv[k], yv[k]);
              if (has_z) {
                float const zz = to_f(st.z[h0 + k][ch]);
                y = silu_gate_fma(y, zz);
              }
              if (active) *po = from_f<TS>(y);
              po += a.ld_out;
            }
          }
        } else {
          // the channel's full y per step, then this thread gates and stores steps 2j + sub
          TS* po = a.out + (row0 + t + h0 + sub) * a.ld_out + d;
          std::int64_t const ld2 = 2 * a.ld_out;
#pragma unroll
          for (int j = 0; j < kH / 2; ++j) {
            float const y0 = yv[2 * j] + __shfl_xor_sync(0xffffffffu, yv[2 * j], 1);
            float const y1 = yv[2 * j + 1] + __shfl_xor_sync(0xffffffffu, yv[2 * j + 1], 1);
            int const k = 2 * j + sub;
            float y = fmaf(Dd, sub ? uv[2 * j + 1] : uv[2 * j], sub ? y1 : y0);
            if (has_z) {
              float const zz = to_f(st.z[h0 + k][ch]);
              y = silu_gate_fma(y, zz);
            }
            if (active && (!kGuarded || h0 + k < nt)) *po = from_f<TS>(y);
            po += ld2;
          }
        }
      }
    }
  };

  // General d_state (<= kN, guarded), one tile: the plain step loop.
  auto tile_general = [&](Stage<kN, TS> const& st, int t, int nt) {
#pragma unroll 2
    for (int k = 0; k < nt; ++k) {
      if constexpr (kMode == Mode::kWriteCk)
        if (ckw && (t + k) % kCheckpointInterval == 0) store_checkpoint(t + k);
      float const* bck = bc_row(st, k);
      float dt = to_f(st.dt[k][ch]) + bias;
      if (a.delta_softplus) dt = softplus_fma(dt);
      float const u = to_f(st.u[k][ch]);
      float const du = dt * u;
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        if (n < N) {
          h[n] = fmaf(ex2_approx(dt * A2[n]), h[n], du * bck[n]);
          if constexpr (kWrites) {
            if (n & 1) y1 = fmaf(h[n], bck[kN + n], y1);
            else y0 = fmaf(h[n], bck[kN + n], y0);
          }
        }
      }
      if constexpr (kWrites) {
        float y = y0 + y1 + Dd * u;
        if (has_z) {
          float const zz = to_f(st.z[k][ch]);
          y = silu_gate_fma(y, zz);
        }
        a.out[(row0 + t + k) * a.ld_out + d] = from_f<TS>(y);
      } else {
        dsum += dt;
      }
    }
  };

  // Tile pipeline: tiles s + 1 .. s + kStages - 2 in flight while tile s computes; one block
  // barrier per tile: after it tile s is visible to every thread and every thread is past tile
  // s - 1, whose stage the copies issued next refill.
  int const n_tiles = (t1 - t0 + kTileT - 1) / kTileT;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) issue(s, t0 + s * kTileT);
    else __pipeline_commit();  // empty group: wait_prior counts groups
  }
  for (int s = 0; s < n_tiles; ++s) {
    int const t = t0 + s * kTileT;
    __pipeline_wait_prior(kStages - 2);  // tile s has landed (this thread's copies)
    __syncthreads();
    if (int const sn = s + kStages - 1; sn < n_tiles) issue(sn % kStages, t0 + sn * kTileT);
    else __pipeline_commit();
    Stage<kN, TS> const& st = stages[s % kStages];
    int const nt = min(kTileT, t1 - t);
    if constexpr (!kFloat) {
      // bf16: this tile's B / C rows to float, into this warp's copy (the warp read its previous
      // copy in program order before; __syncwarp orders the lanes' writes before the reads).
      int const lane = tid & 31;
      if constexpr (kExact) {
        constexpr int W = (kWrites) ? 2 * kN : kN;  // kReduce needs no C
        constexpr int G = W / 8;                                   // 8-element groups per row
        for (int i = lane; i < nt * G; i += 32) {
          int const k = i / G, j = (i % G) * 8;
          uint4 const w = *reinterpret_cast<uint4 const*>(&st.bc[k][j]);
          unsigned const v[4] = {w.x, w.y, w.z, w.w};
          float f[8];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            f[2 * q] = __uint_as_float(v[q] << 16);             // low bf16 of the pair
            f[2 * q + 1] = __uint_as_float(v[q] & 0xffff0000u);  // high bf16
          }
          float4* dst = reinterpret_cast<float4*>(&bcf->bc[k][j]);
          dst[0] = make_float4(f[0], f[1], f[2], f[3]);
          dst[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
      } else {
        int const per_row = (kWrites) ? 2 * N : N;
        for (int i = lane; i < nt * per_row; i += 32) {
          int const k = i / per_row, j = i - k * per_row;
          int const cj = j < N ? j : kN + (j - N);
          bcf->bc[k][cj] = to_f(st.bc[k][cj]);
        }
      }
      __syncwarp();
    }
    if constexpr (kExact) {
      if (nt == kTileT)
        tile_exact(st, t, std::integral_constant<bool, false>{});
      else
        tile_exact(st, t, std::integral_constant<bool, true>{});
    } else {
      if (active) tile_general(st, t, nt);
    }
    if constexpr (!kFloat) __syncwarp();  // the warp's reads of bcf before the next widening
  }

  if (!active) return;
  if constexpr (kMode == Mode::kReduce) {
    float* dst = p.h_out.p + b * p.h_out.sb + c * p.h_out.sc + d * p.h_out.sd;
#pragma unroll
    for (int i = 0; i < kNT; ++i)
      if (n0 + i < N) dst[(n0 + i) * p.h_out.sn] = h[i];
    if (sub == 0) p.dsum[(static_cast<std::int64_t>(b) * p.n_chunks + c) * a.d_inner + d] = dsum;
  } else {
    if (p.h_out.p && c == p.n_chunks - 1) {
      float* dst = p.h_out.p + b * p.h_out.sb + d * p.h_out.sd;
#pragma unroll
      for (int i = 0; i < kNT; ++i)
        if (n0 + i < N) dst[(n0 + i) * p.h_out.sn] = h[i];
    }
  }
}

/// Phase 2 of Chunked: a thread per (batch, state, channel) (the states' recurrences are
/// independent; channels innermost: coalesced). On entry slot c (c < n_chunks-1) holds chunk
/// c's end state from zero; on exit every slot c holds chunk c's carried-in state. The slots and
/// delta sums are loaded kCarryBatch chunks at a time before any is used, so that the chain of
/// n_chunks steps waits for about n_chunks / kCarryBatch memory latencies, not one per step (a
/// thread per channel with its 16 states in a loop exposed one latency per state and chunk:
/// 177 us for 32 chunks at (1, 2048, 8192)).
inline constexpr int kCarryBatch = 8;

template <int kN, class TS = float>
MAMBABYTE_KERNEL void __launch_bounds__(kThreads) carry_chunks(ScanParams<TS> const p) {
  auto const& a = p.a;
  int const N = a.d_state;
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= static_cast<std::int64_t>(N) * a.d_inner) return;
  int const n = static_cast<int>(i / a.d_inner), d = static_cast<int>(i % a.d_inner);
  int const b = blockIdx.z;
  constexpr float kLog2e = 1.4426950408889634f;
  float const A2 = a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e;
  float carry = a.initial_state ? a.initial_state[(static_cast<std::int64_t>(b) * a.d_inner + d) * N + n] : 0.f;
  StateView const& ws = p.h_out;
  float* const slot = ws.p + b * ws.sb + d * ws.sd + n * ws.sn;  // chunk c at slot[c * ws.sc]
  float const* const dsum = p.dsum + static_cast<std::int64_t>(b) * p.n_chunks * a.d_inner + d;  // c: [c * d_inner]
  int const last = p.n_chunks - 1;
  for (int c0 = 0; c0 < last; c0 += kCarryBatch) {
    float loc[kCarryBatch], ds[kCarryBatch];
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      if (c0 + j < last) {
        loc[j] = slot[(c0 + j) * ws.sc];
        ds[j] = dsum[static_cast<std::int64_t>(c0 + j) * a.d_inner];
      }
    }
#pragma unroll
    for (int j = 0; j < kCarryBatch; ++j) {
      if (c0 + j < last) {
        slot[(c0 + j) * ws.sc] = carry;
        carry = fmaf(ex2_approx(ds[j] * A2), carry, loc[j]);
      }
    }
  }
  slot[last * ws.sc] = carry;
}

}  // namespace kernel

/// Workspace of a chunked run: per (batch, reduce slot, state, channel) one state, then per
/// (batch, reduce slot, channel) one delta sum. Reduce slots: the reduce pass's sub-chunks
/// (reduce_split per chunk, over every chunk but the last) plus one for the last chunk.
inline std::size_t chunked_workspace_bytes(int batch, int length, int d_inner, int d_state,
                                           int chunk_len, int reduce_split = 1) {
  if (batch <= 0 || length <= 0) return 0;
  std::size_t const chunks = (static_cast<std::size_t>(length) + chunk_len - 1) / chunk_len;
  if (chunks <= 1) return 0;
  std::size_t const slots = (chunks - 1) * static_cast<std::size_t>(std::max(1, reduce_split)) + 1;
  return static_cast<std::size_t>(batch) * slots * d_inner * (d_state + 1) * sizeof(float);
}

template <int kN, bool kExact, int kSplit, Mode kMode, class TS = float>
auto* prepare_scan_kernel() {
  constexpr std::size_t smem = scan_smem_bytes<kN, TS, kSplit>();
  static_assert(smem <= 227 * 1024, "stage too large");
  auto* fn = &kernel::scan_chunk<kN, kExact, kSplit, kMode, TS>;
  if constexpr (smem > 48 * 1024)
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
  return fn;
}

template <int kN, bool kExact, int kSplit, Mode kMode, class TS>
void launch_scan(ScanParams<TS> const& p, dim3 grid, cudaStream_t stream) {
  auto* fn = prepare_scan_kernel<kN, kExact, kSplit, kMode, TS>();
  fn<<<grid, kThreads * kSplit, scan_smem_bytes<kN, TS, kSplit>(), stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// chunk_len >= length: one chunk (no workspace). split_single: threads per channel for that
/// single-chunk launch (kExact only; 1 or kSplitSequential). reduce_split: the reduce pass
/// cuts every chunk (but the last) into this many sub-chunks (chunk_len a multiple of it), so
/// that its blocks fill the SMs when the chunks alone do not; the carry pass then chains the
/// sub-chunks and the write pass reads every reduce_split-th carried state.
template <int kN, bool kExact, class TS>
void run_impl(MixedScanArguments<TS> const& a, int chunk_len, void* ws, bool split_single,
              int reduce_split, cudaStream_t stream) {
  int const blocks_d = (a.d_inner + kThreads - 1) / kThreads;
  int const n_chunks = (a.length + chunk_len - 1) / chunk_len;
  require(a.batch <= 65535 && n_chunks <= 65535, "selective scan (CUDA): batch ", a.batch,
          " or chunk count ", n_chunks, " exceeds the grid limit 65535 (use longer chunks)");
  ScanParams<TS> p;
  p.a = a;
  p.ck = a.checkpoints;
  require(!a.checkpoints || reinterpret_cast<std::uintptr_t>(a.checkpoints) % 16 == 0,
          "selective scan (CUDA): checkpoints must be 16-byte aligned");
  require(!a.checkpoints || n_chunks <= 1 || chunk_len % kCheckpointInterval == 0,
          "selective scan (CUDA): checkpoints need a chunk length that is a multiple of ", kCheckpointInterval,
          " (got ", chunk_len, ")");
  if constexpr (!std::is_same_v<TS, float>) {
    p.vec_x = rows_aligned16(a.u, a.ld_u) && rows_aligned16(a.delta, a.ld_delta) &&
              rows_aligned16(a.z, a.ld_z);
    p.vec_bc = rows_aligned16(a.B, a.ld_B) && rows_aligned16(a.C, a.ld_C);
  }
  std::int64_t const DN = static_cast<std::int64_t>(a.d_inner) * a.d_state;
  StateView init{const_cast<float*>(a.initial_state), DN, 0, a.d_state, 1};
  StateView fin{a.final_state, DN, 0, a.d_state, 1};
  if (n_chunks <= 1) {
    p.chunk_len = a.length;
    p.n_chunks = 1;
    p.h_in = init;
    p.h_out = fin;
    dim3 const grid(blocks_d, 1, a.batch);
    if constexpr (kExact) {
      if (split_single) {
        if (p.ck) launch_scan<kN, kExact, kSplitSequential, Mode::kWriteCk>(p, grid, stream);
        else launch_scan<kN, kExact, kSplitSequential, Mode::kWrite>(p, grid, stream);
        return;
      }
    }
    if (p.ck) launch_scan<kN, kExact, 1, Mode::kWriteCk>(p, grid, stream);
    else launch_scan<kN, kExact, 1, Mode::kWrite>(p, grid, stream);
    return;
  }
  require(ws != nullptr, "selective scan (CUDA, chunked): null workspace");
  int const m = std::max(1, reduce_split);
  require(chunk_len % m == 0, "selective scan (CUDA, chunked): chunk length ", chunk_len,
          " not a multiple of the reduce split ", m);
  int const nr = (n_chunks - 1) * m + 1;  // reduce sub-chunks, plus the last chunk's slot
  require(nr <= 65535, "selective scan (CUDA): reduce sub-chunk count ", nr, " exceeds 65535");
  p.chunk_len = chunk_len / m;
  p.n_chunks = nr;
  // Workspace states, channel-innermost so that a warp's accesses are coalesced.
  StateView slots{static_cast<float*>(ws), nr * DN, DN, 1, a.d_inner};
  p.dsum = static_cast<float*>(ws) + static_cast<std::size_t>(a.batch) * nr * DN;
  p.h_out = slots;
  launch_scan<kN, kExact, 1, Mode::kReduce>(p, dim3(blocks_d, nr - 1, a.batch), stream);
  std::int64_t const carry_threads = static_cast<std::int64_t>(a.d_state) * a.d_inner;
  kernel::carry_chunks<kN, TS>
      <<<dim3(static_cast<unsigned>((carry_threads + kThreads - 1) / kThreads), 1, a.batch), kThreads, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  p.chunk_len = chunk_len;
  p.n_chunks = n_chunks;
  p.h_in = StateView{slots.p, slots.sb, m * DN, slots.sd, slots.sn};  // chunk c enters at sub-chunk c m
  p.h_out = fin;
  if (p.ck) launch_scan<kN, kExact, 1, Mode::kWriteCk>(p, dim3(blocks_d, n_chunks, a.batch), stream);
  else launch_scan<kN, kExact, 1, Mode::kWrite>(p, dim3(blocks_d, n_chunks, a.batch), stream);
}

/// Runs the scan for float or bf16 storage (MixedScanArguments<float> is the float scan).
template <class TS>
void run(MixedScanArguments<TS> const& a, int chunk_len, void* ws, bool split_single, Cuda const& be,
         int reduce_split = 1) {
  static_assert(is_scan_storage_v<TS>, "CUDA scan storage: float or __nv_bfloat16");
  ScopedDevice guard(be.device);
  if (a.d_state == 16)
    run_impl<16, true>(a, chunk_len, ws, split_single, reduce_split, be.stream);  // the model's d_state
  else
    run_impl<kMaxState, false>(a, chunk_len, ws, false, reduce_split, be.stream);
}

inline void run(ssm::SelectiveScanArguments<float> const& a, int chunk_len, void* ws,
                bool split_single, Cuda const& be, int reduce_split = 1) {
  run(to_mixed(a), chunk_len, ws, split_single, be, reduce_split);
}

/// Resident blocks per SM of the chunked scans' write kernel (their occupancy limit), for
/// storage type TS.
template <class TS = float>
int chunk_blocks_per_sm(int d_state, int device) {
  ScopedDevice guard(device);
  int n = 0;
  if (d_state == 16) {
    auto* fn = prepare_scan_kernel<16, true, 1, Mode::kWrite, TS>();
    MAMBABYTE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, fn, kThreads, scan_smem_bytes<16, TS>()));
  } else {
    auto* fn = prepare_scan_kernel<kMaxState, false, 1, Mode::kWrite, TS>();
    MAMBABYTE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, fn, kThreads, scan_smem_bytes<kMaxState, TS>()));
  }
  return std::max(n, 1);
}

inline int sm_count(int device) {
  int n = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

/// The Arguments of SelectiveScan<Cuda, TS, *>: the ssm struct for float (unchanged API), the
/// mixed one for bf16.
template <class TS>
using ArgumentsFor = std::conditional_t<std::is_same_v<TS, float>, ssm::SelectiveScanArguments<float>,
                                        MixedScanArguments<TS>>;

/// What the CUDA SelectiveScan<Cuda, TS, *> run / workspace_bytes / can_implement take: their
/// Arguments, and for float also MixedScanArguments<float> (the same fields plus checkpoints).
template <class A, class TS>
concept ScanArgsFor = std::is_same_v<A, ArgumentsFor<TS>> || std::is_same_v<A, MixedScanArguments<TS>>;

/// Whether a's checkpoints output is set (the ssm struct has none).
template <class A>
bool wants_checkpoints(A const& a) {
  if constexpr (requires { a.checkpoints; }) return a.checkpoints != nullptr;
  else return false;
}

}  // namespace mambabyte::backend::cuda::scan_detail

namespace mambabyte::ssm {

/// The rule behind scan::Auto on CUDA: the time chunk length, or 0 for one chunk.
/// `wave` = SMs x resident blocks per SM of the scan kernel. The single-chunk scan does the
/// fewest exponentials (one per state per step) but has only batch x channel-blocks blocks
/// (kThreads channels each): while those do not fill one wave, the SMs hold few warps and the
/// time loop is latency-bound. The chunked scan does about 1.9x the exponentials but can fill
/// the wave. Measured (docs/cuda.md, run 117: every policy at batch 1-16 x length 2048-32768):
///  - one chunk once the channel blocks fill a wave, or fill more than 2/5 of it (then the
///    single chunk with two threads per channel, auto_split_single, beat 2 chunks by 12-16%);
///  - the shortest chunks (256 steps) when a wave would need 8 chunks or more (many waves of
///    short chunks beat one wave of long ones by 2-9% there);
///  - else as many chunks as fit in one wave (floor(wave / blocks));
///  chunks a multiple of 64 steps and at least 256 long; lengths under 512: one chunk.
inline int resolve_auto_cuda(int batch, int length, int d_inner, int wave) {
  long const blocks = static_cast<long>(batch) *
                      ((d_inner + backend::cuda::scan_detail::kThreads - 1) /
                       backend::cuda::scan_detail::kThreads);
  if (blocks >= wave || length < 512 || 5 * blocks > 2L * wave) return 0;
  long const chunks = wave / blocks;  // >= 2 here
  long chunk = chunks >= 8 ? 256 : (length + chunks - 1) / chunks;
  chunk = std::max(256L, (chunk + 63) / 64 * 64);
  return chunk >= length ? 0 : static_cast<int>(chunk);
}

/// Whether Auto's single chunk (resolve_auto_cuda == 0) runs two threads per channel (as
/// scan::Sequential does): while the channel blocks do not fill a wave (more warps per SM for
/// the latency-bound time loop); once they do, one thread per channel (fewer instructions).
inline bool auto_split_single(int batch, int d_inner, int wave) {
  long const blocks = static_cast<long>(batch) *
                      ((d_inner + backend::cuda::scan_detail::kThreads - 1) /
                       backend::cuda::scan_detail::kThreads);
  return blocks < wave;
}

/// Auto's reduce split for a chunked run of `chunk_len` (see scan_detail::run_impl): when the
/// reduce pass's (chunks - 1) x channel-blocks blocks fill at most half a wave, it cuts each
/// chunk into as many sub-chunks as fit in the wave (sub-chunks of whole tiles, >= 256 steps).
/// Its time is one sweep of a sub-chunk at the same low occupancy: latency-bound, so shorter
/// sweeps are proportionally faster. 1 = no split.
inline int resolve_auto_reduce_split(int batch, int length, int d_inner, int chunk_len, int wave) {
  namespace sd = backend::cuda::scan_detail;
  if (chunk_len <= 0 || chunk_len >= length) return 1;
  long const blocks = static_cast<long>(batch) * ((d_inner + sd::kThreads - 1) / sd::kThreads);
  long const reduce_blocks = ((length + chunk_len - 1) / chunk_len - 1) * blocks;
  if (reduce_blocks <= 0 || 2 * reduce_blocks > wave) return 1;
  for (long m = wave / reduce_blocks; m > 1; --m)
    if (chunk_len % m == 0 && (chunk_len / m) % sd::kTileT == 0 && chunk_len / m >= 256) return static_cast<int>(m);
  return 1;
}

/// Common part of the CUDA specialisations: TS = float (Arguments = SelectiveScanArguments<float>)
/// or __nv_bfloat16 (Arguments = backend::cuda::MixedScanArguments<__nv_bfloat16>).
template <class Derived, class TS = float>
struct CudaSelectiveScanBase {
  using Arguments = backend::cuda::scan_detail::ArgumentsFor<TS>;
  /// Whether Derived's forward writes MixedScanArguments::checkpoints (its kWritesCheckpoints;
  /// a policy that does not say does not).
  static constexpr bool writes_checkpoints() {
    if constexpr (requires { Derived::kWritesCheckpoints; }) return Derived::kWritesCheckpoints;
    else return false;
  }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static Status can_implement(A const& a) {
    Status const st = validate(a);
    if (st != Status::kSuccess) return st;
    if (a.d_state > backend::cuda::scan_detail::kMaxState) return Status::kUnsupported;
    if (backend::cuda::scan_detail::wants_checkpoints(a) && !writes_checkpoints()) return Status::kUnsupported;
    return Status::kSuccess;
  }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static void check(A const& a) {
    Status const st = can_implement(a);
    require(st == Status::kSuccess, "selective scan (CUDA): cannot run (", to_string(st),
            ") batch=", a.batch, " length=", a.length, " d_inner=", a.d_inner,
            " d_state=", a.d_state, backend::cuda::scan_detail::wants_checkpoints(a) && !writes_checkpoints()
                                        ? " (this policy does not write checkpoints)"
                                        : "");
  }
  /// Run with an internally allocated workspace (cudaMalloc; synchronises the stream).
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static void run(A const& a, backend::Cuda const& be) {
    std::size_t const bytes = Derived::workspace_bytes(a, be);
    backend::cuda::DeviceBuffer<std::byte> ws(bytes, be);
    Derived::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));  // before ws is freed
  }
};

template <class TS>
struct SelectiveScan<backend::Cuda, TS, scan::Sequential,
                     std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, TS, scan::Sequential>, TS> {
  using Base = CudaSelectiveScanBase<SelectiveScan, TS>;
  using typename Base::Arguments;
  using Base::run;
  static constexpr bool kWritesCheckpoints = true;
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static std::size_t workspace_bytes(A const&, backend::Cuda const&) { return 0; }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static void run(A const& a, void*, backend::Cuda const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cuda::scan_detail::run(backend::cuda::to_mixed(a), a.length, nullptr,
                                    /*split_single=*/true, be);
  }
};

template <class TS, int ChunkLen>
struct SelectiveScan<backend::Cuda, TS, scan::Chunked<ChunkLen>,
                     std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, TS, scan::Chunked<ChunkLen>>, TS> {
  using Base = CudaSelectiveScanBase<SelectiveScan, TS>;
  using typename Base::Arguments;
  using Base::run;
  static constexpr bool kWritesCheckpoints = ChunkLen % backend::cuda::kCheckpointInterval == 0;
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static std::size_t workspace_bytes(A const& a, backend::Cuda const&) {
    return backend::cuda::scan_detail::chunked_workspace_bytes(a.batch, a.length, a.d_inner,
                                                               a.d_state, ChunkLen);
  }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static void run(A const& a, void* ws, backend::Cuda const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cuda::scan_detail::run(backend::cuda::to_mixed(a), ChunkLen, ws,
                                    /*split_single=*/true, be);
  }
};

/// scan::Auto: resolve_auto_cuda() picks Sequential or a chunk length on the host (the wave
/// from the occupancy of the storage type's own kernel).
template <class TS>
struct SelectiveScan<backend::Cuda, TS, scan::Auto, std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, TS, scan::Auto>, TS> {
  using Base = CudaSelectiveScanBase<SelectiveScan, TS>;
  using typename Base::Arguments;
  using Base::run;
  static constexpr bool kWritesCheckpoints = true;  // its chunks are multiples of 64 steps
  /// Auto's choice for these arguments: chunk length (0: Sequential) and reduce split.
  struct Plan {
    int chunk = 0, split = 1;
    bool split_single = false;  ///< one chunk: two threads per channel (auto_split_single)
  };
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static Plan plan(A const& a, backend::Cuda const& be) {
    if (a.batch <= 0 || a.length <= 0) return {};
    namespace sd = backend::cuda::scan_detail;
    int const wave = sd::sm_count(be.device) * sd::chunk_blocks_per_sm<TS>(a.d_state, be.device);
    Plan p;
    p.chunk = resolve_auto_cuda(a.batch, a.length, a.d_inner, wave);
    if (p.chunk != 0) p.split = resolve_auto_reduce_split(a.batch, a.length, a.d_inner, p.chunk, wave);
    else p.split_single = auto_split_single(a.batch, a.d_inner, wave);
    return p;
  }
  /// Chunk length Auto uses for these arguments (0: Sequential).
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static int choose(A const& a, backend::Cuda const& be) { return plan(a, be).chunk; }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static std::size_t workspace_bytes(A const& a, backend::Cuda const& be) {
    Plan const p = plan(a, be);
    return p.chunk == 0 ? 0
                        : backend::cuda::scan_detail::chunked_workspace_bytes(a.batch, a.length, a.d_inner,
                                                                              a.d_state, p.chunk, p.split);
  }
  template <backend::cuda::scan_detail::ScanArgsFor<TS> A>
  static void run(A const& a, void* ws, backend::Cuda const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    Plan const p = plan(a, be);
    backend::cuda::scan_detail::run(backend::cuda::to_mixed(a), p.chunk == 0 ? a.length : p.chunk, ws,
                                    p.split_single, be, p.split);
  }
};

}  // namespace mambabyte::ssm
