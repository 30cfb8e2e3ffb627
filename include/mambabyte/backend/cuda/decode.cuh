/*! \file
 *  \brief The fused single-token decode step of a Mamba LM on CUDA: every sequence of a batch
 *         advances by one token in 3 kernels per layer (4 when batch > kFuseXMaxBatch) plus one
 *         for the head, chained with programmatic dependent launch (PDL) so that each kernel
 *         streams its weights while the previous one is still running.
 *
 *  Per layer l (B = batch, S = float or __nv_bfloat16 storage, fp32 state/residual/accumulators):
 *   K1 norm + in_proj + conv: every block recomputes norm(r[b, :]) for all rows (1024-wide:
 *      cheap) into shared memory, multiplies it by its slice of in_proj rows, then for its
 *      x-rows runs the causal conv step (window in the conv state) + SiLU -> u, and stores its
 *      z-rows -> z. Layer 0 reads the residual from the embedding table (and block 0 writes
 *      it). With B <= kFuseXMaxBatch the x-row blocks also write x_proj partial sums over
 *      their channels (B, n_xblocks, X) instead of a separate x_proj kernel.
 *   K2 x_proj (B > kFuseXMaxBatch only): xdbl = u W_x^T.
 *   K3 SSM step: xdbl (summing K1's partials in a fixed order, or read), then per channel dt_proj
 *      (dt_rank MACs), softplus, A = -exp(A_log) (computed here from the fp32 master A_log,
 *      so weights updated between graph launches are always seen), the state update, D skip,
 *      SiLU(z) gate -> y. Exactly selective_state_update's arithmetic.
 *   K4 out_proj + residual: r[b, m] += round_S(y W_out^T + bias).
 *  Head: norm_f(r) W_head^T (first 256 rows) -> fp32 logits.
 *
 *  GEMV engine (K1, K2, K4, head): a block owns 16*RG output rows; its RG*KS warps split them
 *  into 16-row groups x KS slices of K; each lane copies its weight fragments (16 x 16 bytes)
 *  into its own shared-memory slots with cp.async before griddepcontrol.wait, i.e. while the
 *  previous kernel runs (shared memory, not registers, so that the blocks of 2-3 consecutive
 *  kernels fit on an SM together and the prefetch runs ahead). bf16:
 *  mma.sync m16n8k16 (weights = A, 8 batch rows = B; a lane's 16 contiguous bytes of a weight
 *  row and of an activation row are split between two MMAs with the same k permutation, so
 *  fragments are plain 16-byte loads); float: FMA (no TF32: float stays the accuracy
 *  reference). The KS partial sums are added in a fixed order in shared memory: every result
 *  is deterministic (no atomics), the same on every replay.
 *
 *  PDL protocol (when launched with it): each kernel triggers its dependents at entry, reads
 *  only weights and its own layer's recurrent state before griddepcontrol.wait (nothing else in
 *  the step writes those), and reads activations after it through L2 (ld.global.cg) and writes
 *  anything only after it. The first kernel of a step is launched without PDL (it waits for
 *  all previous work of the stream). Without the attribute the waits are no-ops.
 *
 *  Numerics: the rounding points of the layer-by-layer path (model.cuh) are kept: the normed
 *  input, xz, u, xdbl, dt, y and the out_proj output are rounded to S where that path stores
 *  them in S; only fp32 summation orders differ.
 *
 *  Limits (decode_supported): d_conv <= 8, d_state <= 64, shared memory of K1 within the
 *  device's opt-in limit, bf16 needs sm_80+. Otherwise the caller uses the layer-by-layer path.
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
#include <vector>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/core/error.hpp"

namespace mambabyte::backend::cuda {

namespace decode_detail {

inline constexpr int kMaxConv = 8;          ///< widest conv of the decode path
inline constexpr int kMaxState = 64;        ///< largest d_state of the decode path
inline constexpr int kFuseXMaxBatch = 4;    ///< batch up to which x_proj is fused into K1
inline constexpr int kNormRegs = 32;        ///< norm rows up to 32 * 32 wide live in registers
inline constexpr int kSsmChannels = 64;     ///< channels per SSM-step block (4 threads each)
inline constexpr int kSsmThreads = 4 * kSsmChannels;
inline constexpr int kNormThreads = 256;    ///< launch bound of the GEMV kernels with a norm prologue
inline constexpr int kPlainThreads = 512;   ///< launch bound of the other GEMV kernels
inline constexpr float kLog2e = 1.4426950408889634f;

template <class S>
inline constexpr bool kMma = std::is_same_v<S, __nv_bfloat16>;  ///< tensor-core path (bf16)
template <class S>
inline constexpr int kSteps = kMma<S> ? 8 : 4;   ///< 32-wide k steps of weights a lane holds
template <class S>
inline constexpr int kPB = kMma<S> ? 16 : 8;     ///< batch rows per pass
template <class S>
inline constexpr int kV = static_cast<int>(sizeof(S)) / 2;  ///< 16-byte chunks per 8 elements
template <class S>
inline constexpr int kElems = 16 / static_cast<int>(sizeof(S));  ///< elements per 16 bytes

// ---- device helpers ----------------------------------------------------------------------------

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(void const* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class S>
__device__ __forceinline__ S from_f(float x) {
  if constexpr (std::is_same_v<S, float>) return x;
  else return __float2bfloat16_rn(x);
}
/// x rounded to the storage type and widened back.
template <class S>
__device__ __forceinline__ float round_s(float x) {
  return to_f(from_f<S>(x));
}
__device__ __forceinline__ float ld_cg(float const* p) { return __ldcg(p); }
__device__ __forceinline__ float ld_cg(__nv_bfloat16 const* p) { return __bfloat162float(__ldcg(p)); }
__device__ __forceinline__ float ld_nc(float const* p) { return __ldg(p); }
__device__ __forceinline__ float ld_nc(__nv_bfloat16 const* p) { return __bfloat162float(__ldg(p)); }

/// The conv's activation in the decode kernels (expf and an IEEE division; layers.cuh's silu_f,
/// which prefill and training use, takes the special-function sigmoid: they differ by a few ulp).
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

/// As the scan's softplus_dev: max(v, 0) + log1p(e^-|v|) through 2 atanh(e / (2 + e)).
__device__ __forceinline__ float softplus(float v) {
  float const e = expf(-fabsf(v));
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

using fast::ex2_approx;  // common.cuh (as the scan)

/// Sum over the warp by an xor butterfly (every lane gets the same bits).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class S>
__device__ __forceinline__ uint4 pack16(S const (&e)[kElems<S>]) {
  if constexpr (std::is_same_v<S, float>) {
    return make_uint4(__float_as_uint(e[0]), __float_as_uint(e[1]), __float_as_uint(e[2]), __float_as_uint(e[3]));
  } else {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<unsigned>(__bfloat16_as_ushort(e[2 * i])) |
             (static_cast<unsigned>(__bfloat16_as_ushort(e[2 * i + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

/// The kElems<S> values of one 16-byte chunk as floats.
template <class S>
__device__ __forceinline__ void unpack16(uint4 const& q, float* f) {
  if constexpr (std::is_same_v<S, float>) {
    f[0] = __uint_as_float(q.x); f[1] = __uint_as_float(q.y); f[2] = __uint_as_float(q.z); f[3] = __uint_as_float(q.w);
  } else {
    unsigned const w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

/// A lane's 8 elements of a 32-wide k step at k0: chunk c (16 bytes) holds
///   k = k0 + c * (32 / kV) + kElems * t + e,  e < kElems
/// (bf16: one chunk, k0 + 8t + [0, 8); float: k0 + 4t + [0, 4) and k0 + 16 + 4t + [0, 4)).
/// Weights and activations use the same map, so their products pair up. Elements past K (or
/// a null row) are zero. kCoherent: ld.global.cg (data written earlier in the step), else
/// ld.global.nc (weights). vec: rows 16-byte aligned (K a multiple of kElems).
template <class S, bool kCoherent>
__device__ __forceinline__ void load_frag(S const* row, int k0, int t, int K, bool vec, uint4 (&d)[kV<S>]) {
  constexpr int E = kElems<S>;
  constexpr int kStride = 32 / kV<S>;
#pragma unroll
  for (int c = 0; c < kV<S>; ++c) {
    int const k = k0 + c * kStride + E * t;
    if (row != nullptr && vec && k + E <= K) {
      uint4 const* q = reinterpret_cast<uint4 const*>(row + k);
      if constexpr (kCoherent) d[c] = __ldcg(q);
      else d[c] = __ldg(q);
    } else {
      S e[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        e[i] = S(0.f);
        if (row != nullptr && k + i < K) {
          if constexpr (kCoherent) e[i] = __ldcg(row + k + i);
          else e[i] = __ldg(row + k + i);
        }
      }
      d[c] = pack16<S>(e);
    }
  }
}

/// As load_frag from a shared-memory row padded with zeros to a multiple of 32 (null: zeros).
template <class S>
__device__ __forceinline__ void load_frag_smem(S const* row, int k0, int t, uint4 (&d)[kV<S>]) {
  constexpr int kStride = 32 / kV<S>;
#pragma unroll
  for (int c = 0; c < kV<S>; ++c)
    d[c] = row != nullptr ? *reinterpret_cast<uint4 const*>(row + k0 + c * kStride + kElems<S> * t)
                          : make_uint4(0u, 0u, 0u, 0u);
}

template <class S>
__device__ __forceinline__ void unpack_frag(uint4 const (&d)[kV<S>], float (&f)[8]) {
#pragma unroll
  for (int c = 0; c < kV<S>; ++c) unpack16<S>(d[c], f + c * kElems<S>);
}

/// 16-byte asynchronous copy global -> shared (L2 only), completed by cp_async_wait_all.
__device__ __forceinline__ void cp_async16(void* smem, void const* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned const s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = __ldg(static_cast<uint4 const*>(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

/// Stages a lane's weight fragment (as load_frag<S, false>) into its shared-memory slots d[c]:
/// cp.async when the chunk is whole and aligned, else plain loads (zeros past K / null rows).
template <class S>
__device__ __forceinline__ void stage_frag(S const* row, int k0, int t, int K, bool vec, uint4* d) {
  constexpr int E = kElems<S>;
  constexpr int kStride = 32 / kV<S>;
#pragma unroll
  for (int c = 0; c < kV<S>; ++c) {
    int const k = k0 + c * kStride + E * t;
    if (row != nullptr && vec && k + E <= K) {
      cp_async16(d + 32 * c, row + k);
    } else {
      S e[E];
#pragma unroll
      for (int i = 0; i < E; ++i) e[i] = (row != nullptr && k + i < K) ? __ldg(row + k + i) : S(0.f);
      d[32 * c] = pack16<S>(e);
    }
  }
}

/// D(16x8) += A(16x16, bf16, row) B(16x8, bf16, col), fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host never selects the bf16 decode path below sm_80
#endif
}

// ---- the GEMV kernel -----------------------------------------------------------------------------

enum class Epi : int { kInProj, kStore, kResidual, kLogits };

template <class S>
struct GemvParams {
  int N = 0, K = 0, B = 0;
  int RG = 1, KS = 1;     ///< 16-row groups and k slices per block (warps = RG * KS)
  int spw = 0, npass = 1; ///< 32-wide k steps per warp; passes of kSteps over them
  bool vec = false;       ///< W rows (and global X rows) 16-byte aligned
  S const* W = nullptr;   ///< (N, K) row-major
  S const* X = nullptr;   ///< !norm input: (B, K) rows
  // norm input: X = norm(resid rows) (resid = table[tokens] when tokens), in shared memory
  float* resid = nullptr; ///< (B, K) fp32 residual (K4: (B, N), updated in place)
  std::int32_t const* tokens = nullptr;
  float const* table = nullptr;
  float const* norm_w = nullptr;
  float const* norm_b = nullptr;
  float eps = 1e-5f;
  bool rms = false;
  int ldxs = 0, xs_rows = 0;
  // epilogues
  float const* bias = nullptr;  ///< per output row (in_proj / out_proj bias), optional
  S* out = nullptr;             ///< kStore: (B, N)
  float* out_f = nullptr;       ///< kLogits: (B, ld_out)
  int ld_out = 0;
  // kInProj: rows [0, d_inner) -> conv -> u, rows [d_inner, 2 d_inner) -> z
  int d_inner = 0, d_conv = 1;
  float const* conv_w = nullptr;
  float const* conv_b = nullptr;
  float* conv_state = nullptr;  ///< (B, d_conv - 1, d_inner)
  bool cvec = false;            ///< conv weights / bias / state of a block's channels 16-byte aligned:
                                ///< staged into shared memory before the wait (first batch pass)
  S* u = nullptr;
  S* z = nullptr;
  // kInProj, fused x_proj: xpart[(b * nxb + block) * X + j] = sum over the block's channels
  S const* xw = nullptr;  ///< x_proj weight (X, d_inner)
  bool xvec = false;      ///< its rows 16-byte aligned
  int nx = 0, nxb = 0;    ///< x_proj outputs (dt_rank + 2 d_state), K1 blocks with x rows
  float* xpart = nullptr;
};

/// Rows b0 .. b0+nb-1 of the norm input into xs (row r at xs + r * ldxs, zero-padded to a
/// multiple of 32); a warp per row. Same arithmetic as add_norm_forward.
template <class S>
__device__ __forceinline__ void norm_rows(GemvParams<S> const& p, S* xs, int b0, int nb, int warp, int lane,
                                          int nwarps) {
  int const K = p.K;
  int const Kp = (K + 31) & ~31;
  bool const from_table = p.tokens != nullptr;
  for (int r = warp; r < nb; r += nwarps) {
    int const b = b0 + r;
    float const* src = from_table ? p.table + static_cast<std::size_t>(p.tokens[b]) * K
                                  : p.resid + static_cast<std::size_t>(b) * K;
    bool const write_resid = from_table && p.resid != nullptr && blockIdx.x == 0;
    float* rdst = p.resid + static_cast<std::size_t>(b) * K;
    S* dst = xs + static_cast<std::size_t>(r) * p.ldxs;
    auto load = [&](int k) { return from_table ? __ldg(src + k) : __ldcg(src + k); };
    if (K <= 32 * kNormRegs) {
      float v[kNormRegs];
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNormRegs; ++i) {
        int const k = lane + 32 * i;
        v[i] = k < K ? load(k) : 0.f;
        sum += v[i];
      }
      float const mean = p.rms ? 0.f : warp_sum(sum) / static_cast<float>(K);
      float sq = 0.f;
#pragma unroll
      for (int i = 0; i < kNormRegs; ++i) {
        int const k = lane + 32 * i;
        if (k < K) {
          float const d = v[i] - mean;
          sq += d * d;
        }
      }
      float const rstd = 1.f / sqrtf(warp_sum(sq) / static_cast<float>(K) + p.eps);
#pragma unroll
      for (int i = 0; i < kNormRegs; ++i) {
        int const k = lane + 32 * i;
        if (k < Kp) {
          float o = 0.f;
          if (k < K) {
            float const bb = p.norm_b ? __ldg(p.norm_b + k) : 0.f;
            o = (v[i] - mean) * rstd * __ldg(p.norm_w + k) + bb;
            if (write_resid) rdst[k] = v[i];
          }
          dst[k] = from_f<S>(o);
        }
      }
    } else {  // wide rows: three passes through L2
      float sum = 0.f;
      for (int k = lane; k < K; k += 32) sum += load(k);
      float const mean = p.rms ? 0.f : warp_sum(sum) / static_cast<float>(K);
      float sq = 0.f;
      for (int k = lane; k < K; k += 32) {
        float const d = load(k) - mean;
        sq += d * d;
      }
      float const rstd = 1.f / sqrtf(warp_sum(sq) / static_cast<float>(K) + p.eps);
      for (int k = lane; k < Kp; k += 32) {
        float o = 0.f;
        if (k < K) {
          float const v = load(k);
          float const bb = p.norm_b ? __ldg(p.norm_b + k) : 0.f;
          o = (v - mean) * rstd * __ldg(p.norm_w + k) + bb;
          if (write_resid) rdst[k] = v;
        }
        dst[k] = from_f<S>(o);
      }
    }
  }
}

/// out rows [blockIdx.x * 16 RG, + 16 RG) of X W^T for every batch row, with the epilogue kEpi.
/// Shared memory: the weight tile (warps * kSteps * 2 * 32 * 16 * kV bytes), red (KS * 16 RG *
/// kPB floats), then (kNorm) xs (xs_rows * ldxs S), then (fused x_proj) us (kFuseXMaxBatch *
/// 16 RG floats).
template <class S, bool kNorm, Epi kEpi, int kMaxThreads>
MAMBABYTE_KERNEL void __launch_bounds__(kMaxThreads) gemv_kernel(GemvParams<S> const p) {
  constexpr int kSt = kSteps<S>;
  constexpr int kVv = kV<S>;
  constexpr int PB = kPB<S>;
  extern __shared__ __align__(16) unsigned char dec_smem[];
  pdl_trigger();

  int const tid = static_cast<int>(threadIdx.x);
  int const nthreads = static_cast<int>(blockDim.x);
  int const lane = tid & 31, warp = tid >> 5;
  int const g = lane >> 2, t = lane & 3;
  int const RB = 16 * p.RG;
  int const rg = warp % p.RG, ks = warp / p.RG;
  int const n0 = static_cast<int>(blockIdx.x) * RB;
  int const K = p.K;
  int const T = (K + 31) >> 5;
  int const s_begin = ks * p.spw;
  int const s_end = min(T, s_begin + p.spw);
  int const row_a = n0 + rg * 16 + g;
  S const* wra = row_a < p.N ? p.W + static_cast<std::size_t>(row_a) * K : nullptr;
  S const* wrb = row_a + 8 < p.N ? p.W + static_cast<std::size_t>(row_a + 8) * K : nullptr;

  // ---- before the wait: weights and this layer's state only
  // The warp's weight slice lives in shared memory, each lane's fragments in its own slots
  // (slot (i, ab, c) at wt[((i * 2 + ab) * kVv + c) * 32 + lane]: a warp reads 512 contiguous
  // bytes, and no lane reads another's, so no barrier is needed around the copies).
  uint4* wt = reinterpret_cast<uint4*>(dec_smem) + static_cast<std::size_t>(warp) * kSt * 2 * kVv * 32 + lane;
  auto stage_w = [&](int pass) {
#pragma unroll
    for (int i = 0; i < kSt; ++i) {
      int const s = s_begin + pass * kSt + i;
      bool const in = s < s_end;
      stage_frag<S>(in ? wra : nullptr, s * 32, t, K, p.vec, wt + (i * 2 + 0) * kVv * 32);
      stage_frag<S>(in ? wrb : nullptr, s * 32, t, K, p.vec, wt + (i * 2 + 1) * kVv * 32);
    }
    cp_async_commit();
  };
  stage_w(0);

  float* red = reinterpret_cast<float*>(reinterpret_cast<uint4*>(dec_smem) +
                                        static_cast<std::size_t>(p.RG) * p.KS * kSt * 2 * kVv * 32);
  S* xs = reinterpret_cast<S*>(red + static_cast<std::size_t>(p.KS) * RB * PB);
  float* us = reinterpret_cast<float*>(xs + (kNorm ? static_cast<std::size_t>(p.xs_rows) * p.ldxs : 0));
  // kInProj conv stage: weights (RB x d_conv), bias (RB), window (xs_rows x (d_conv-1) x RB)
  [[maybe_unused]] float* cws = us + (p.xpart != nullptr ? kFuseXMaxBatch * RB : 0);
  [[maybe_unused]] float* cbs = cws + RB * p.d_conv;
  [[maybe_unused]] float* cwin = cbs + RB;

  if constexpr (kNorm) {
    int const lines = (K + 31) / 32;  // 128-byte lines of the fp32 norm parameters
    for (int i = tid; i < lines; i += nthreads) {
      prefetch_l2(p.norm_w + 32 * i);
      if (p.norm_b) prefetch_l2(p.norm_b + 32 * i);
    }
  }
  [[maybe_unused]] int xcols = 0;
  [[maybe_unused]] bool xr_ok = false;
  [[maybe_unused]] uint4 xreg[4];
  if constexpr (kEpi == Epi::kInProj) {
    int const di = p.d_inner, Kc = p.d_conv;
    xcols = max(0, min(RB, di - n0));
    if (xcols > 0 && p.cvec) {
      // this layer's conv weights, bias and (first batch pass) window: into shared memory
      int const q4 = xcols / 4;  // xcols % 4 == 0 when cvec
      for (int i = tid; i < q4 * Kc; i += nthreads)
        cp_async16(cws + 4 * i, p.conv_w + static_cast<std::size_t>(n0) * Kc + 4 * i);
      if (p.conv_b != nullptr)
        for (int i = tid; i < q4; i += nthreads) cp_async16(cbs + 4 * i, p.conv_b + n0 + 4 * i);
      int const items = min(PB, p.B) * (Kc - 1) * q4;
      for (int i = tid; i < items; i += nthreads) {
        int const bk = i / q4, q = i - bk * q4;  // bk = b * (d_conv - 1) + k
        cp_async16(cwin + bk * RB + 4 * q, p.conv_state + static_cast<std::size_t>(bk) * di + n0 + 4 * q);
      }
      cp_async_commit();
    } else if (xcols > 0) {
      int const items = p.B * (Kc - 1);
      for (int i = tid; i < items; i += nthreads) {
        float const* q = p.conv_state + static_cast<std::size_t>(i) * di + n0;
        prefetch_l2(q);
        prefetch_l2(q + xcols - 1);
      }
      int const wn = xcols * Kc;
      for (int i = tid; i < (wn + 31) / 32; i += nthreads)
        prefetch_l2(p.conv_w + static_cast<std::size_t>(n0) * Kc + 32 * i);
      if (tid == 0) {
        prefetch_l2(p.conv_w + static_cast<std::size_t>(n0) * Kc + wn - 1);
        if (p.conv_b) prefetch_l2(p.conv_b + n0);
        if (p.conv_b) prefetch_l2(p.conv_b + n0 + xcols - 1);
      }
    }
    if (xcols > 0) {
      if (p.xpart != nullptr) {
        constexpr int kCap = 4 * kElems<S>;  // 64 bytes of the block's x_proj columns per thread
        xr_ok = p.xvec && xcols == kCap && tid < p.nx;
        if (xr_ok) {
          uint4 const* q = reinterpret_cast<uint4 const*>(p.xw + static_cast<std::size_t>(tid) * di + n0);
#pragma unroll
          for (int c = 0; c < 4; ++c) xreg[c] = __ldg(q + c);
        }
      }
    }
    if (p.bias != nullptr && tid == 0) prefetch_l2(p.bias + n0);
  }

  pdl_wait();  // ---- the previous kernel's outputs are visible from here on

  for (int b0 = 0; b0 < p.B; b0 += PB) {
    int const nb = min(PB, p.B - b0);
    if constexpr (kNorm) {
      norm_rows<S>(p, xs, b0, nb, warp, lane, nthreads >> 5);
      __syncthreads();
    }
    int const rl = rg * 16 + g;
    if constexpr (kMma<S>) {
      float acc[2][4];
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][c] = 0.f;
      int const ntiles = (nb + 7) >> 3;
      for (int pass = 0; pass < p.npass; ++pass) {
        if (p.npass > 1 && (pass > 0 || b0 > 0)) stage_w(pass);
        cp_async_wait_all();
        int const sp = s_begin + pass * kSt;
        int const nst = min(kSt, s_end - sp);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          if (nt < ntiles) {
            int const r = nt * 8 + g;  // this lane's batch row (B fragment column) in the pass
            bool const rin = r < nb;
            if constexpr (kNorm) {  // activations in shared memory: load as used
              S const* xr = rin ? xs + static_cast<std::size_t>(r) * p.ldxs : nullptr;
#pragma unroll
              for (int i = 0; i < kSt; ++i) {
                if (i < nst) {
                  uint4 xf[1];
                  load_frag_smem<S>(xr, (sp + i) * 32, t, xf);
                  uint4 const wa = wt[(i * 2 + 0) * 32];
                  uint4 const wb = wt[(i * 2 + 1) * 32];
                  mma_bf16(acc[nt], wa.x, wb.x, wa.y, wb.y, xf[0].x, xf[0].y);
                  mma_bf16(acc[nt], wa.z, wb.z, wa.w, wb.w, xf[0].z, xf[0].w);
                }
              }
            } else {  // activations from L2: every load of the pass issued first
              uint4 xf[kSt][1];
#pragma unroll
              for (int i = 0; i < kSt; ++i) {
                xf[i][0] = make_uint4(0u, 0u, 0u, 0u);
                if (i < nst)
                  load_frag<S, true>(rin ? p.X + static_cast<std::size_t>(b0 + r) * K : nullptr, (sp + i) * 32, t, K,
                                     p.vec, xf[i]);
              }
#pragma unroll
              for (int i = 0; i < kSt; ++i) {
                if (i < nst) {
                  uint4 const wa = wt[(i * 2 + 0) * 32];
                  uint4 const wb = wt[(i * 2 + 1) * 32];
                  mma_bf16(acc[nt], wa.x, wb.x, wa.y, wb.y, xf[i][0].x, xf[i][0].y);
                  mma_bf16(acc[nt], wa.z, wb.z, wa.w, wb.w, xf[i][0].z, xf[i][0].w);
                }
              }
            }
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        if (nt < ntiles) {
          float* r0 = red + static_cast<std::size_t>(ks * RB + rl) * PB + nt * 8 + 2 * t;
          r0[0] = acc[nt][0];
          r0[1] = acc[nt][1];
          r0[8 * PB] = acc[nt][2];
          r0[8 * PB + 1] = acc[nt][3];
        }
      }
    } else {
      float acc[2][PB];
#pragma unroll
      for (int n = 0; n < PB; ++n) acc[0][n] = acc[1][n] = 0.f;
      for (int pass = 0; pass < p.npass; ++pass) {
        if (p.npass > 1 && (pass > 0 || b0 > 0)) stage_w(pass);
        cp_async_wait_all();
        int const sp = s_begin + pass * kSt;
        int const nst = min(kSt, s_end - sp);
#pragma unroll
        for (int n = 0; n < PB; ++n) {
          if (n < nb) {
            uint4 xf[kSt][kVv];
#pragma unroll
            for (int i = 0; i < kSt; ++i) {
#pragma unroll
              for (int c = 0; c < kVv; ++c) xf[i][c] = make_uint4(0u, 0u, 0u, 0u);
              if (i < nst) {
                if constexpr (kNorm)
                  load_frag_smem<S>(xs + static_cast<std::size_t>(n) * p.ldxs, (sp + i) * 32, t, xf[i]);
                else
                  load_frag<S, true>(p.X + static_cast<std::size_t>(b0 + n) * K, (sp + i) * 32, t, K, p.vec, xf[i]);
              }
            }
#pragma unroll
            for (int i = 0; i < kSt; ++i) {
              if (i < nst) {
                uint4 wa[kVv], wb[kVv];
#pragma unroll
                for (int c = 0; c < kVv; ++c) {
                  wa[c] = wt[((i * 2 + 0) * kVv + c) * 32];
                  wb[c] = wt[((i * 2 + 1) * kVv + c) * 32];
                }
                float w8a[8], w8b[8], x8[8];
                unpack_frag<S>(wa, w8a);
                unpack_frag<S>(wb, w8b);
                unpack_frag<S>(xf[i], x8);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                  acc[0][n] = fmaf(w8a[e], x8[e], acc[0][n]);
                  acc[1][n] = fmaf(w8b[e], x8[e], acc[1][n]);
                }
              }
            }
          }
        }
      }
#pragma unroll
      for (int n = 0; n < PB; ++n) {
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          acc[a][n] += __shfl_xor_sync(0xffffffffu, acc[a][n], 1);
          acc[a][n] += __shfl_xor_sync(0xffffffffu, acc[a][n], 2);
        }
      }
#pragma unroll
      for (int n = 0; n < PB; ++n) {
        if ((n & 3) == t) {
          float* r0 = red + static_cast<std::size_t>(ks * RB + rl) * PB + n;
          r0[0] = acc[0][n];
          r0[8 * PB] = acc[1][n];
        }
      }
    }
    __syncthreads();

    // ---- the KS slices in order, then the epilogue of (row, batch row)
    for (int idx = tid; idx < RB * nb; idx += nthreads) {
      int const rli = idx / nb, nl = idx - rli * nb;
      int const row = n0 + rli;
      if (row >= p.N) continue;
      float s = 0.f;
      for (int q = 0; q < p.KS; ++q) s += red[static_cast<std::size_t>(q * RB + rli) * PB + nl];
      int const b = b0 + nl;
      if constexpr (kEpi == Epi::kStore) {
        p.out[static_cast<std::size_t>(b) * p.N + row] = from_f<S>(s);
      } else if constexpr (kEpi == Epi::kLogits) {
        p.out_f[static_cast<std::size_t>(b) * p.ld_out + row] = s;
      } else if constexpr (kEpi == Epi::kResidual) {
        float const h = round_s<S>(p.bias ? s + round_s<S>(__ldg(p.bias + row)) : s);
        float* rp = p.resid + static_cast<std::size_t>(b) * p.N + row;
        *rp = __ldcg(rp) + h;
      } else {  // kInProj
        int const di = p.d_inner;
        float const xz = round_s<S>(p.bias ? s + round_s<S>(__ldg(p.bias + row)) : s);
        if (row < di) {
          int const c = row, Kc = p.d_conv;
          float* st = p.conv_state + static_cast<std::size_t>(b) * (Kc - 1) * di + c;
          bool const staged = p.cvec && b0 == 0;  // shared-memory copies (first batch pass)
          float win[kMaxConv - 1];
#pragma unroll
          for (int k = 0; k < kMaxConv - 1; ++k) {
            win[k] = 0.f;
            if (k < Kc - 1)
              win[k] = staged ? cwin[(nl * (Kc - 1) + k) * RB + rli] : __ldcg(st + static_cast<std::size_t>(k) * di);
          }
          float const* w = staged ? cws + rli * Kc : p.conv_w + static_cast<std::size_t>(c) * Kc;
          float acc = p.conv_b ? (staged ? cbs[rli] : __ldg(p.conv_b + c)) : 0.f;
#pragma unroll
          for (int k = 0; k < kMaxConv - 1; ++k)
            if (k < Kc - 1) acc += w[k] * win[k];
          acc += w[Kc - 1] * xz;
#pragma unroll
          for (int k = 0; k < kMaxConv - 2; ++k)
            if (k < Kc - 2) st[static_cast<std::size_t>(k) * di] = win[k + 1];
          if (Kc > 1) st[static_cast<std::size_t>(Kc - 2) * di] = xz;
          S const uo = from_f<S>(silu(acc));
          p.u[static_cast<std::size_t>(b) * di + c] = uo;
          if (p.xpart != nullptr) us[nl * RB + rli] = to_f(uo);  // fused: B <= kFuseXMaxBatch, one pass
        } else {
          p.z[static_cast<std::size_t>(b) * di + (row - di)] = from_f<S>(xz);
        }
      }
    }
    __syncthreads();
  }

  if constexpr (kEpi == Epi::kInProj) {
    // fused x_proj: partial sums over this block's channels (us is complete: barrier above)
    if (p.xpart != nullptr && xcols > 0) {
      int const di = p.d_inner, X = p.nx;
      for (int j = tid; j < X; j += nthreads) {
        float s[kFuseXMaxBatch];
#pragma unroll
        for (int b = 0; b < kFuseXMaxBatch; ++b) s[b] = 0.f;
        if (xr_ok && j == tid) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float w[kElems<S>];
            unpack16<S>(xreg[c], w);
#pragma unroll
            for (int e = 0; e < kElems<S>; ++e) {
              int const col = c * kElems<S> + e;
#pragma unroll
              for (int b = 0; b < kFuseXMaxBatch; ++b)
                if (b < p.B) s[b] = fmaf(w[e], us[b * RB + col], s[b]);
            }
          }
        } else {
          S const* wr = p.xw + static_cast<std::size_t>(j) * di + n0;
          for (int col = 0; col < xcols; ++col) {
            float const w = ld_nc(wr + col);
#pragma unroll
            for (int b = 0; b < kFuseXMaxBatch; ++b)
              if (b < p.B) s[b] = fmaf(w, us[b * RB + col], s[b]);
          }
        }
#pragma unroll
        for (int b = 0; b < kFuseXMaxBatch; ++b)
          if (b < p.B) p.xpart[(static_cast<std::size_t>(b) * p.nxb + blockIdx.x) * X + j] = s[b];
      }
    }
  }
}

// ---- the SSM step kernel ------------------------------------------------------------------------

template <class S>
struct SsmParams {
  int B = 0, di = 0, N = 0, R = 0, X = 0;
  bool vec4 = false;          ///< d_state 16 and state / A_log 16-byte aligned
  float* state = nullptr;     ///< (B, di, N), in place
  S const* u = nullptr;       ///< (B, di)
  S const* z = nullptr;       ///< (B, di)
  S const* xdbl = nullptr;    ///< (B, X) when not fused
  float const* xpart = nullptr;  ///< (B, nxb, X) partial sums when fused
  int nxb = 0;
  S const* dt_w = nullptr;    ///< (di, R)
  float const* dt_b = nullptr;
  float const* A_log = nullptr;  ///< (di, N)
  float const* D = nullptr;
  S* y = nullptr;             ///< (B, di)
};

/// Channels blockIdx.x * kSsmChannels + tid / 4 of batch row blockIdx.y; 4 threads per channel,
/// kNT states each (4: d_state <= 16; 16: d_state <= 64). Dynamic shared memory: xs (X floats,
/// rounded up to 4), then the partial-sum scratch (max(X, 4 * kSsmThreads) floats).
template <class S, int kNT>
MAMBABYTE_KERNEL void __launch_bounds__(kSsmThreads) ssm_step_kernel(SsmParams<S> const p) {
  extern __shared__ __align__(16) float ssm_sh[];
  pdl_trigger();
  int const tid = static_cast<int>(threadIdx.x);
  int const nthreads = static_cast<int>(blockDim.x);
  int const sub = tid & 3;
  int const d = static_cast<int>(blockIdx.x) * kSsmChannels + (tid >> 2);
  int const b = static_cast<int>(blockIdx.y);
  bool const active = d < p.di;
  int const dc = active ? d : p.di - 1;
  int const N = p.N, R = p.R, X = p.X;
  int const n0 = sub * kNT;

  // ---- before the wait: this layer's state and parameters
  float* st = p.state + (static_cast<std::size_t>(b) * p.di + dc) * N + n0;
  float const* al = p.A_log + static_cast<std::size_t>(dc) * N + n0;
  float h[kNT], A2[kNT];
  if (kNT == 4 && p.vec4) {
    float4 const h4 = __ldcg(reinterpret_cast<float4 const*>(st));
    float4 const a4 = __ldg(reinterpret_cast<float4 const*>(al));
    h[0] = h4.x; h[1] = h4.y; h[2] = h4.z; h[3] = h4.w;
    A2[0] = -expf(a4.x) * kLog2e; A2[1] = -expf(a4.y) * kLog2e;
    A2[2] = -expf(a4.z) * kLog2e; A2[3] = -expf(a4.w) * kLog2e;
#pragma unroll
    for (int i = 4; i < kNT; ++i) h[i] = A2[i] = 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      bool const in = n0 + i < N;
      h[i] = in ? __ldcg(st + i) : 0.f;
      A2[i] = in ? -expf(__ldg(al + i)) * kLog2e : 0.f;
    }
  }
  int const RC = (R + 3) / 4;  // dt_proj columns per thread
  S const* wdr = p.dt_w + static_cast<std::size_t>(dc) * R + sub * RC;
  float wdt[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) wdt[i] = (i < RC && sub * RC + i < R) ? ld_nc(wdr + i) : 0.f;
  float const bias = p.dt_b ? __ldg(p.dt_b + dc) : 0.f;
  float const Dd = p.D ? __ldg(p.D + dc) : 0.f;

  pdl_wait();

  float const u = ld_cg(p.u + static_cast<std::size_t>(b) * p.di + dc);
  float const zz = ld_cg(p.z + static_cast<std::size_t>(b) * p.di + dc);
  float* xs = ssm_sh;
  float* part = ssm_sh + ((X + 3) & ~3);
  if (p.xpart != nullptr) {
    // xdbl[b] = round_S(sum over the K1 blocks of their partial sums, in block order)
    int const nxb = p.nxb;
    bool const v4 = (X & 3) == 0;
    int const Wd = v4 ? 4 : 1;
    int const Xq = X / Wd;
    int const Q = max(1, nthreads / Xq);
    float const* base = p.xpart + static_cast<std::size_t>(b) * nxb * X;
    for (int it = tid; it < Xq * Q; it += nthreads) {
      int const jq = it % Xq, q = it / Xq;
      if (v4) {
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int pp = q; pp < nxb; pp += Q) {
          float4 const v = __ldcg(reinterpret_cast<float4 const*>(base + static_cast<std::size_t>(pp) * X) + jq);
          s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        *reinterpret_cast<float4*>(part + q * X + 4 * jq) = s;
      } else {
        float s = 0.f;
#pragma unroll 8
        for (int pp = q; pp < nxb; pp += Q) s += __ldcg(base + static_cast<std::size_t>(pp) * X + jq);
        part[q * X + jq] = s;
      }
    }
    __syncthreads();
    for (int j = tid; j < X; j += nthreads) {
      float s = 0.f;
      for (int q = 0; q < Q; ++q) s += part[q * X + j];
      xs[j] = round_s<S>(s);
    }
  } else {
    for (int j = tid; j < X; j += nthreads) xs[j] = ld_cg(p.xdbl + static_cast<std::size_t>(b) * X + j);
  }
  __syncthreads();

  // dt = softplus(round_S(dt_proj row . xdbl[:R]) + bias)
  float dtp = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    int const r = sub * RC + i;
    if (i < RC && r < R) dtp = fmaf(wdt[i], xs[r], dtp);
  }
  for (int i = 16; i < RC; ++i) {
    int const r = sub * RC + i;
    if (r < R) dtp = fmaf(ld_nc(wdr + i), xs[r], dtp);
  }
  dtp += __shfl_xor_sync(0xffffffffu, dtp, 1);
  dtp += __shfl_xor_sync(0xffffffffu, dtp, 2);
  float const dt = softplus(round_s<S>(dtp) + bias);

  float Bv[kNT], Cv[kNT];
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    bool const in = n0 + i < N;
    Bv[i] = in ? xs[R + n0 + i] : 0.f;
    Cv[i] = in ? xs[R + N + n0 + i] : 0.f;
  }
  float const du = dt * u;
  float y0 = 0.f, y1 = 0.f;
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
    h[i] = fmaf(ex2_approx(dt * A2[i]), h[i], du * Bv[i]);  // 0 for n >= N
    if (i & 1) y1 = fmaf(h[i], Cv[i], y1);
    else y0 = fmaf(h[i], Cv[i], y0);
  }
  float y = y0 + y1;
  y += __shfl_xor_sync(0xffffffffu, y, 1);
  y += __shfl_xor_sync(0xffffffffu, y, 2);
  y = fmaf(Dd, u, y);
  y = __fdividef(y * zz, 1.f + __expf(-zz));

  if (!active) return;
  if (kNT == 4 && p.vec4) {
    *reinterpret_cast<float4*>(st) = make_float4(h[0], h[1], h[2], h[3]);
  } else {
#pragma unroll
    for (int i = 0; i < kNT; ++i)
      if (n0 + i < N) st[i] = h[i];
  }
  if (sub == 0) p.y[static_cast<std::size_t>(b) * p.di + d] = from_f<S>(y);
}

// ---- host side ------------------------------------------------------------------------------------

struct GemvShape {
  int RG = 1, KS = 1, spw = 0, npass = 1, threads = 32, blocks = 1;
};

/// Block shape of a GEMV with N rows and K columns: KS warps along K so that each holds at most
/// kSteps steps (up to max_warps), row groups filling 8 warps, one block per 16 RG rows.
template <class S>
inline GemvShape gemv_shape(int N, int K, int max_warps) {
  int const T = (K + 31) / 32;
  int const ks = std::clamp((T + kSteps<S> - 1) / kSteps<S>, 1, max_warps);
  int const groups = (N + 15) / 16;
  int rg = std::clamp(8 / ks, 1, std::max(1, max_warps / ks));
  rg = std::max(1, std::min(rg, groups));
  GemvShape s;
  s.RG = rg;
  s.KS = ks;
  s.spw = (T + ks - 1) / ks;
  s.npass = (s.spw + kSteps<S> - 1) / kSteps<S>;
  s.threads = 32 * rg * ks;
  s.blocks = (groups + rg - 1) / rg;
  return s;
}

inline int norm_ldxs(int K) { return (K + 63) / 64 * 64 + 32; }

/// Dynamic shared memory of a GEMV block (the layout of gemv_kernel); conv_k: d_conv for K1's
/// conv stage, else 0.
template <class S>
inline std::size_t gemv_smem(GemvShape const& s, bool norm, int xs_rows, int ldxs, bool fused, int conv_k = 0) {
  std::size_t const RB = 16 * static_cast<std::size_t>(s.RG);
  std::size_t bytes = static_cast<std::size_t>(s.RG) * s.KS * kSteps<S> * 2 * kV<S> * 32 * 16;  // weights
  bytes += static_cast<std::size_t>(s.KS) * RB * kPB<S> * sizeof(float);
  if (norm) bytes += static_cast<std::size_t>(xs_rows) * ldxs * sizeof(S);
  if (fused) bytes += kFuseXMaxBatch * RB * sizeof(float);
  if (conv_k > 0) bytes += (RB * (conv_k + 1) + static_cast<std::size_t>(xs_rows) * (conv_k - 1) * RB) * sizeof(float);
  return bytes;
}

inline bool aligned16(void const* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// Launch on be.stream with at most one launch attribute (null: none).
template <class... KArgs, class... Args>
inline void launch_with(Cuda const& be, cudaLaunchAttribute* attr, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                        std::size_t smem, Args const&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = be.stream;
  cfg.attrs = attr;
  cfg.numAttrs = attr != nullptr ? 1 : 0;
  MAMBABYTE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// Launch with (pdl) or without programmatic stream serialization.
template <class... KArgs, class... Args>
inline void launch_kernel(Cuda const& be, bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem,
                          Args const&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  launch_with(be, pdl ? &attr : nullptr, kernel, grid, block, smem, args...);
}

}  // namespace decode_detail

/// The dimensions of a decode step.
struct DecodeDims {
  int batch = 0, d_model = 0, d_inner = 0, d_state = 0, dt_rank = 0, d_conv = 0, n_layer = 0;
  int classes = 256;  ///< logits per row (the first rows of the head)
  float eps = 1e-5f;
  bool rms = false;
  int x_proj_out() const { return dt_rank + 2 * d_state; }
};

/// One layer's parameters (the views of DeviceWeights: fp32 master for the element-wise ones,
/// S for the GEMM weights) and recurrent state.
template <class S>
struct DecodeLayer {
  float const* norm_w = nullptr;
  float const* norm_b = nullptr;  ///< null for RMSNorm
  S const* in_proj_w = nullptr;
  float const* in_proj_b = nullptr;
  float const* conv_w = nullptr;
  float const* conv_b = nullptr;
  S const* x_proj_w = nullptr;
  S const* dt_proj_w = nullptr;
  float const* dt_proj_b = nullptr;
  float const* A_log = nullptr;
  float const* D = nullptr;
  S const* out_proj_w = nullptr;
  float const* out_proj_b = nullptr;
  float* conv_state = nullptr;  ///< (batch, d_conv - 1, d_inner)
  float* ssm_state = nullptr;   ///< (batch, d_inner, d_state)
};

/// Everything one decode step reads and writes. Scratch: resid (batch, d_model) fp32, u, z, y
/// (batch, d_inner) S, xdbl (batch, x_proj_out) S, xpart decode_xpart_floats() floats, logits
/// (batch, classes) fp32.
template <class S>
struct DecodeArgs {
  DecodeDims dims;
  std::int32_t const* tokens = nullptr;  ///< (batch) on the device
  float const* embedding = nullptr;      ///< (vocab, d_model) fp32
  std::vector<DecodeLayer<S>> layers;
  float const* norm_f_w = nullptr;
  float const* norm_f_b = nullptr;
  S const* lm_head = nullptr;            ///< (>= classes, d_model)
  float* resid = nullptr;
  S* u = nullptr;
  S* z = nullptr;
  S* xdbl = nullptr;
  S* y = nullptr;
  float* xpart = nullptr;
  float* logits = nullptr;
};

/// True when x_proj runs inside K1 (partial sums) for this batch.
inline bool decode_fuses_x_proj(DecodeDims const& d) { return d.batch <= decode_detail::kFuseXMaxBatch; }

/// Floats of the x_proj partial-sum scratch (0 when not fused).
template <class S>
inline std::size_t decode_xpart_floats(DecodeDims const& d) {
  if (!decode_fuses_x_proj(d)) return 0;
  auto const sh = decode_detail::gemv_shape<S>(2 * d.d_inner, d.d_model, decode_detail::kNormThreads / 32);
  std::size_t const nxb = (static_cast<std::size_t>(d.d_inner) + 16 * sh.RG - 1) / (16 * sh.RG);
  return static_cast<std::size_t>(d.batch) * nxb * d.x_proj_out();
}

namespace decode_detail {
template <class S>
inline std::size_t k1_smem(DecodeDims const& d) {
  auto const sh = gemv_shape<S>(2 * d.d_inner, d.d_model, kNormThreads / 32);
  return gemv_smem<S>(sh, true, std::min(kPB<S>, d.batch), norm_ldxs(d.d_model), decode_fuses_x_proj(d), d.d_conv);
}
template <class S>
inline std::size_t head_smem(DecodeDims const& d) {
  auto const sh = gemv_shape<S>(d.classes, d.d_model, kNormThreads / 32);
  return gemv_smem<S>(sh, true, std::min(kPB<S>, d.batch), norm_ldxs(d.d_model), false);
}
inline std::size_t ssm_smem(DecodeDims const& d) {
  int const X = d.x_proj_out();
  return (static_cast<std::size_t>((X + 3) & ~3) + std::max<std::size_t>(X, 4 * kSsmThreads)) * sizeof(float);
}
template <class S>
inline std::size_t plain_smem(int N, int K) {
  return gemv_smem<S>(gemv_shape<S>(N, K, kPlainThreads / 32), false, 0, 0, false);
}
}  // namespace decode_detail

/// Whether the fused decode path handles these dimensions on `device` (else: layer by layer).
template <class S>
inline bool decode_supported(DecodeDims const& d, int device) {
  using namespace decode_detail;
  if (d.batch <= 0 || d.batch > 65535 || d.d_model <= 0 || d.d_inner <= 0 || d.n_layer < 0 || d.dt_rank <= 0)
    return false;
  if (d.d_conv < 1 || d.d_conv > kMaxConv || d.d_state < 1 || d.d_state > kMaxState) return false;
  int major = 0, optin = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (kMma<S> && major < 8) return false;
  std::size_t const lim = static_cast<std::size_t>(optin);
  return k1_smem<S>(d) <= lim && head_smem<S>(d) <= lim && ssm_smem(d) <= lim &&
         plain_smem<S>(d.d_model, d.d_inner) <= lim && plain_smem<S>(d.x_proj_out(), d.d_inner) <= lim;
}

/// Lets the decode kernels use the device's whole opt-in shared memory (never lowered, so
/// models of other shapes in the process keep working) and prefer the largest shared-memory
/// carveout (one split for all of them: blocks of consecutive kernels share SMs). Call outside
/// graph capture, before decode_step.
template <class S>
inline void decode_setup(Cuda const& be, DecodeDims const& d) {
  using namespace decode_detail;
  (void)d;
  ScopedDevice guard(be.device);
  int optin = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, be.device));
  auto raise = [optin](auto kernel) {
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                              static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  };
  raise(gemv_kernel<S, true, Epi::kInProj, kNormThreads>);
  raise(gemv_kernel<S, true, Epi::kLogits, kNormThreads>);
  raise(gemv_kernel<S, false, Epi::kStore, kPlainThreads>);
  raise(gemv_kernel<S, false, Epi::kResidual, kPlainThreads>);
  raise(ssm_step_kernel<S, 4>);
  raise(ssm_step_kernel<S, 16>);
}

/// One decode step of every sequence (see the file comment): logits (batch, classes) from the
/// tokens, the recurrent states updated in place. Asynchronous on be.stream, graph-capturable.
/// pdl: chain the kernels with programmatic dependent launch (sm_90+).
template <class S>
void decode_step(Cuda const& be, DecodeArgs<S> const& a, bool pdl) {
  using namespace decode_detail;
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, __nv_bfloat16>, "decode: S is float or bf16");
  DecodeDims const& d = a.dims;
  require(static_cast<int>(a.layers.size()) == d.n_layer, "decode_step: ", a.layers.size(), " layers for n_layer ",
          d.n_layer);
  require(a.tokens && a.embedding && a.norm_f_w && a.lm_head && a.resid && a.u && a.z && a.xdbl && a.y && a.logits,
          "decode_step: null buffer or parameter");
  int const B = d.batch, dm = d.d_model, di = d.d_inner, X = d.x_proj_out();
  bool const fused = decode_fuses_x_proj(d);
  require(!fused || a.xpart != nullptr, "decode_step: null x_proj partial-sum scratch");
  ScopedDevice guard(be.device);

  auto const sh1 = gemv_shape<S>(2 * di, dm, kNormThreads / 32);
  auto const shx = gemv_shape<S>(X, di, kPlainThreads / 32);
  auto const sho = gemv_shape<S>(dm, di, kPlainThreads / 32);
  auto const shh = gemv_shape<S>(d.classes, dm, kNormThreads / 32);
  int const ldxs = norm_ldxs(dm);
  int const xs_rows = std::min(kPB<S>, B);
  int const nxb = (di + 16 * sh1.RG - 1) / (16 * sh1.RG);
  std::size_t const smem1 = k1_smem<S>(d), smemh = head_smem<S>(d), smems = ssm_smem(d);
  std::size_t const smemx = plain_smem<S>(X, di), smemo = plain_smem<S>(dm, di);
  bool const vec_dm = dm % kElems<S> == 0, vec_di = di % kElems<S> == 0;
  bool const vec_buf = aligned16(a.u) && aligned16(a.y);

  bool first = true;
  for (int l = 0; l < d.n_layer; ++l) {
    DecodeLayer<S> const& L = a.layers[static_cast<std::size_t>(l)];
    // K1: norm + in_proj + conv (+ x_proj partials)
    GemvParams<S> p1;
    p1.N = 2 * di; p1.K = dm; p1.B = B;
    p1.RG = sh1.RG; p1.KS = sh1.KS; p1.spw = sh1.spw; p1.npass = sh1.npass;
    p1.vec = vec_dm && aligned16(L.in_proj_w);
    p1.W = L.in_proj_w;
    p1.resid = a.resid;
    if (l == 0) { p1.tokens = a.tokens; p1.table = a.embedding; }
    p1.norm_w = L.norm_w; p1.norm_b = L.norm_b; p1.eps = d.eps; p1.rms = d.rms;
    p1.ldxs = ldxs; p1.xs_rows = xs_rows;
    p1.bias = L.in_proj_b;
    p1.d_inner = di; p1.d_conv = d.d_conv;
    p1.conv_w = L.conv_w; p1.conv_b = L.conv_b; p1.conv_state = L.conv_state;
    p1.cvec = di % 4 == 0 && aligned16(L.conv_w) && aligned16(L.conv_state) &&
              (L.conv_b == nullptr || aligned16(L.conv_b));
    p1.u = a.u; p1.z = a.z;
    if (fused) {
      p1.xw = L.x_proj_w; p1.xvec = vec_di && aligned16(L.x_proj_w);
      p1.nx = X; p1.nxb = nxb; p1.xpart = a.xpart;
    }
    launch_kernel(be, pdl && !first, gemv_kernel<S, true, Epi::kInProj, kNormThreads>, dim3(sh1.blocks),
                  dim3(sh1.threads), smem1, p1);
    first = false;
    // K2: x_proj (not fused)
    if (!fused) {
      GemvParams<S> px;
      px.N = X; px.K = di; px.B = B;
      px.RG = shx.RG; px.KS = shx.KS; px.spw = shx.spw; px.npass = shx.npass;
      px.vec = vec_di && aligned16(L.x_proj_w) && vec_buf;
      px.W = L.x_proj_w; px.X = a.u; px.out = a.xdbl;
      launch_kernel(be, pdl, gemv_kernel<S, false, Epi::kStore, kPlainThreads>, dim3(shx.blocks), dim3(shx.threads),
                    smemx, px);
    }
    // K3: SSM step
    SsmParams<S> ps;
    ps.B = B; ps.di = di; ps.N = d.d_state; ps.R = d.dt_rank; ps.X = X;
    ps.vec4 = d.d_state == 16 && aligned16(L.ssm_state) && aligned16(L.A_log);
    ps.state = L.ssm_state; ps.u = a.u; ps.z = a.z;
    if (fused) { ps.xpart = a.xpart; ps.nxb = nxb; }
    else ps.xdbl = a.xdbl;
    ps.dt_w = L.dt_proj_w; ps.dt_b = L.dt_proj_b; ps.A_log = L.A_log; ps.D = L.D; ps.y = a.y;
    dim3 const gs((di + kSsmChannels - 1) / kSsmChannels, B);
    if (d.d_state <= 16) launch_kernel(be, pdl, ssm_step_kernel<S, 4>, gs, dim3(kSsmThreads), smems, ps);
    else launch_kernel(be, pdl, ssm_step_kernel<S, 16>, gs, dim3(kSsmThreads), smems, ps);
    // K4: out_proj + residual
    GemvParams<S> po;
    po.N = dm; po.K = di; po.B = B;
    po.RG = sho.RG; po.KS = sho.KS; po.spw = sho.spw; po.npass = sho.npass;
    po.vec = vec_di && aligned16(L.out_proj_w) && vec_buf;
    po.W = L.out_proj_w; po.X = a.y; po.bias = L.out_proj_b; po.resid = a.resid;
    launch_kernel(be, pdl, gemv_kernel<S, false, Epi::kResidual, kPlainThreads>, dim3(sho.blocks), dim3(sho.threads),
                  smemo, po);
  }
  // head: norm_f + lm_head rows [0, classes) -> fp32 logits
  GemvParams<S> ph;
  ph.N = d.classes; ph.K = dm; ph.B = B;
  ph.RG = shh.RG; ph.KS = shh.KS; ph.spw = shh.spw; ph.npass = shh.npass;
  ph.vec = vec_dm && aligned16(a.lm_head);
  ph.W = a.lm_head;
  ph.resid = a.resid;
  if (d.n_layer == 0) { ph.tokens = a.tokens; ph.table = a.embedding; }
  ph.norm_w = a.norm_f_w; ph.norm_b = a.norm_f_b; ph.eps = d.eps; ph.rms = d.rms;
  ph.ldxs = ldxs; ph.xs_rows = xs_rows;
  ph.out_f = a.logits; ph.ld_out = d.classes;
  launch_kernel(be, pdl && !first, gemv_kernel<S, true, Epi::kLogits, kNormThreads>, dim3(shh.blocks),
                dim3(shh.threads), smemh, ph);
}

}  // namespace mambabyte::backend::cuda
