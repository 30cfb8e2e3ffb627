/*! \file
 *  \brief CUDA specialisations of ssm::SelectiveScanBackward for float (fp32 storage, state and
 *         math; device pointers): scan::Sequential, scan::Chunked<L> and scan::Auto.
 *
 *  Math and argument semantics: ssm/selective_scan_backward.hpp (activation gradients written,
 *  dA / dD / ddelta_bias accumulated, ddelta w.r.t. the raw delta before bias and softplus).
 *
 *  Two threads per (batch, channel) (kBwdSplit; each holds d_state/2 states in registers),
 *  kBwdCh = 64 channels of one batch and one time segment per block (4 warps). Launches on
 *  be.stream:
 *   1. kernel::bwd_local (a block per segment, plus one per segment > 0): the forward
 *      recurrence from the segment's entering state (initial_state or zero), storing the state
 *      entering every chunk of kBwdChunk = 4 steps (checkpoints, states innermost); for
 *      segments > 0 of time-parallel runs (Chunked<L>, Auto on few channel blocks) other
 *      blocks of the same launch run the adjoint recurrence from a zero carry over the segment
 *      (it needs only dy, C and the decays), and the forward blocks keep the segment's sum of
 *      deltas. Tiles staged kLocalRaw deep (the per-tile work is short);
 *      kernel::bwd_seg_carry then carries both across segments (decay of a segment =
 *      exp(A sum delta)): each segment's entering state and its adjoint carry from the end.
 *   2. kernel::bwd_scan (per segment): tiles of 8 steps last to first, staged by cp.async and
 *      widened once per block (softplus, sigmoid, dy = dout silu(z) per (step, channel)); per
 *      chunk: the entering state (checkpoint, corrected by the segment's entering state), a
 *      forward recompute keeping h_{t-1} in registers (computing dz and out), then the reverse
 *      sweep g_t = C_t dy_t + a_{t+1} g_{t+1} with a_t = exp(dt A) evaluated again (computing
 *      du and ddelta) accumulating dA, dD, ddelta_bias per thread. The four outputs
 *      are staged in place in the widened tile and written as rows of 4-element vectors when
 *      the next tile is widened (by the thread that widens those slots). dB_t / dC_t (sums over
 *      channels): per warp through shared memory two steps at a time (bwd_xr_put /
 *      bwd_xr_sum), the block's warps summed in order into one partial row per channel block.
 *      Full chunks run unguarded straight-line code.
 *   3. kernel::bwd_reduce_bc: dB / dC rows = the channel blocks' partials summed in block order.
 *   4. kernel::bwd_reduce_params: dA, dD, ddelta_bias += the per-(batch, segment) partials, in order.
 *  Given the forward's states (MixedScanBackwardArguments::checkpoints: the forward scan wrote
 *  the state entering every 4th step, MixedScanArguments::checkpoints), bwd_scan reads them in
 *  place of ck (true states: no entering-state correction), bwd_local runs only the adjoint
 *  blocks of segments > 0, each over a piece of its segment (local_split(): segments of 256
 *  steps or more split into pieces of at least 128, up to 8 per segment; the last segment's may
 *  be shorter or empty; so that the pass has blocks enough when the segments are few; they also
 *  sum their pieces' deltas for the carry), bwd_seg_carry composes the pieces into the adjoint
 *  carries, and the workspace has no checkpoint or per-chunk delta-sum part:
 *  2 exponentials per state-step with one segment, ~3 with segments.
 *  No atomics: results are bitwise deterministic for a given device, shape and policy.
 *  Exponentials per state-step: 3 with one segment (checkpoint pass, recompute, reverse sweep),
 *  ~4.5 with segments (plus the local adjoint of every segment but the first). The scan pass is
 *  bound by shared memory (Nsight Compute: L1 / shared 85% busy, the MUFU pipe ~20%), so it
 *  evaluates a_t in both of its sweeps rather than passing it through shared memory.
 *
 *  Workspace (floats; S = segments): batch x ceil(L/4) x d_inner x d_state (checkpoints; not
 *  with the forward's states)
 *    + ceil(d_inner/64) x batch x L x 2 kN (dB / dC partials; kN = 16 for d_state <= 16, else 32)
 *    + batch x S x d_inner x (d_state + 2) (parameter partials)
 *    + (S > 1, not with the forward's states) batch x ceil(L/4) x d_inner (delta sums)
 *    + (S > 1) batch x S x d_inner x (2 d_state + 1)
 *    (segment states, carries, delta sums; with the forward's states batch x d_inner x
 *    (S d_state + (S - 1) x pieces x (d_state + 1)): carries, the pieces' adjoints and delta sums).
 *  About 2.6 GB at (8, 2048, 8192, 16). d_state <= 32 (16: exact fast path); more: kUnsupported.
 *
 *  bf16 storage: ssm::SelectiveScanBackward<backend::Cuda, __nv_bfloat16, Policy> (same
 *  policies) takes backend::cuda::MixedScanBackwardArguments<__nv_bfloat16>: the activations
 *  (u, delta, B, C, z, dout) and the activation gradients (du, ddelta, dB, dC, dz, out) are
 *  __nv_bfloat16; the parameters (A, D, delta_bias), the states (initial_state, dfinal_state,
 *  dinitial_state), the parameter gradients (dA, dD, ddelta_bias) and the workspace float.
 *  The kernels are the float ones templated on the storage type TS: loads widen to fp32 (all
 *  math, recomputed states and accumulators fp32), stores round to bf16 once (dB / dC after
 *  the fp32 reduction over channels). The float specialisations map their
 *  ssm::SelectiveScanBackwardArguments<float> onto MixedScanBackwardArguments<float>, whose
 *  code is the fp32 path unchanged.
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
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/ssm/selective_scan_backward.hpp"

namespace mambabyte::backend::cuda {

/// Arguments of the CUDA scan backward with activations and activation gradients stored as TS
/// (float or __nv_bfloat16), parameters, states and parameter gradients in float. Same fields,
/// meaning and conventions as ssm::SelectiveScanBackwardArguments (see
/// ssm/selective_scan_backward.hpp); all pointers are device memory.
template <class TS>
struct MixedScanBackwardArguments {
  int batch = 0, length = 0, d_inner = 0, d_state = 0;
  // ---- forward inputs (as given to the forward) ----
  TS const* u = nullptr;          std::int64_t ld_u = 0;      ///< (batch, length, d_inner)
  TS const* delta = nullptr;      std::int64_t ld_delta = 0;  ///< (batch, length, d_inner), before bias
  float const* delta_bias = nullptr;                          ///< (d_inner) or null
  bool delta_softplus = true;
  float const* A = nullptr;                                   ///< (d_inner, d_state)
  TS const* B = nullptr;          std::int64_t ld_B = 0;      ///< (batch, length, d_state)
  TS const* C = nullptr;          std::int64_t ld_C = 0;      ///< (batch, length, d_state)
  float const* D = nullptr;                                   ///< (d_inner) or null
  TS const* z = nullptr;          std::int64_t ld_z = 0;      ///< (batch, length, d_inner) or null
  float const* initial_state = nullptr;                       ///< (batch, d_inner, d_state) or null
  /// Optional: the states the forward stored for this backward (MixedScanArguments::checkpoints
  /// of the same inputs, [batch][ceil(length / 4)][d_inner][d_state]). Given, the backward
  /// starts from them and skips its own forward sweep (the checkpoint pass: one exponential per
  /// state and step, and 4 bytes per state every 4 steps written and read back); null: it
  /// recomputes them.
  float const* checkpoints = nullptr;
  // ---- incoming gradients ----
  TS const* dout = nullptr;       std::int64_t ld_dout = 0;   ///< dL/dout (batch, length, d_inner)
  float const* dfinal_state = nullptr;                        ///< (batch, d_inner, d_state) or null
  // ---- activation gradients: written ----
  TS* du = nullptr;               std::int64_t ld_du = 0;     ///< (batch, length, d_inner)
  TS* ddelta = nullptr;           std::int64_t ld_ddelta = 0; ///< w.r.t. the raw delta
  TS* dB = nullptr;               std::int64_t ld_dB = 0;     ///< (batch, length, d_state)
  TS* dC = nullptr;               std::int64_t ld_dC = 0;     ///< (batch, length, d_state)
  TS* dz = nullptr;               std::int64_t ld_dz = 0;     ///< required when z is given
  float* dinitial_state = nullptr;                            ///< (batch, d_inner, d_state) or null
  TS* out = nullptr;              std::int64_t ld_out = 0;    ///< optional: the forward output, recomputed
  // ---- parameter gradients: accumulated (+=) over batch and time ----
  float* dA = nullptr;                                        ///< (d_inner, d_state), required
  float* dD = nullptr;                                        ///< (d_inner) or null; needs D
  float* ddelta_bias = nullptr;                               ///< (d_inner) or null; needs delta_bias

  /// The forward inputs of `f` (its outputs out / final_state are not copied).
  static MixedScanBackwardArguments from_forward(MixedScanArguments<TS> const& f) {
    MixedScanBackwardArguments a;
    a.batch = f.batch; a.length = f.length; a.d_inner = f.d_inner; a.d_state = f.d_state;
    a.u = f.u; a.ld_u = f.ld_u;
    a.delta = f.delta; a.ld_delta = f.ld_delta; a.delta_bias = f.delta_bias; a.delta_softplus = f.delta_softplus;
    a.A = f.A;
    a.B = f.B; a.ld_B = f.ld_B;
    a.C = f.C; a.ld_C = f.ld_C;
    a.D = f.D;
    a.z = f.z; a.ld_z = f.ld_z;
    a.initial_state = f.initial_state;
    a.checkpoints = f.checkpoints;
    return a;
  }

  /// The forward arguments these inputs describe (out / final_state as given).
  MixedScanArguments<TS> forward(TS* fwd_out, std::int64_t ld_fwd_out, float* final_state = nullptr) const {
    MixedScanArguments<TS> f;
    f.batch = batch; f.length = length; f.d_inner = d_inner; f.d_state = d_state;
    f.u = u; f.ld_u = ld_u; f.delta = delta; f.ld_delta = ld_delta; f.delta_bias = delta_bias;
    f.delta_softplus = delta_softplus; f.A = A; f.B = B; f.ld_B = ld_B; f.C = C; f.ld_C = ld_C;
    f.D = D; f.z = z; f.ld_z = ld_z; f.out = fwd_out; f.ld_out = ld_fwd_out;
    f.initial_state = initial_state; f.final_state = final_state;
    return f;
  }
};

/// The checks of ssm::validate(SelectiveScanBackwardArguments) for the mixed arguments.
template <class TS>
Status validate(MixedScanBackwardArguments<TS> const& a) {
  if (a.batch < 0 || a.length < 0 || a.d_inner <= 0 || a.d_state <= 0) return Status::kInvalidArgument;
  if (!a.A || !a.dA) return Status::kInvalidArgument;
  if (a.dD && !a.D) return Status::kInvalidArgument;
  if (a.ddelta_bias && !a.delta_bias) return Status::kInvalidArgument;
  if (a.batch == 0 || a.length == 0) return Status::kSuccess;
  if (!a.u || !a.delta || !a.B || !a.C || !a.dout) return Status::kInvalidArgument;
  if (!a.du || !a.ddelta || !a.dB || !a.dC) return Status::kInvalidArgument;
  if (a.z && !a.dz) return Status::kInvalidArgument;
  if (a.dz && !a.z) return Status::kInvalidArgument;
  if (a.ld_u < a.d_inner || a.ld_delta < a.d_inner || a.ld_dout < a.d_inner || a.ld_du < a.d_inner ||
      a.ld_ddelta < a.d_inner)
    return Status::kInvalidArgument;
  if (a.ld_B < a.d_state || a.ld_C < a.d_state || a.ld_dB < a.d_state || a.ld_dC < a.d_state)
    return Status::kInvalidArgument;
  if (a.z && (a.ld_z < a.d_inner || a.ld_dz < a.d_inner)) return Status::kInvalidArgument;
  if (a.out && a.ld_out < a.d_inner) return Status::kInvalidArgument;
  return Status::kSuccess;
}

/// The float backward arguments as MixedScanBackwardArguments<float> (field by field).
inline MixedScanBackwardArguments<float> to_mixed(ssm::SelectiveScanBackwardArguments<float> const& f) {
  MixedScanBackwardArguments<float> a;
  a.batch = f.batch; a.length = f.length; a.d_inner = f.d_inner; a.d_state = f.d_state;
  a.u = f.u; a.ld_u = f.ld_u;
  a.delta = f.delta; a.ld_delta = f.ld_delta; a.delta_bias = f.delta_bias; a.delta_softplus = f.delta_softplus;
  a.A = f.A;
  a.B = f.B; a.ld_B = f.ld_B;
  a.C = f.C; a.ld_C = f.ld_C;
  a.D = f.D;
  a.z = f.z; a.ld_z = f.ld_z;
  a.initial_state = f.initial_state;
  a.dout = f.dout; a.ld_dout = f.ld_dout;
  a.dfinal_state = f.dfinal_state;
  a.du = f.du; a.ld_du = f.ld_du;
  a.ddelta = f.ddelta; a.ld_ddelta = f.ld_ddelta;
  a.dB = f.dB; a.ld_dB = f.ld_dB;
  a.dC = f.dC; a.ld_dC = f.ld_dC;
  a.dz = f.dz; a.ld_dz = f.ld_dz;
  a.dinitial_state = f.dinitial_state;
  a.out = f.out; a.ld_out = f.ld_out;
  a.dA = f.dA; a.dD = f.dD; a.ddelta_bias = f.ddelta_bias;
  return a;
}
inline MixedScanBackwardArguments<float> const& to_mixed(MixedScanBackwardArguments<float> const& a) { return a; }
inline MixedScanBackwardArguments<__nv_bfloat16> const& to_mixed(MixedScanBackwardArguments<__nv_bfloat16> const& a) {
  return a;
}

}  // namespace mambabyte::backend::cuda

namespace mambabyte::backend::cuda::scan_bwd_detail {

using scan_detail::cp_async16;
using scan_detail::ex2_approx;
using scan_detail::from_f;
using scan_detail::load_f;
using scan_detail::rows_aligned16;
using scan_detail::sigmoid_fast;
using scan_detail::softplus_fast;
using scan_detail::to_f;

inline constexpr int kBwdSplit = 2;                       ///< threads per channel (kN / 2 states each)
inline constexpr int kBwdCh = 64;                         ///< channels per block
inline constexpr int kBwdThreads = kBwdCh * kBwdSplit;    ///< threads per block (4 warps)
inline constexpr int kBwdWarps = kBwdThreads / 32;
inline constexpr int kBwdChunk = 4;                       ///< checkpoint interval = recompute chunk (steps)
static_assert(kBwdChunk == kCheckpointInterval, "the forward's checkpoints are the backward's");
inline constexpr int kBwdTile = 2 * kBwdChunk;            ///< steps per staged tile
inline constexpr int kBwdMaxState = 32;                   ///< largest d_state supported
/// Occupancy bounds given to ptxas (resident blocks per SM): the local pass needs few
/// registers (80 for fp32 storage: 6 blocks, which its shared memory also allows; 64 for bf16,
/// whose smaller staged tiles let 8 fit); the scan keeps K x d_state/2 recomputed states per
/// thread in registers.
inline constexpr int kLocalMinBlocks = 6;
inline constexpr int kLocalMinBlocksBf16 = 8;
inline constexpr int kScanMinBlocks = 4;

template <class TS = float>
struct BwdParams {
  MixedScanBackwardArguments<TS> a;
  int n_chunks = 0;        ///< chunks of kBwdChunk steps over the whole length
  int blocks_d = 0;        ///< channel blocks (kBwdCh channels each)
  float* ck = nullptr;     ///< [batch][n_chunks][d_inner][d_state]: state entering each chunk (segment-local)
  float* cum = nullptr;    ///< [batch][n_chunks][d_inner]: sum of deltas from the segment start (n_seg > 1)
  float* bc = nullptr;     ///< [blocks_d][batch][length][2 kN]: dB / dC partial rows
  float* par = nullptr;    ///< [batch][n_seg][d_inner][d_state + 2]: dA, dD, dbias partials
  int n_seg = 1;           ///< time segments (time-parallel runs: > 1)
  int seg_chunks = 0;      ///< chunks per segment
  float* Hs = nullptr;     ///< [batch][n_seg][d_state][d_inner]: local end state -> state entering the segment
  float* Qs = nullptr;     ///< [batch][n_seg][d_state][d_inner]: adjoint carry entering from its end
  float* dsum = nullptr;   ///< [batch][n_seg][d_inner]: sum of deltas per segment
  bool vec_x = false;      ///< u, delta, dout, z rows 16-byte aligned: 16-byte cp.async
  bool vec_bc = false;     ///< B, C rows 16-byte aligned: 16-byte cp.async
  bool vec_out = false;    ///< dz, out, du, ddelta rows aligned to kBwdGroup elements: vector stores
  /// ck holds the forward's checkpoints (a.checkpoints: true states, not segment-local): no
  /// forward sweep in bwd_local, no entering-state correction in bwd_scan, and the adjoint
  /// blocks sum their pieces' deltas for the carry.
  bool given_ck = false;
  /// With the forward's checkpoints: bwd_local's adjoint sweeps run over pieces, loc_split
  /// (local_split()) per segment > 0 (ceil(seg_chunks / loc_split) chunks each; the last ones
  /// may be shorter or empty), so that the pass has enough blocks when the scan's segments are
  /// few; bwd_seg_carry composes the pieces' carries into Qs.
  int loc_split = 1;
  int loc_chunks = 0;      ///< chunks per piece
  float* Ql = nullptr;     ///< [batch][(n_seg - 1) loc_split][d_state][d_inner]: a piece's local adjoint a_t0 g_t0
  float* dsl = nullptr;    ///< [batch][(n_seg - 1) loc_split][d_inner]: a piece's sum of deltas
};

/// Most pieces per segment of the local adjoint pass, and the fewest chunks in a piece.
inline constexpr int kMaxLocalSplit = 8;
inline constexpr int kMinPieceChunks = 32;

/// Pieces per segment of the local adjoint pass with the forward's checkpoints: as many as
/// pieces of at least kMinPieceChunks chunks (128 steps) allow, up to kMaxLocalSplit. The
/// pass's sweeps are latency-bound (a block's time follows its length) and, with the states
/// given, there is one block per channel block and segment > 0 only: 384 blocks of 2048 steps
/// at (4, 2048, 8192, 16), a third of what the SMs hold. Measured there (bf16, run 125): the
/// backward with 1 / 2 / 4 / 8 pieces per segment 2.449-2.456 / 2.399-2.400 / 2.365-2.381 /
/// 2.353-2.357 ms; at (1, 2048, 8192, 16) (512-step segments) 4 pieces 0.651 ms against 0.668-0.670.
/// (n_seg: the segments; the pieces of the segments > 0 are a grid dimension, at most 65535.)
inline int local_split(int seg_chunks, int n_seg) {
  int const f = std::clamp(seg_chunks / kMinPieceChunks, 1, kMaxLocalSplit);
  return std::max(1, std::min(f, 65535 / std::max(1, n_seg - 1)));
}

inline int state_cap(int d_state) { return d_state <= 16 ? 16 : 32; }

/// What a pass stages (bit masks for bwd_issue / bwd_cook).
enum : unsigned { kLdU = 1u, kLdDelta = 2u, kLdDout = 4u, kLdZ = 8u, kLdB = 16u, kLdC = 32u };

/// One tile of inputs as stored (TS): u, delta, dout, z columns of the block's channels, and
/// the B_t, C_t rows (entries past d_state zero).
template <int kN, class TS>
struct alignas(16) BwdRaw {
  TS x[4][kBwdTile][kBwdCh];
  alignas(16) TS bc[kBwdTile][2 * kN];
};

/// The tile widened to float: dt = softplus(delta + bias), u, dy = dout silu(z) per (step,
/// channel) and the B_t, C_t rows (what the local pass uses).
template <int kN>
struct alignas(16) BwdCookedLocal {
  float bias[kBwdCh];  ///< delta_bias of the block's channels (0 past d_inner or without a bias)
  float dt[kBwdTile][kBwdCh];
  float u[kBwdTile][kBwdCh];
  float dy[kBwdTile][kBwdCh];
  alignas(16) float bc[kBwdTile][2 * kN];
};

/// The scan pass's widened tile: also dzf (dz = y dzf), silu (out = y silu) and dsc (softplus'
/// derivative: dv = ddelta dsc), every per-(step, channel) scalar computed once.
template <int kN>
struct alignas(16) BwdCooked : BwdCookedLocal<kN> {
  float dzf[kBwdTile][kBwdCh];
  float silu[kBwdTile][kBwdCh];
  float dsc[kBwdTile][kBwdCh];
};

/// Raw tiles in flight in the local pass (its per-tile work is short: the copies of the next
/// kLocalRaw tiles are in flight while one computes).
inline constexpr int kLocalRaw = 3;

template <int kN, class TS>
struct alignas(16) BwdLocalSmem {
  BwdRaw<kN, TS> raw[kLocalRaw];
  BwdCookedLocal<kN> ck;
};

inline constexpr int kWarpCh = kBwdCh / kBwdWarps;  ///< channels per warp
static_assert(kWarpCh * kBwdSplit == 32, "a warp holds 16 channels x 2 halves");
static_assert(kBwdChunk % 2 == 0, "the channel sums go two steps at a time");

template <int kN>
using BwdXr = float[2][kWarpCh][kN];  ///< one warp's staging: [step of the pair][channel][state]

template <int kN, class TS>
struct alignas(16) BwdScanSmem {
  BwdRaw<kN, TS> raw[1];
  BwdCooked<kN> ck;
  /// Per-warp dB / dC sums of the tile's steps: written by the tile's chunks, summed over the
  /// warps (bwd_scan's flush) between the next tile's two barriers.
  alignas(16) float red[kBwdWarps][kBwdTile][2 * kN];
  alignas(16) BwdXr<kN> xr[kBwdWarps];  ///< per-warp staging of the channel sums (bwd_xr_put / bwd_xr_sum)
  /// The state entering the thread's segment (segments > 0; read once per chunk: kept out of
  /// the registers), [float4 group][thread].
  float4 hs[kN / kBwdSplit / 4][kBwdThreads];
};

/// Copies rows [0, nt) x kBwdCh columns of one (batch, length, d_inner)-shaped tensor, starting
/// at `src` (row t of the tile, channel d0) with leading dimension ld, into dst[kBwdTile][kBwdCh]
/// (columns past `valid_cols` zero-filled). vec: 16-byte cp.async (rows 16-byte aligned).
template <class TS>
__device__ __forceinline__ void bwd_copy_cols(TS (&dst)[kBwdTile][kBwdCh], TS const* src, std::int64_t ld, int nt,
                                              int valid_cols, bool vec) {
  unsigned const tid = threadIdx.x;
  if (vec) {
    constexpr unsigned E = 16 / sizeof(TS);  // elements per 16-byte group
    constexpr unsigned G = kBwdCh / E;       // groups per row
    for (unsigned i = tid; i < static_cast<unsigned>(nt) * G; i += kBwdThreads) {
      unsigned const k = i / G, g = i % G;
      int const valid = min(static_cast<int>(E), valid_cols - static_cast<int>(g * E));
      TS* dptr = &dst[k][g * E];
      if (valid > 0)
        cp_async16(dptr, src + k * ld + g * E, valid * static_cast<int>(sizeof(TS)));
      else
        *reinterpret_cast<uint4*>(dptr) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    for (unsigned i = tid; i < static_cast<unsigned>(nt) * kBwdCh; i += kBwdThreads) {
      unsigned const k = i / kBwdCh, col = i % kBwdCh;
      if (static_cast<int>(col) < valid_cols) {
        if constexpr (std::is_same_v<TS, float>)
          __pipeline_memcpy_async(&dst[k][col], src + k * ld + col, sizeof(float));
        else
          dst[k][col] = src[k * ld + col];
      } else {
        dst[k][col] = from_f<TS>(0.f);
      }
    }
  }
}

/// The widened tile is cooked, and the scan pass's outputs flushed, in groups of kBwdGroup
/// consecutive columns of one row, group i = (i / kBwdGroupsPerRow, its column block) handled by
/// thread i: a thread flushing the outputs of a tile reads exactly the slots it widens next,
/// so the flush needs no barrier before the next tile is widened.
inline constexpr int kBwdGroup = 4;
inline constexpr int kBwdGroupsPerRow = kBwdCh / kBwdGroup;
static_assert(kBwdTile * kBwdGroupsPerRow == kBwdThreads, "a group per thread per tile");

/// kBwdGroup consecutive TS at p (aligned to kBwdGroup elements) widened to float.
template <class TS>
__device__ __forceinline__ float4 load4_f(TS const* p) {
  if constexpr (std::is_same_v<TS, float>) {
    return *reinterpret_cast<float4 const*>(p);
  } else {
    uint2 const w = *reinterpret_cast<uint2 const*>(p);
    float2 const lo = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&w.x));
    float2 const hi = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 const*>(&w.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  }
}

/// Stores row k, columns [c, c + kBwdGroup) of the staged float tile `src` as TS at dst (the
/// tensor's row k, column c), the first `valid` of them only. vec: one kBwdGroup-element store
/// (dst aligned to it).
template <class TS>
__device__ __forceinline__ void bwd_store_group(TS* dst, float const (&src)[kBwdTile][kBwdCh], int k, int c, int valid,
                                                bool vec) {
  float4 const v = *reinterpret_cast<float4 const*>(&src[k][c]);
  if (vec && valid >= kBwdGroup) {
    if constexpr (std::is_same_v<TS, float>) {
      *reinterpret_cast<float4*>(dst) = v;
    } else {
      __nv_bfloat162 const lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
      *reinterpret_cast<uint2*>(dst) =
          make_uint2(*reinterpret_cast<unsigned const*>(&lo), *reinterpret_cast<unsigned const*>(&hi));
    }
  } else {
    float const e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < kBwdGroup; ++j)
      if (j < valid) dst[j] = from_f<TS>(e[j]);
  }
}

/// The same for a half row of B or C (d_state <= kN entries, the rest zero) into dst[k][0..kN).
template <int kN, class TS>
__device__ __forceinline__ void bwd_copy_state_rows(TS (&dst)[kBwdTile][2 * kN], int off, TS const* src,
                                                    std::int64_t ld, int nt, int N, bool vec) {
  unsigned const tid = threadIdx.x;
  if (vec) {
    constexpr unsigned E = 16 / sizeof(TS);
    constexpr unsigned G = kN / E;  // groups per half row (kN multiple of 8)
    for (unsigned i = tid; i < static_cast<unsigned>(nt) * G; i += kBwdThreads) {
      unsigned const k = i / G, g = i % G;
      int const valid = min(static_cast<int>(E), N - static_cast<int>(g * E));
      TS* dptr = &dst[k][off + g * E];
      if (valid > 0)
        cp_async16(dptr, src + k * ld + g * E, valid * static_cast<int>(sizeof(TS)));
      else
        *reinterpret_cast<uint4*>(dptr) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    for (unsigned i = tid; i < static_cast<unsigned>(nt) * kN; i += kBwdThreads) {
      unsigned const k = i / kN, j = i % kN;
      if (static_cast<int>(j) < N) {
        if constexpr (std::is_same_v<TS, float>)
          __pipeline_memcpy_async(&dst[k][off + j], src + k * ld + j, sizeof(float));
        else
          dst[k][off + j] = src[k * ld + j];
      } else {
        dst[k][off + j] = from_f<TS>(0.f);
      }
    }
  }
}

/// Issues the copies of tile rows [t, t + nt) of batch b into `st` (mask: which tensors) and
/// commits them as one cp.async group. Columns past d_inner and B / C entries past d_state are
/// zero-filled; a warp reads consecutive channels of a row.
template <int kN, class TS>
__device__ __forceinline__ void bwd_issue(BwdParams<TS> const& p, BwdRaw<kN, TS>& st, int b, int t, int nt,
                                          unsigned mask) {
  auto const& a = p.a;
  int const d0 = blockIdx.x * kBwdCh;
  int const vc = a.d_inner - d0;
  std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
  if (mask & kLdU) bwd_copy_cols(st.x[0], a.u + row * a.ld_u + d0, a.ld_u, nt, vc, p.vec_x);
  if (mask & kLdDelta) bwd_copy_cols(st.x[1], a.delta + row * a.ld_delta + d0, a.ld_delta, nt, vc, p.vec_x);
  if (mask & kLdDout) bwd_copy_cols(st.x[2], a.dout + row * a.ld_dout + d0, a.ld_dout, nt, vc, p.vec_x);
  if ((mask & kLdZ) && a.z) bwd_copy_cols(st.x[3], a.z + row * a.ld_z + d0, a.ld_z, nt, vc, p.vec_x);
  if (mask & kLdB) bwd_copy_state_rows<kN>(st.bc, 0, a.B + row * a.ld_B, a.ld_B, nt, a.d_state, p.vec_bc);
  if (mask & kLdC) bwd_copy_state_rows<kN>(st.bc, kN, a.C + row * a.ld_C, a.ld_C, nt, a.d_state, p.vec_bc);
  __pipeline_commit();
}

/// Widens the staged tile into `ck`, computing each (step, channel) scalar once (a thread per
/// group of kBwdGroup columns of one row, the channels' delta bias from ck.bias), with the fast
/// softplus / sigmoid (a few ulp, far inside the backward's tolerance; the forward's values are
/// recomputed, not reused). mask: as given to bwd_issue; kFull: also dzf, silu and dsc (the
/// scan pass).
template <bool kFull, int kN, class TS, class Cooked>
__device__ __forceinline__ void bwd_cook(BwdParams<TS> const& p, BwdRaw<kN, TS> const& st, Cooked& ck, int nt,
                                         unsigned mask) {
  auto const& a = p.a;
  int const tid = threadIdx.x;
  bool const has_z = a.z != nullptr;
  bool const sp = a.delta_softplus;
  int const k = tid / kBwdGroupsPerRow, c = (tid % kBwdGroupsPerRow) * kBwdGroup;
  if (k < nt) {
    auto put = [](float (&row)[kBwdCh], int col, float4 v) { *reinterpret_cast<float4*>(&row[col]) = v; };
    float4 const bias = *reinterpret_cast<float4 const*>(&ck.bias[c]);
    float4 const v4 = load4_f(&st.x[1][k][c]);
    float const v[4] = {v4.x + bias.x, v4.y + bias.y, v4.z + bias.z, v4.w + bias.w};
    float dt[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) dt[j] = sp ? softplus_fast(v[j]) : v[j];
    put(ck.dt[k], c, make_float4(dt[0], dt[1], dt[2], dt[3]));
    if (mask & kLdU) put(ck.u[k], c, load4_f(&st.x[0][k][c]));
    if (mask & kLdDout) {
      float4 const o4 = load4_f(&st.x[2][k][c]);
      float const dout[4] = {o4.x, o4.y, o4.z, o4.w};
      float dy[4], silu[4], dzf[4];
      float4 const z4 = has_z ? load4_f(&st.x[3][k][c]) : make_float4(0.f, 0.f, 0.f, 0.f);
      float const zz[4] = {z4.x, z4.y, z4.z, z4.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dy[j] = dout[j];
        silu[j] = 1.f;
        dzf[j] = 0.f;
        if (has_z) {
          float const sig = sigmoid_fast(zz[j]);
          silu[j] = zz[j] * sig;
          dy[j] = dout[j] * silu[j];
          dzf[j] = dout[j] * sig * (1.f + zz[j] * (1.f - sig));
        }
      }
      put(ck.dy[k], c, make_float4(dy[0], dy[1], dy[2], dy[3]));
      if constexpr (kFull) {
        put(ck.dzf[k], c, make_float4(dzf[0], dzf[1], dzf[2], dzf[3]));
        put(ck.silu[k], c, make_float4(silu[0], silu[1], silu[2], silu[3]));
        float dsc[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) dsc[j] = (sp && v[j] <= 20.f) ? sigmoid_fast(v[j]) : 1.f;
        put(ck.dsc[k], c, make_float4(dsc[0], dsc[1], dsc[2], dsc[3]));
      }
    }
  }
  int const lo = (mask & kLdB) ? 0 : kN;
  int const hi = (mask & kLdC) ? 2 * kN : kN;
  int const w = hi - lo;
  for (int i = tid; i < nt * w; i += kBwdThreads) {
    int const k = i / w, j = lo + (i - k * w);
    ck.bc[k][j] = to_f(st.bc[k][j]);
  }
}

/// dB_t / dC_t are sums over channels of per-(channel, state) values. A warp holds 16 channels
/// (lane / 2) x kN states (lane % 2: which half, kN / 2 values per lane); it sums them through
/// its own slice of shared memory, two steps at a time: every lane stores its values as float4
/// quads (bwd_xr_put), then every lane sums one quad over a quarter (kN 16) or half (kN 32) of
/// the channels and a shuffle or two finish the sum (bwd_xr_sum). By the count of the code about
/// 1.7 instructions per value against ~3.75 for a register reduce-scatter (select, shuffle, add
/// per level); Nsight Compute: bwd_scan issued 11% fewer instructions in all.
/// Quad slots are swizzled (q ^ bit 1 of the channel) so that both the stores and the loads of
/// the kN = 16 path are free of bank conflicts.
__device__ __forceinline__ int xr_slot(int q, int c) { return q ^ ((c >> 1) & 1); }

/// Lane `lane` stores its kV = kN / 2 values of step k2 (0 or 1 of the pair).
template <int kN, int kV>
__device__ __forceinline__ void bwd_xr_put(BwdXr<kN>& xr, int k2, int lane, float const (&v)[kV]) {
  static_assert(kV * kBwdSplit == kN && kV % 4 == 0, "kN / 2 values per lane, whole quads");
  int const c = lane >> 1, sub = lane & 1;
  float4* row = reinterpret_cast<float4*>(&xr[k2][c][0]);
#pragma unroll
  for (int j = 0; j < kV / 4; ++j)
    row[xr_slot(sub * (kV / 4) + j, c)] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
}

/// Where lane `lane` of bwd_xr_sum puts its sum: `offset` floats into the destination pair of
/// rows (row k2, quad Q), when `store` (channel group 0; the other groups hold the same sums).
struct XrOut {
  int offset;
  bool store;
};
template <int kN>
__device__ __forceinline__ XrOut bwd_xr_out(int lane) {
  constexpr int QS = kN / 4;
  int const rem = lane & 15;
  return {(lane >> 4) * 2 * kN + 4 * ((rem >> 1) & (QS - 1)), ((rem >> 1) / QS) * 2 + (rem & 1) == 0};
}

/// Sums both staged steps over the warp's 16 channels: dst[k2 2 kN + n] = sum over channels of
/// state n of step k2, for k2 in {0, 1} (dst: two rows of 2 kN floats, 16-byte aligned, already
/// advanced by bwd_xr_out(lane).offset: the caller adds it once). Lane
/// (k2 = lane / 16) sums quad Q over its channel group g, channels visited in a rotated order
/// (conflict-free); the group sums meet by shuffles; group 0 stores. The warp's lanes must all
/// call it (shuffles); fixed summation order: bitwise deterministic.
template <int kN>
__device__ __forceinline__ void bwd_xr_sum(BwdXr<kN> const& xr, float* dst, XrOut o, int lane) {
  constexpr int QS = kN / 4;      // quads per row
  constexpr int LPQ = 16 / QS;    // lanes per quad: 4 (kN 16) or 2 (kN 32)
  constexpr int CPL = kWarpCh / LPQ;  // channels per lane
  static_assert(LPQ == 2 || LPQ == 4, "kN 16 or 32");
  int const k2 = lane >> 4, rem = lane & 15;
  int const Q = (rem >> 1) & (QS - 1);
  int const g = ((rem >> 1) / QS) * 2 + (rem & 1);
  auto load = [&](int i) {
    int const c = g * CPL + ((i + g) % CPL);
    return reinterpret_cast<float4 const*>(&xr[k2][c][0])[xr_slot(Q, c)];
  };
  float4 s = load(0);
#pragma unroll
  for (int i = 1; i < CPL; ++i) {
    float4 const v = load(i);
    s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
  }
  auto meet = [&](int m) {
    s.x += __shfl_xor_sync(0xffffffffu, s.x, m);
    s.y += __shfl_xor_sync(0xffffffffu, s.y, m);
    s.z += __shfl_xor_sync(0xffffffffu, s.z, m);
    s.w += __shfl_xor_sync(0xffffffffu, s.w, m);
  };
  meet(1);
  if constexpr (LPQ == 4) meet(8);
  if (o.store) *reinterpret_cast<float4*>(dst) = s;
}

/// f(i, row[i]) for i < kNT: the kNT floats of `row` (16-byte aligned) read as float4 (a
/// broadcast when the warp's threads read the same row).
template <int kNT, class F>
__device__ __forceinline__ void each_state(float const* row, F&& f) {
  float4 const* r4 = reinterpret_cast<float4 const*>(row);
#pragma unroll
  for (int q = 0; q < kNT / 4; ++q) {
    float4 const v = r4[q];
    float const v4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) f(4 * q + e, v4[e]);
  }
}

/// Walks the time tiles [t_begin, t_end) of batch b first to last (kReverse: last to first):
/// each tile is staged by cp.async into one of the R = size of sm.raw buffers (the next R
/// tiles in flight while one computes), widened by bwd_cook<kFull> (mask: what is staged),
/// then body(tt, nt) runs on it (tt: its first step, nt: its steps). between(tt) runs after
/// the barrier that ends the previous tile's body, before this tile is widened (it may read
/// what the previous body wrote to shared memory; the next barrier follows it).
template <bool kFull, bool kReverse, int kN, class TS, class Smem, class Body, class Between>
__device__ __forceinline__ void bwd_walk_tiles(BwdParams<TS> const& p, Smem& sm, int b, int t_begin, int t_end,
                                               unsigned mask, Body&& body, Between&& between) {
  constexpr int T = kBwdTile;
  constexpr int R = static_cast<int>(sizeof(sm.raw) / sizeof(sm.raw[0]));
  int const n_tiles = (t_end - t_begin + T - 1) / T;
  auto first_step = [&](int s) { return t_begin + (kReverse ? n_tiles - 1 - s : s) * T; };
  // s-th tile in walk order into raw[s % R]; past the end an empty group (wait_prior counts groups).
  auto issue = [&](int s) {
    if (s < n_tiles) {
      int const tt = first_step(s);
      bwd_issue<kN>(p, sm.raw[s % R], b, tt, min(T, t_end - tt), mask);
    } else {
      __pipeline_commit();
    }
  };
#pragma unroll
  for (int s = 0; s < R; ++s) issue(s);
  for (int s = 0; s < n_tiles; ++s) {
    int const tt = first_step(s);
    int const nt = min(T, t_end - tt);
    __pipeline_wait_prior(R - 1);  // tile s has landed (groups s + 1 .. s + R - 1 may be in flight)
    __syncthreads();
    between(tt);
    bwd_cook<kFull>(p, sm.raw[s % R], sm.ck, nt, mask);
    __syncthreads();
    issue(s + R);  // into the buffer just widened
    body(tt, nt);
  }
}

namespace kernel {

/// Checkpoints: the state entering chunk c of batch b, channel d, at
/// ck[((b n_chunks + c) d_inner + d) N + n] (states innermost: a thread's kNT states are
/// contiguous, 16-byte vectors on the exact path, and a warp's accesses are contiguous).
template <class TS>
__device__ __forceinline__ float* ck_slot(BwdParams<TS> const& p, int b, int c, int d, int N) {
  return p.ck + ((static_cast<std::int64_t>(b) * p.n_chunks + c) * p.a.d_inner + d) * N;
}

/// Pass 1 (per batch, block of kBwdCh channels; two threads per channel). blockIdx.y < n_seg:
/// the forward recurrence over segment blockIdx.y, from initial_state (segment 0) or from zero,
/// storing the state entering every kBwdChunk-step chunk in ck (and, time-parallel runs, the sum
/// of deltas from the segment start in cum), the end state in Hs (all segments but the last)
/// and the segment's sum of deltas in dsum. blockIdx.y >= n_seg (time-parallel runs only): the
/// adjoint recurrence of segment blockIdx.y - n_seg + 1 from a zero carry backwards over it
/// (it needs only dy, C and the decays, not the forward), a_t0 g_t0 into Qs; these blocks run
/// alongside the forward ones, so every block of the pass does one sweep of one segment. With
/// the forward's checkpoints there are only adjoint blocks, blockIdx.y = piece q of the segments
/// > 0 (BwdParams::loc_split per segment): a_t0 g_t0 of the piece into Ql, its delta sum into dsl.
/// Full tiles run unguarded straight-line code; only a ragged last tile takes the guarded copy.
template <int kN, bool kExact, class TS = float>
MAMBABYTE_KERNEL void __launch_bounds__(kBwdThreads, kN == 16 ? (sizeof(TS) == 2 ? kLocalMinBlocksBf16 : kLocalMinBlocks) : 2)
    bwd_local(BwdParams<TS> const p) {
  constexpr int T = kBwdTile;
  constexpr int kNT = kN / kBwdSplit;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<BwdLocalSmem<kN, TS>*>(smem_raw);
  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;
  int const tid = threadIdx.x, ch = tid / kBwdSplit, sub = tid % kBwdSplit, n0 = sub * kNT;
  int const d = blockIdx.x * kBwdCh + ch;
  // with the forward's checkpoints only adjoint blocks are launched, one per piece q of the
  // segments > 0 (segment 1 + q / loc_split, its piece q % loc_split)
  int const y = static_cast<int>(blockIdx.y) + (p.given_ck ? p.n_seg : 0);
  bool const adjoint = y >= p.n_seg;  // block-uniform
  int const sg = adjoint ? y - p.n_seg + 1 : y;  // the segment (not used with the forward's checkpoints)
  int const b = blockIdx.z;
  bool const active = d < a.d_inner;
  int const dc = active ? d : a.d_inner - 1;
  constexpr float kLog2e = 1.4426950408889634f;
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
  int const q = static_cast<int>(blockIdx.y);  // the piece (given_ck)
  int t_begin, t_end;  // the steps this block sweeps
  if (p.given_ck) {
    int const sgq = 1 + q / p.loc_split, j = q - (sgq - 1) * p.loc_split;
    int const seg_end = min(p.n_chunks, (sgq + 1) * p.seg_chunks);
    int const c0 = min(seg_end, sgq * p.seg_chunks + j * p.loc_chunks);
    int const c1 = min(seg_end, c0 + p.loc_chunks);
    t_end = min(a.length, c1 * kBwdChunk);
    t_begin = min(t_end, c0 * kBwdChunk);  // t_begin == t_end: an empty piece (zero carry, zero sum)
  } else {
    t_begin = sg * p.seg_chunks * kBwdChunk;
    t_end = min(a.length, t_begin + p.seg_chunks * kBwdChunk);
  }
  if (tid < kBwdCh) {  // read by bwd_cook after the walk's first barrier
    int const col = blockIdx.x * kBwdCh + tid;
    sm.ck.bias[tid] = (a.delta_bias && col < a.d_inner) ? a.delta_bias[col] : 0.f;
  }

  float A2[kNT], h[kNT];
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    int const n = n0 + i;
    A2[i] = n < N ? a.A[static_cast<std::int64_t>(dc) * N + n] * kLog2e : 0.f;
    h[i] = (!adjoint && sg == 0 && active && n < N && a.initial_state)
               ? a.initial_state[b * sN + static_cast<std::int64_t>(d) * N + n]
               : 0.f;
  }
  if (adjoint) {
    // ---- adjoint from a zero carry, backwards over the segment ----
    // (with the forward's checkpoints there are no forward blocks: these also sum the
    // piece's deltas, which the carry across segments needs)
    float asum = 0.f;
    auto adj_tile = [&](int nt, auto guarded) {
      constexpr bool kG = decltype(guarded)::value;
#pragma unroll
      for (int k = T - 1; k >= 0; --k) {
        if (!kG || k < nt) {
          float const dt = sm.ck.dt[k][ch];
          float const dy = sm.ck.dy[k][ch];
          each_state<kNT>(&sm.ck.bc[k][kN + n0],
                          [&](int i, float C) { h[i] = ex2_approx(dt * A2[i]) * fmaf(C, dy, h[i]); });
          asum += dt;
        }
      }
    };
    constexpr unsigned kAdj = kLdDelta | kLdDout | kLdZ | kLdC;
    bwd_walk_tiles<false, true, kN>(
        p, sm, b, t_begin, t_end, kAdj,
        [&](int, int nt) {
          if (nt == T) adj_tile(nt, std::false_type{});
          else adj_tile(nt, std::true_type{});
        },
        [](int) {});
    if (active) {
      int const nq = (p.n_seg - 1) * p.loc_split;
      std::int64_t const row = p.given_ck ? static_cast<std::int64_t>(b) * nq + q
                                          : static_cast<std::int64_t>(b) * p.n_seg + sg;
      float* const dst = (p.given_ck ? p.Ql : p.Qs) + row * sN + d;
#pragma unroll
      for (int i = 0; i < kNT; ++i)
        if (n0 + i < N) dst[static_cast<std::int64_t>(n0 + i) * a.d_inner] = h[i];
      if (p.given_ck && sub == 0) p.dsl[row * a.d_inner + d] = asum;
    }
    return;
  }
  bool const store_cum = p.n_seg > 1;
  float dsum = 0.f;
  float* const ckp = ck_slot(p, b, 0, dc, N) + n0;                // chunk 0 of this thread
  std::int64_t const ck_step = static_cast<std::int64_t>(a.d_inner) * N;  // one chunk further
  float* const cump = store_cum ? p.cum + static_cast<std::int64_t>(b) * p.n_chunks * a.d_inner + d : nullptr;

  // ---- forward over the segment ----
  auto fwd_tile = [&](int tt, int nt, auto guarded) {
    constexpr bool kG = decltype(guarded)::value;
#pragma unroll
    for (int k = 0; k < T; ++k) {
      if (!kG || k < nt) {
        if (k % kBwdChunk == 0 && active) {
          int const c = (tt + k) / kBwdChunk;
          scan_detail::store_states<kExact>(ckp + c * ck_step, h, n0, N);
          if (store_cum && sub == 0) cump[static_cast<std::int64_t>(c) * a.d_inner] = dsum;
        }
        float const dt = sm.ck.dt[k][ch];
        float const dtu = dt * sm.ck.u[k][ch];
        each_state<kNT>(&sm.ck.bc[k][n0], [&](int i, float B) { h[i] = fmaf(ex2_approx(dt * A2[i]), h[i], dtu * B); });
        dsum += dt;
      }
    }
  };
  constexpr unsigned kFwd = kLdU | kLdDelta | kLdB;
  bwd_walk_tiles<false, false, kN>(
      p, sm, b, t_begin, t_end, kFwd,
      [&](int tt, int nt) {
        if (nt == T) fwd_tile(tt, nt, std::false_type{});
        else fwd_tile(tt, nt, std::true_type{});
      },
      [](int) {});
  if (p.n_seg > 1 && active) {
    std::int64_t const slot = (static_cast<std::int64_t>(b) * p.n_seg + sg) * sN + d;
    if (sg + 1 < p.n_seg) {
#pragma unroll
      for (int i = 0; i < kNT; ++i)
        if (n0 + i < N) p.Hs[slot + static_cast<std::int64_t>(n0 + i) * a.d_inner] = h[i];
    }
    if (sub == 0) p.dsum[(static_cast<std::int64_t>(b) * p.n_seg + sg) * a.d_inner + d] = dsum;
  }
}

/// Pass 2 (per batch, time segment, block of kBwdCh channels; two threads per channel, each
/// with half the states): tiles of the segment last to first, staged by cp.async (the next
/// one loads while this one computes) and widened once; per chunk of kBwdChunk steps, last to
/// first: the entering state (checkpoint + exp(A cum) x state entering the segment), a forward
/// recompute keeping h_{t-1} in registers that also writes dz / out and reduces dC_t, then the
/// reverse sweep g_t = C_t dy_t + a_{t+1} g_{t+1} (a_t evaluated again) writing du,
/// ddelta and reducing dB_t, with dA, dD, ddelta_bias accumulated per thread. dB / dC: summed
/// over the warp's 16 channels in shared memory (bwd_xr_put / bwd_xr_sum, every second step),
/// then the block's 4 warps summed in order into one partial row per block. The two threads of
/// a channel split the outputs: the first computes dz and du, the second out and ddelta; each
/// goes into a slot of the widened tile that no other thread reads, and flush_out writes the
/// tile's outputs as rows (vector stores) before the next tile is widened: about 17
/// instructions of 64-bit addressing per store left the chunk's straight-line code (1037 -> 884
/// instructions per chunk and thread for bf16, d_state 16). Full chunks run unguarded
/// straight-line code.
template <int kN, bool kExact, class TS = float>
MAMBABYTE_KERNEL void __launch_bounds__(kBwdThreads, kN == 16 ? kScanMinBlocks : 2) bwd_scan(BwdParams<TS> const p) {
  constexpr int K = kBwdChunk;
  constexpr int T = kBwdTile;
  constexpr int kNT = kN / kBwdSplit;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<BwdScanSmem<kN, TS>*>(smem_raw);
  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;
  int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int const ch = tid / kBwdSplit, sub = tid % kBwdSplit, n0 = sub * kNT;
  int const d = blockIdx.x * kBwdCh + ch;
  int const sg = blockIdx.y, b = blockIdx.z;
  bool const active = d < a.d_inner;
  int const dc = active ? d : a.d_inner - 1;
  int const L = a.length;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
  std::int64_t const row0 = static_cast<std::int64_t>(b) * L;
  int const t_begin = sg * p.seg_chunks * K;
  int const t_end = min(L, t_begin + p.seg_chunks * K);
  int const c_first = t_begin / K;
  if (tid < kBwdCh) {  // read by bwd_cook after the walk's first barrier
    int const col = blockIdx.x * kBwdCh + tid;
    sm.ck.bias[tid] = (a.delta_bias && col < a.d_inner) ? a.delta_bias[col] : 0.f;
  }
  bool const corr = sg > 0 && !p.given_ck;  // segment 0's (or the forward's) checkpoints hold the true states

  // G: adjoint carry; Hs: the state entering the segment (added to each checkpoint, decayed)
  float A2[kNT], G[kNT], dA[kNT];
  std::int64_t const sslot = (static_cast<std::int64_t>(b) * p.n_seg + sg) * sN + d;
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    int const n = n0 + i;
    A2[i] = n < N ? a.A[static_cast<std::int64_t>(dc) * N + n] * kLog2e : 0.f;
    if (p.n_seg > 1)
      G[i] = (active && n < N) ? p.Qs[sslot + static_cast<std::int64_t>(n) * a.d_inner] : 0.f;
    else
      G[i] = (active && n < N && a.dfinal_state) ? a.dfinal_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
    reinterpret_cast<float*>(&sm.hs[i / 4][tid])[i % 4] =
        (corr && active && n < N) ? p.Hs[sslot + static_cast<std::int64_t>(n) * a.d_inner] : 0.f;
    dA[i] = 0.f;
  }
  float const Dd = a.D ? a.D[dc] : 0.f;
  float dD = 0.f, dbias = 0.f;

  // This thread's outputs, staged in place in the widened tile (flush_out writes them out as
  // whole rows): the first thread of a channel computes dz (recompute: y dzf, into dzf) and du
  // (reverse: into u, after the warp barrier that follows every read of u), the second out
  // (y silu, into silu) and ddelta (into dsc). Each slot written is read by no other thread.
  float(*const f1)[kBwdCh] = sub == 0 ? sm.ck.dzf : sm.ck.silu;
  float(*const o2s)[kBwdCh] = reinterpret_cast<float(*)[kBwdCh]>(sub == 0 ? &sm.ck.u[0][ch] : &sm.ck.dsc[0][ch]);
  XrOut const xo = bwd_xr_out<kN>(lane);
  float* const red_lane = &sm.red[warp][0][0] + xo.offset;

  // Checkpoint of chunk c (and its delta sum) into registers, issued one chunk ahead.
  float hn[kNT], cumn = 0.f;
  float const* const ckp = ck_slot(p, b, 0, dc, N) + n0;
  std::int64_t const ck_step = static_cast<std::int64_t>(a.d_inner) * N;
  auto fetch_ck = [&](int c) {
    float const* src = ckp + c * ck_step;
    if constexpr (kExact) {
#pragma unroll
      for (int q = 0; q < kNT / 4; ++q) {
        // No select on `active`: a select would wait for the load right here, defeating the
        // prefetch. A thread past d_inner loads its clamped channel's (finite) state; its dy
        // and u are zero, so it adds nothing to dB / dC and writes nothing.
        float4 const v = __ldg(reinterpret_cast<float4 const*>(src) + q);
        hn[4 * q] = v.x;
        hn[4 * q + 1] = v.y;
        hn[4 * q + 2] = v.z;
        hn[4 * q + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kNT; ++i) hn[i] = (active && n0 + i < N) ? __ldg(src + i) : 0.f;
    }
    if (corr) cumn = p.cum[(static_cast<std::int64_t>(b) * p.n_chunks + c) * a.d_inner + dc];
  };
  fetch_ck((t_end - 1) / K);

  // One chunk of `len` steps at tile row kb (tile at time tt). kG: len may be < K.
  auto chunk = [&](int tt, int kb, int len, auto guarded) {
    constexpr bool kG = decltype(guarded)::value;
    int const c = (tt + kb) / K;
    // Entering state of the chunk; then fetch the next (earlier) chunk's checkpoint.
    float hcur[kNT];
#pragma unroll
    for (int i = 0; i < kNT; ++i) hcur[i] = hn[i];
    if (corr) {
#pragma unroll
      for (int q = 0; q < kNT / 4; ++q) {
        float4 const H = sm.hs[q][tid];
        float const Hv[4] = {H.x, H.y, H.z, H.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) hcur[4 * q + e] = fmaf(ex2_approx(A2[4 * q + e] * cumn), Hv[e], hcur[4 * q + e]);
      }
    }
    if (c > c_first) fetch_ck(c - 1);

    // Forward recompute: h_{t-1} kept, dz / out written, dC_t reduced.
    float hp[K][kNT];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!kG || k < len) {
        int const kk = kb + k;
        float const dt = sm.ck.dt[kk][ch];
        float const u = sm.ck.u[kk][ch];
        float const dtu = dt * u;
        float4 const* B4 = reinterpret_cast<float4 const*>(&sm.ck.bc[kk][n0]);
        float4 const* C4 = reinterpret_cast<float4 const*>(&sm.ck.bc[kk][kN + n0]);
        float y0 = 0.f, y1 = 0.f;
#pragma unroll
        for (int q = 0; q < kNT / 4; ++q) {
          float4 const Bq = B4[q], Cq = C4[q];
          float const Bv[4] = {Bq.x, Bq.y, Bq.z, Bq.w};
          float const Cv[4] = {Cq.x, Cq.y, Cq.z, Cq.w};
          float at[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int const i = 4 * q + e;
            hp[k][i] = hcur[i];
            at[e] = ex2_approx(dt * A2[i]);
            hcur[i] = fmaf(at[e], hcur[i], dtu * Bv[e]);
            if (e & 1) y1 = fmaf(hcur[i], Cv[e], y1);
            else y0 = fmaf(hcur[i], Cv[e], y0);
          }
        }
        float const dy = sm.ck.dy[kk][ch];
        float vC[kNT];
#pragma unroll
        for (int i = 0; i < kNT; ++i) vC[i] = dy * hcur[i];
        float y = y0 + y1;
        y += __shfl_xor_sync(0xffffffffu, y, 1);
        y = fmaf(Dd, u, y);
        f1[kk][ch] *= y;
        bwd_xr_put<kN>(sm.xr[warp], k & 1, lane, vC);
        if ((k & 1) || (kG && k + 1 == len)) {  // a pair staged (or the ragged chunk's last step)
          __syncwarp();
          bwd_xr_sum<kN>(sm.xr[warp], red_lane + (kb + (k & ~1)) * 2 * kN + kN, xo, lane);
          __syncwarp();
        }
      }
    }
    // Reverse sweep over the chunk. du of an odd step waits in duk for the warp barrier after
    // the next (even) step.
    float duk = 0.f;
#pragma unroll
    for (int k = K - 1; k >= 0; --k) {
      if (!kG || k < len) {
        int const kk = kb + k;
        float const dt = sm.ck.dt[kk][ch];
        float const u = sm.ck.u[kk][ch];
        float const dy = sm.ck.dy[kk][ch];
        float const dtu = dt * u;
        float4 const* B4 = reinterpret_cast<float4 const*>(&sm.ck.bc[kk][n0]);
        float4 const* C4 = reinterpret_cast<float4 const*>(&sm.ck.bc[kk][kN + n0]);
        float gB0 = 0.f, gB1 = 0.f, gA0 = 0.f, gA1 = 0.f;
        float vB[kNT];
#pragma unroll
        for (int q = 0; q < kNT / 4; ++q) {
          float4 const Bq = B4[q], Cq = C4[q];
          float const Bv[4] = {Bq.x, Bq.y, Bq.z, Bq.w};
          float const Cv[4] = {Cq.x, Cq.y, Cq.z, Cq.w};
          // a_t evaluated again (bitwise the recompute's value): shared memory is this kernel's
          // busiest unit and the MUFU pipe is not, so a round trip through shared memory cost
          // more than the exponentials (5.92 -> 5.60 ms at (8, 2048, 8192, 16), bf16).
          float Av[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) Av[e] = ex2_approx(dt * A2[4 * q + e]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int const i = 4 * q + e;
            float const g = fmaf(Cv[e], dy, G[i]);
            if (e & 1) gB1 = fmaf(g, Bv[e], gB1);
            else gB0 = fmaf(g, Bv[e], gB0);
            G[i] = Av[e] * g;
            float const gah = G[i] * hp[k][i];  // g_t a_t h_{t-1}
            if (e & 1) gA1 = fmaf(gah, A2[i], gA1);
            else gA0 = fmaf(gah, A2[i], gA0);
            dA[i] = fmaf(gah, dt, dA[i]);
            vB[i] = g * dtu;
          }
        }
        float gB = gB0 + gB1, gAh = gA0 + gA1;
        gB += __shfl_xor_sync(0xffffffffu, gB, 1);
        gAh += __shfl_xor_sync(0xffffffffu, gAh, 1);
        // Both threads compute both (no branch); o2s: the second thread's dsc slot, which the
        // first does not read (its own u slot stands in).
        float const du = fmaf(dt, gB, Dd * dy);
        float const dd = fmaf(u, gB, gAh * kLn2) * o2s[kk][0];
        if (sub != 0) o2s[kk][0] = dd;
        dbias += dd;  // meaningful in the second thread, which writes it
        dD = fmaf(dy, u, dD);
        bwd_xr_put<kN>(sm.xr[warp], k & 1, lane, vB);
        if ((k & 1) == 0) {  // steps k, k + 1 staged (a ragged chunk's k + 1 is never read)
          __syncwarp();
          if (sub == 0) {  // every lane has read u of steps k, k + 1
            sm.ck.u[kk][ch] = du;
            if (!kG || k + 1 < len) sm.ck.u[kk + 1][ch] = duk;
          }
          bwd_xr_sum<kN>(sm.xr[warp], red_lane + (kb + k) * 2 * kN, xo, lane);
          __syncwarp();
        } else {
          duk = du;
        }
      }
    }
  };
  // The block's partial rows of dB / dC for the tile at tt (nt steps): warps summed in order.
  // Runs between the next tile's barriers (or after a final one), not once per chunk.
  auto flush = [&](int ptt, int pnt) {
    float* dst = p.bc + ((static_cast<std::int64_t>(blockIdx.x) * a.batch + b) * L + ptt) * (2 * kN);
    for (int i = tid; i < pnt * 2 * kN; i += kBwdThreads) {
      int const k = i / (2 * kN), jj = i - k * (2 * kN);
      float s = sm.red[0][k][jj];
#pragma unroll
      for (int w = 1; w < kBwdWarps; ++w) s += sm.red[w][k][jj];
      dst[i] = s;
    }
  };

  // The staged outputs of the tile at ptt (pnt steps), this thread's group of them (the slots
  // bwd_cook widens next); runs where flush does.
  auto flush_out = [&](int ptt, int pnt) {
    int const k = tid / kBwdGroupsPerRow, c = (tid % kBwdGroupsPerRow) * kBwdGroup;
    int const col = blockIdx.x * kBwdCh + c;
    int const valid = a.d_inner - col;
    if (k >= pnt || valid <= 0) return;
    std::int64_t const r = row0 + ptt + k;
    if (a.dz) bwd_store_group(a.dz + r * a.ld_dz + col, sm.ck.dzf, k, c, valid, p.vec_out);
    if (a.out) bwd_store_group(a.out + r * a.ld_out + col, sm.ck.silu, k, c, valid, p.vec_out);
    bwd_store_group(a.du + r * a.ld_du + col, sm.ck.u, k, c, valid, p.vec_out);
    bwd_store_group(a.ddelta + r * a.ld_ddelta + col, sm.ck.dsc, k, c, valid, p.vec_out);
  };

  constexpr unsigned kAll = kLdU | kLdDelta | kLdDout | kLdZ | kLdB | kLdC;
  bwd_walk_tiles<true, true, kN>(
      p, sm, b, t_begin, t_end, kAll,
      [&](int tt, int nt) {
#pragma unroll 1
        for (int hh = T / K - 1; hh >= 0; --hh) {
          int const kb = hh * K;
          if (kb >= nt) continue;  // block-uniform
          int const len = min(K, nt - kb);
          if (len == K) chunk(tt, kb, K, std::false_type{});
          else chunk(tt, kb, len, std::true_type{});
        }
      },
      [&](int tt) {  // the previous tile (walked last to first: the one after tt)
        if (tt + T < t_end) {
          flush(tt + T, min(T, t_end - (tt + T)));
          flush_out(tt + T, min(T, t_end - (tt + T)));
        }
      });
  __syncthreads();
  flush(t_begin, min(T, t_end - t_begin));  // the last tile walked
  flush_out(t_begin, min(T, t_end - t_begin));
  if (!active) return;
  if (a.dinitial_state && sg == 0) {
#pragma unroll
    for (int i = 0; i < kNT; ++i)
      if (n0 + i < N) a.dinitial_state[b * sN + static_cast<std::int64_t>(d) * N + n0 + i] = G[i];
  }
  float* pr = p.par + ((static_cast<std::int64_t>(b) * p.n_seg + sg) * a.d_inner + d) * (N + 2);
#pragma unroll
  for (int i = 0; i < kNT; ++i)
    if (n0 + i < N) pr[n0 + i] = dA[i];
  pr[N + sub] = sub == 0 ? dD : dbias;  // the second thread of a channel summed ddelta_bias
}

/// Pass 3: dB / dC rows = sum of the channel blocks' partials (block order). A thread per
/// (row, j), j < 2N.
template <int kN, class TS = float>
MAMBABYTE_KERNEL void bwd_reduce_bc(BwdParams<TS> const p) {
  auto const& a = p.a;
  int const N = a.d_state;
  std::int64_t const rows = static_cast<std::int64_t>(a.batch) * a.length;
  std::int64_t const total = rows * 2 * N;
  std::int64_t const stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  std::int64_t const plane = rows * 2 * kN;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    std::int64_t const r = i / (2 * N);
    int const j = static_cast<int>(i - r * 2 * N);
    int const jj = j < N ? j : kN + (j - N);
    float const* src = p.bc + r * 2 * kN + jj;
    float s = 0.f;
    for (int x = 0; x < p.blocks_d; ++x) s += src[x * plane];
    if (j < N) a.dB[r * a.ld_dB + j] = from_f<TS>(s);
    else a.dC[r * a.ld_dC + (j - N)] = from_f<TS>(s);
  }
}

/// Pass 4: dA, dD, ddelta_bias += per-(batch, segment) partials (in order). A thread per (d, j).
template <class TS = float>
MAMBABYTE_KERNEL void bwd_reduce_params(BwdParams<TS> const p) {
  auto const& a = p.a;
  int const N = a.d_state, W = N + 2;
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<std::int64_t>(a.d_inner) * W) return;
  int const dch = static_cast<int>(i / W), j = static_cast<int>(i % W);
  float s = 0.f;
  for (int b = 0; b < a.batch * p.n_seg; ++b) s += p.par[static_cast<std::int64_t>(b) * a.d_inner * W + i];
  if (j < N) a.dA[static_cast<std::int64_t>(dch) * N + j] += s;
  else if (j == N) { if (a.dD) a.dD[dch] += s; }
  else if (a.ddelta_bias) a.ddelta_bias[dch] += s;
}

/// Time-parallel runs, pass 1b (a thread per (batch, state, channel): the recurrences of
/// different states are independent): carries across segments. The segments' values are
/// loaded kSegBatch at a time before any is used, so that a chain of 2 x segments steps (with the
/// forward's checkpoints: (segments - 1) x pieces) waits
/// for about 2 x segments / kSegBatch memory latencies, not one per step.
/// On exit Hs[s] = state entering segment s (0 for segment 0, whose local pass started from
/// initial_state), Qs[s] = adjoint carry entering it from its end. With the forward's
/// checkpoints only Qs, composed from the pieces of the local adjoint pass (Ql, dsl), last to
/// first.
inline constexpr int kSegBatch = 8;

template <class TS = float>
MAMBABYTE_KERNEL void __launch_bounds__(128) bwd_seg_carry(BwdParams<TS> const p) {
  auto const& a = p.a;
  int const N = a.d_state;
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
  std::int64_t const i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // n * d_inner + d
  if (i >= sN) return;
  int const n = static_cast<int>(i / a.d_inner), d = static_cast<int>(i - static_cast<std::int64_t>(n) * a.d_inner);
  int const b = blockIdx.z;
  int const S = p.n_seg;
  constexpr float kLog2e = 1.4426950408889634f;
  float const A2 = a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e;
  std::int64_t const base = static_cast<std::int64_t>(b) * S;
  // With the forward's checkpoints: only the adjoint carries, from the local pass's pieces.
  if (p.given_ck) {
    float run = a.dfinal_state ? a.dfinal_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
    // pieces q = (sg - 1) loc_split + j of the segments sg > 0, last to first; after the first
    // piece of segment sg, run is the carry entering segment sg - 1 from its end
    int const F = p.loc_split, nq = (S - 1) * F;
    std::int64_t const qbase = static_cast<std::int64_t>(b) * nq;
    p.Qs[(base + S - 1) * sN + i] = run;
    for (int q1 = nq - 1; q1 >= 0; q1 -= kSegBatch) {
      float loc[kSegBatch], dec[kSegBatch];
#pragma unroll
      for (int j = 0; j < kSegBatch; ++j) {
        int const q = q1 - j;
        loc[j] = q >= 0 ? p.Ql[(qbase + q) * sN + i] : 0.f;
        dec[j] = q >= 0 ? p.dsl[(qbase + q) * a.d_inner + d] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kSegBatch; ++j) {
        int const q = q1 - j;
        if (q >= 0) {
          run = fmaf(ex2_approx(dec[j] * A2), run, loc[j]);
          if (q % F == 0) p.Qs[(base + q / F) * sN + i] = run;  // entering segment q / F = sg - 1
        }
      }
    }
    return;
  }
  float const* const dsum = p.dsum + base * a.d_inner + d;  // segment sg at dsum[sg * d_inner]
  // Forward: Hs[sg] (local end state from zero, none for the last) -> state entering sg.
  float run = 0.f;
  for (int s0 = 0; s0 < S; s0 += kSegBatch) {
    float loc[kSegBatch], dec[kSegBatch];
#pragma unroll
    for (int j = 0; j < kSegBatch; ++j) {
      int const sg = s0 + j;
      loc[j] = sg + 1 < S ? p.Hs[(base + sg) * sN + i] : 0.f;
      dec[j] = sg < S ? dsum[static_cast<std::int64_t>(sg) * a.d_inner] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kSegBatch; ++j) {
      int const sg = s0 + j;
      if (sg < S) {
        p.Hs[(base + sg) * sN + i] = run;
        run = fmaf(ex2_approx(dec[j] * A2), run, loc[j]);
      }
    }
  }
  // Backward: Qs[sg] (local adjoint at the segment start from zero, none for segment 0) ->
  // adjoint carry entering sg from its end.
  run = a.dfinal_state ? a.dfinal_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
  for (int s1 = S - 1; s1 >= 0; s1 -= kSegBatch) {
    float loc[kSegBatch], dec[kSegBatch];
#pragma unroll
    for (int j = 0; j < kSegBatch; ++j) {
      int const sg = s1 - j;
      loc[j] = sg > 0 ? p.Qs[(base + sg) * sN + i] : 0.f;
      // (segment 0's sum decays nothing that is used)
      dec[j] = sg > 0 ? dsum[static_cast<std::int64_t>(sg) * a.d_inner] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kSegBatch; ++j) {
      int const sg = s1 - j;
      if (sg >= 0) {
        p.Qs[(base + sg) * sN + i] = run;
        run = fmaf(ex2_approx(dec[j] * A2), run, loc[j]);
      }
    }
  }
}

/// length == 0: dinitial_state = dfinal_state (or 0).
template <int = 0>
MAMBABYTE_KERNEL void bwd_empty(float* dst, float const* src, std::size_t n) {
  std::size_t const i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = src ? src[i] : 0.f;
}

}  // namespace kernel

struct WorkspaceLayout {
  std::size_t ck = 0, cum = 0, bc = 0, par = 0, seg = 0;  // float counts
  std::size_t bytes() const { return (ck + cum + bc + par + seg) * sizeof(float); }
};

/// seg_chunks: chunks of kBwdChunk steps per time segment (0: one segment).
inline int segment_count(int length, int seg_chunks) {
  int const nc = (length + kBwdChunk - 1) / kBwdChunk;
  return seg_chunks <= 0 ? 1 : (nc + seg_chunks - 1) / seg_chunks;
}

template <class Args>
WorkspaceLayout layout(Args const& a, int seg_chunks) {
  WorkspaceLayout w;
  if (a.batch <= 0 || a.length <= 0) return w;
  std::size_t const nc = (static_cast<std::size_t>(a.length) + kBwdChunk - 1) / kBwdChunk;
  std::size_t const blocks_d = (static_cast<std::size_t>(a.d_inner) + kBwdCh - 1) / kBwdCh;
  std::size_t const ns = static_cast<std::size_t>(segment_count(a.length, seg_chunks));
  bool const given = a.checkpoints != nullptr;  // the forward's: no checkpoint pass, no delta sums per chunk
  w.ck = given ? 0 : static_cast<std::size_t>(a.batch) * nc * a.d_state * a.d_inner;
  if (ns > 1 && !given) w.cum = static_cast<std::size_t>(a.batch) * nc * a.d_inner;
  w.bc = blocks_d * a.batch * static_cast<std::size_t>(a.length) * 2 * state_cap(a.d_state);
  w.par = static_cast<std::size_t>(a.batch) * ns * a.d_inner * (a.d_state + 2);
  if (ns > 1 && !given) w.seg = static_cast<std::size_t>(a.batch) * ns * a.d_inner * (2 * a.d_state + 1);
  if (ns > 1 && given)  // Qs per segment, the local pass's pieces (Ql, dsl)
    w.seg = static_cast<std::size_t>(a.batch) * a.d_inner *
            (ns * a.d_state + (ns - 1) * static_cast<std::size_t>(local_split(seg_chunks, static_cast<int>(ns))) * (a.d_state + 1));
  return w;
}

template <int kN, bool kExact, class TS>
auto* prepare_local_kernel() {
  constexpr std::size_t smem = sizeof(BwdLocalSmem<kN, TS>);
  auto* fn = &kernel::bwd_local<kN, kExact, TS>;
  if constexpr (smem > 48 * 1024)
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  return fn;
}

template <int kN, bool kExact, class TS>
auto* prepare_scan_kernel() {
  constexpr std::size_t smem = sizeof(BwdScanSmem<kN, TS>);
  auto* fn = &kernel::bwd_scan<kN, kExact, TS>;
  if constexpr (smem > 48 * 1024)
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  return fn;
}

/// Resident blocks per SM of the scan pass (the heavier one) for storage TS at this d_state.
template <class TS = float>
int bwd_blocks_per_sm(int d_state, int device) {
  ScopedDevice guard(device);
  int n = 0;
  if (d_state == 16) {
    MAMBABYTE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, prepare_scan_kernel<16, true, TS>(), kBwdThreads, sizeof(BwdScanSmem<16, TS>)));
  } else if (d_state < 16) {
    MAMBABYTE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, prepare_scan_kernel<16, false, TS>(), kBwdThreads, sizeof(BwdScanSmem<16, TS>)));
  } else {
    MAMBABYTE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, prepare_scan_kernel<32, false, TS>(), kBwdThreads, sizeof(BwdScanSmem<32, TS>)));
  }
  return std::max(n, 1);
}

template <int kN, bool kExact, class TS>
void run_impl(BwdParams<TS>& p, cudaStream_t stream) {
  auto const& a = p.a;
  dim3 const grid(p.blocks_d, p.n_seg, a.batch);
  // forward sweeps (none with the forward's checkpoints), then adjoint sweeps of segments > 0
  dim3 const local_grid(p.blocks_d, p.given_ck ? (p.n_seg - 1) * p.loc_split : 2 * p.n_seg - 1, a.batch);
  if (local_grid.y > 0) {
    prepare_local_kernel<kN, kExact, TS>()<<<local_grid, kBwdThreads, sizeof(BwdLocalSmem<kN, TS>), stream>>>(p);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  }
  if (p.n_seg > 1) {
    std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * a.d_state;
    kernel::bwd_seg_carry<TS><<<dim3(static_cast<unsigned>((sN + 127) / 128), 1, a.batch), 128, 0, stream>>>(p);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  }
  prepare_scan_kernel<kN, kExact, TS>()<<<grid, kBwdThreads, sizeof(BwdScanSmem<kN, TS>), stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  std::int64_t const total = static_cast<std::int64_t>(a.batch) * a.length * 2 * a.d_state;
  unsigned const blocks = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 65535L * 16));
  kernel::bwd_reduce_bc<kN, TS><<<blocks, 256, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  std::int64_t const np = static_cast<std::int64_t>(a.d_inner) * (a.d_state + 2);
  kernel::bwd_reduce_params<TS><<<static_cast<unsigned>((np + 255) / 256), 256, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// Runs the backward for float or bf16 storage (MixedScanBackwardArguments<float>: the float one).
template <class TS>
void run(MixedScanBackwardArguments<TS> const& a, int seg_chunks, void* ws, Cuda const& be) {
  static_assert(is_scan_storage_v<TS>, "CUDA scan storage: float or __nv_bfloat16");
  ScopedDevice guard(be.device);
  if (a.batch == 0) return;
  if (a.length == 0) {
    if (!a.dinitial_state) return;
    std::size_t const n = static_cast<std::size_t>(a.batch) * a.d_inner * a.d_state;
    kernel::bwd_empty<><<<static_cast<unsigned>((n + 255) / 256), 256, 0, be.stream>>>(a.dinitial_state, a.dfinal_state, n);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  require(ws != nullptr, "selective scan backward (CUDA): null workspace");
  require(a.batch <= 65535, "selective scan backward (CUDA): batch ", a.batch, " exceeds 65535");
  require(!a.checkpoints || reinterpret_cast<std::uintptr_t>(a.checkpoints) % 16 == 0,
          "selective scan backward (CUDA): checkpoints must be 16-byte aligned");
  WorkspaceLayout const w = layout(a, seg_chunks);
  BwdParams<TS> p;
  p.a = a;
  p.n_chunks = (a.length + kBwdChunk - 1) / kBwdChunk;
  p.blocks_d = (a.d_inner + kBwdCh - 1) / kBwdCh;
  p.given_ck = a.checkpoints != nullptr;
  p.ck = p.given_ck ? const_cast<float*>(a.checkpoints) : static_cast<float*>(ws);  // bwd_scan only reads given ones
  p.cum = static_cast<float*>(ws) + w.ck;
  p.bc = p.cum + w.cum;
  p.par = p.bc + w.bc;
  p.n_seg = segment_count(a.length, seg_chunks);
  p.seg_chunks = p.n_seg > 1 ? seg_chunks : p.n_chunks;
  require(2 * p.n_seg - 1 <= 65535, "selective scan backward (CUDA): too many time segments");
  if (p.n_seg > 1 && !p.given_ck) {
    std::size_t const S = static_cast<std::size_t>(a.batch) * p.n_seg * a.d_inner * a.d_state;
    p.Hs = p.par + w.par;
    p.Qs = p.Hs + S;
    p.dsum = p.Qs + S;
  }
  if (p.n_seg > 1 && p.given_ck) {
    std::size_t const S = static_cast<std::size_t>(a.batch) * p.n_seg * a.d_inner * a.d_state;
    std::size_t const Q = static_cast<std::size_t>(a.batch) * (p.n_seg - 1) * local_split(p.seg_chunks, p.n_seg) * a.d_inner * a.d_state;
    p.Qs = p.par + w.par;
    p.Ql = p.Qs + S;
    p.dsl = p.Ql + Q;
    p.loc_split = local_split(p.seg_chunks, p.n_seg);
    p.loc_chunks = (p.seg_chunks + p.loc_split - 1) / p.loc_split;
    require((p.n_seg - 1) * p.loc_split <= 65535, "selective scan backward (CUDA): too many time segments");
  }
  if (p.n_seg <= 1 || p.given_ck) p.cum = nullptr;
  p.vec_x = rows_aligned16(a.u, a.ld_u) && rows_aligned16(a.delta, a.ld_delta) &&
            rows_aligned16(a.dout, a.ld_dout) && rows_aligned16(a.z, a.ld_z);
  p.vec_bc = rows_aligned16(a.B, a.ld_B) && rows_aligned16(a.C, a.ld_C);
  auto rows_aligned4 = [](TS const* q, std::int64_t ld) {  // rows start on kBwdGroup-element boundaries
    constexpr std::size_t g = kBwdGroup * sizeof(TS);
    return q == nullptr || (reinterpret_cast<std::uintptr_t>(q) % g == 0 && (ld * sizeof(TS)) % g == 0);
  };
  p.vec_out = rows_aligned4(a.dz, a.ld_dz) && rows_aligned4(a.out, a.ld_out) && rows_aligned4(a.du, a.ld_du) &&
              rows_aligned4(a.ddelta, a.ld_ddelta);
  if (a.d_state == 16) run_impl<16, true>(p, be.stream);
  else if (a.d_state < 16) run_impl<16, false>(p, be.stream);
  else run_impl<32, false>(p, be.stream);
}

inline void run(ssm::SelectiveScanBackwardArguments<float> const& a, int seg_chunks, void* ws, Cuda const& be) {
  run(to_mixed(a), seg_chunks, ws, be);
}

/// The Arguments of SelectiveScanBackward<Cuda, TS, *>: the ssm struct for float (unchanged
/// API), the mixed one for bf16.
template <class TS>
using BackwardArgumentsFor =
    std::conditional_t<std::is_same_v<TS, float>, ssm::SelectiveScanBackwardArguments<float>,
                       MixedScanBackwardArguments<TS>>;

/// What the CUDA SelectiveScanBackward<Cuda, TS, *> take: their Arguments, and for float also
/// MixedScanBackwardArguments<float> (the same fields plus the forward's checkpoints).
template <class A, class TS>
concept BackwardArgsFor =
    std::is_same_v<A, BackwardArgumentsFor<TS>> || std::is_same_v<A, MixedScanBackwardArguments<TS>>;

}  // namespace mambabyte::backend::cuda::scan_bwd_detail

namespace mambabyte::ssm {

/// The rule behind scan::Auto for the CUDA backward: chunks (of kBwdChunk steps) per time
/// segment, 0 for one segment. `blocks_per_sm`: resident blocks of the scan pass per SM
/// (backend::cuda::scan_bwd_detail::bwd_blocks_per_sm; the default is the H200 estimate).
/// The kernels are latency-bound, so a wave of resident blocks costs about the same whether or
/// not it is full; a segmented run does one more pass (the local adjoint, its carry across the
/// segments and the scan's entering-state correction: kSegmentedCost the work per element) and
/// pays a fixed start per block (~64 steps). Among one segment and 2..64 segments of at least
/// 256 steps, the rule takes the smallest
///     ceil(segments x channel-blocks / wave) x (segment length + 64) x (kSegmentedCost if segmented).
/// kSegmentedCost 1.4 was fitted to every policy timed at batch 1-16 x d_inner 1024-2048 x
/// length 2048-8192 on the H200, with and without the forward's states
/// (bench/results/device-run122-bwd-policy-sweep.log): 1.2 before put (16, 1536, 2048) and
/// (16, 1536, 8192) on 512- / 2048-step segments, 3% slower than one segment (7% and 6% with the
/// forward's states); no other shape's choice changes among the timed policies.
inline int resolve_auto_cuda_backward(int batch, int length, int d_inner, int sms, int blocks_per_sm = 5) {
  namespace sd = backend::cuda::scan_bwd_detail;
  constexpr double kSegmentedCost = 1.4;
  if (batch <= 0 || length <= 0) return 0;
  long const blocks = static_cast<long>(batch) * ((d_inner + sd::kBwdCh - 1) / sd::kBwdCh);
  long const wave = std::max(1L, static_cast<long>(sms) * std::max(1, blocks_per_sm));
  long const nc = (length + sd::kBwdChunk - 1) / sd::kBwdChunk;
  constexpr long kMinSegChunks = 256 / sd::kBwdChunk;
  auto cost = [&](long n, long seg_chunks) {
    double const waves = static_cast<double>((n * blocks + wave - 1) / wave);
    return waves * static_cast<double>(seg_chunks * sd::kBwdChunk + 64) * (n > 1 ? kSegmentedCost : 1.0);
  };
  double best = cost(1, nc);
  long best_sc = 0;
  for (long want = 2; want <= 64 && nc / want >= kMinSegChunks; ++want) {
    long const sc = (nc + want - 1) / want;
    long const n = (nc + sc - 1) / sc;
    if (n < 2) continue;
    double const c = cost(n, sc);
    if (c < best) {
      best = c;
      best_sc = sc;
    }
  }
  return static_cast<int>(best_sc);
}

/// Common part of the CUDA backward specialisations: TS = float (Arguments =
/// SelectiveScanBackwardArguments<float>) or __nv_bfloat16 (Arguments =
/// backend::cuda::MixedScanBackwardArguments<__nv_bfloat16>).
template <class Derived, class TS = float>
struct CudaSelectiveScanBackwardBase {
  using Arguments = backend::cuda::scan_bwd_detail::BackwardArgumentsFor<TS>;
  template <backend::cuda::scan_bwd_detail::BackwardArgsFor<TS> A>
  static Status can_implement(A const& a) {
    Status const st = validate(a);
    if (st != Status::kSuccess) return st;
    if (a.d_state > backend::cuda::scan_bwd_detail::kBwdMaxState) return Status::kUnsupported;
    return Status::kSuccess;
  }
  template <backend::cuda::scan_bwd_detail::BackwardArgsFor<TS> A>
  static void check(A const& a) {
    Status const st = can_implement(a);
    require(st == Status::kSuccess, "selective scan backward (CUDA): cannot run (", to_string(st),
            ") batch=", a.batch, " length=", a.length, " d_inner=", a.d_inner, " d_state=", a.d_state);
  }
  template <backend::cuda::scan_bwd_detail::BackwardArgsFor<TS> A>
  static std::size_t workspace_bytes(A const& a, backend::Cuda const& be) {
    return backend::cuda::scan_bwd_detail::layout(backend::cuda::to_mixed(a), Derived::seg_chunks(a, be)).bytes();
  }
  template <backend::cuda::scan_bwd_detail::BackwardArgsFor<TS> A>
  static void run(A const& a, void* ws, backend::Cuda const& be) {
    check(a);
    backend::cuda::scan_bwd_detail::run(backend::cuda::to_mixed(a), Derived::seg_chunks(a, be), ws, be);
  }
  /// Run with an internally allocated workspace (cudaMalloc; synchronises the stream).
  template <backend::cuda::scan_bwd_detail::BackwardArgsFor<TS> A>
  static void run(A const& a, backend::Cuda const& be) {
    check(a);
    backend::cuda::DeviceBuffer<std::byte> ws(workspace_bytes(a, be), be);
    run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
  }
};

/// Sequential: one time segment (checkpointed sweep over the whole length).
template <class TS>
struct SelectiveScanBackward<backend::Cuda, TS, scan::Sequential,
                             std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, TS, scan::Sequential>, TS> {
  using Arguments = backend::cuda::scan_bwd_detail::BackwardArgumentsFor<TS>;
  template <class A>
  static int seg_chunks(A const&, backend::Cuda const&) { return 0; }
};

/// Chunked<L>: time segments of L steps (rounded up to a multiple of kBwdChunk = 4), time-parallel.
template <class TS, int ChunkLen>
struct SelectiveScanBackward<backend::Cuda, TS, scan::Chunked<ChunkLen>,
                             std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, TS, scan::Chunked<ChunkLen>>, TS> {
  using Arguments = backend::cuda::scan_bwd_detail::BackwardArgumentsFor<TS>;
  template <class A>
  static int seg_chunks(A const&, backend::Cuda const&) {
    constexpr int K = backend::cuda::scan_bwd_detail::kBwdChunk;
    return (ChunkLen + K - 1) / K;
  }
};

/// Auto: resolve_auto_cuda_backward() picks one segment or a segment length.
template <class TS>
struct SelectiveScanBackward<backend::Cuda, TS, scan::Auto,
                             std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, TS, scan::Auto>, TS> {
  using Arguments = backend::cuda::scan_bwd_detail::BackwardArgumentsFor<TS>;
  template <class A>
  static int seg_chunks(A const& a, backend::Cuda const& be) {
    if (a.batch <= 0 || a.length <= 0) return 0;
    namespace sd = backend::cuda::scan_bwd_detail;
    return resolve_auto_cuda_backward(a.batch, a.length, a.d_inner,
                                      backend::cuda::scan_detail::sm_count(be.device),
                                      sd::bwd_blocks_per_sm<TS>(a.d_state, be.device));
  }
};

}  // namespace mambabyte::ssm
