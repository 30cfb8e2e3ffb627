/*! \file
 *  \brief CUDA kernels of the model's layers besides the scan and the GEMMs: embedding (and its
 *         scatter-add backward), residual add + LayerNorm/RMSNorm (and backward), the causal
 *         depthwise conv1d + SiLU (and backward), cross-entropy, deterministic reductions,
 *         gradient clipping, fused AdamW and dtype conversion; plus the layers:: operator
 *         contracts (layers/layers.hpp, layers/backward.hpp) for (backend::Cuda, float).
 *
 *  Conventions (as the CPU backend): activations are token-major rows, row r = b*length + t;
 *  storage types T/TH/TO/TD/TC are `float` or `__nv_bfloat16`, all arithmetic is fp32 and
 *  parameters (weights, biases, their gradients) are always float. Every function launches
 *  asynchronously on `be.stream` under a ScopedDevice guard and checks the launch; workspaces
 *  are device memory of exactly `*_workspace_bytes()` bytes (null allowed when that is 0),
 *  owned by the caller and in use until the stream passes the call.
 *
 *  Determinism. Training must resume bit-exactly, so no result depends on scheduling: there
 *  are no floating-point atomics. Every reduction has a fixed shape that depends only on the
 *  problem size (never on the GPU's SM count) and adds in a fixed order:
 *   - rows -> per-row statistics: warp xor-butterflies, then the warps' totals in warp order;
 *   - sums over rows of parameter gradients (norm weight/bias, conv weight/bias): a fixed grid of
 *     row groups writes one partial row each into the workspace, then column_reduce adds the
 *     partials of every column in group order (8 strided slices, then the slices in order);
 *   - embedding backward: a stable counting sort of the rows by token (integer atomics only
 *     for the histogram, whose values do not depend on order), then each token's rows summed
 *     in row order, in pieces of 256 sorted rows whose partial sums are added in piece order;
 *   - deterministic_sum / sum_of_squares: fixed 8192-element blocks summed in double, then the
 *     block partials in block order.
 *
 *  Reached only through <mambabyte/cuda.hpp>.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>
#include <type_traits>
#include <vector>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/core/error.hpp"
#include "mambabyte/layers/backward.hpp"
#include "mambabyte/layers/layers.hpp"
#include "mambabyte/policy/policy.hpp"

namespace mambabyte::backend::cuda {

/// The device bfloat16 type (storage only; math is fp32).
using bf16 = __nv_bfloat16;

namespace layers_detail {

template <class T>
inline constexpr bool is_storage_v = std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>;

// ---- element access ---------------------------------------------------------------------------

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

/// fp32 -> storage type (bf16: round to nearest even).
template <class T>
__device__ __forceinline__ T narrow(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __float2bfloat16_rn(v);
}

/// Four bf16 in 8 bytes (one vector access).
struct alignas(8) Bf16x4 {
  __nv_bfloat162 lo, hi;
};

/// Loads kVec (1 or 4) consecutive elements as fp32; kVec == 4 needs p aligned to 4 elements.
template <int kVec, class T>
__device__ __forceinline__ void load_vec(T const* p, float (&v)[kVec]) {
  if constexpr (kVec == 1) {
    v[0] = widen(*p);
  } else if constexpr (std::is_same_v<T, float>) {
    float4 const q = *reinterpret_cast<float4 const*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else {
    Bf16x4 const q = *reinterpret_cast<Bf16x4 const*>(p);
    float2 const a = __bfloat1622float2(q.lo), b = __bfloat1622float2(q.hi);
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
  }
}

/// Stores kVec (1 or 4) consecutive elements converted to T; same alignment rule as load_vec.
template <int kVec, class T>
__device__ __forceinline__ void store_vec(T* p, float const (&v)[kVec]) {
  if constexpr (kVec == 1) {
    *p = narrow<T>(v[0]);
  } else if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    Bf16x4 q;
    q.lo = __floats2bfloat162_rn(v[0], v[1]);
    q.hi = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<Bf16x4*>(p) = q;
  }
}

/// Four consecutive elements as stored (one 16-byte fp32 / 8-byte bf16 access), widened when
/// used: a thread can hold many loads in flight in half the registers for bf16.
template <class T>
using Raw4 = std::conditional_t<std::is_same_v<T, float>, float4, Bf16x4>;

template <class T>
__device__ __forceinline__ Raw4<T> load_raw4(T const* p) {
  return *reinterpret_cast<Raw4<T> const*>(p);
}

__device__ __forceinline__ void widen4(float4 const& q, float (&v)[4]) {
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void widen4(Bf16x4 const& q, float (&v)[4]) {
  float2 const a = __bfloat1622float2(q.lo), b = __bfloat1622float2(q.hi);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

/// True when p is a multiple of `bytes` (null counts as aligned: an absent operand never
/// stops a vector path).
inline bool is_aligned(void const* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline std::size_t align_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

__device__ __forceinline__ std::int64_t imin64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

inline unsigned grid_1d(std::size_t work, unsigned threads, std::size_t cap = 65535) {
  return static_cast<unsigned>(std::clamp<std::size_t>((work + threads - 1) / threads, 1, cap));
}

// ---- fixed-order reductions ------------------------------------------------------------------

/// Sum over the 32 lanes by an xor butterfly: every lane ends with the same bits (each level
/// adds a + b on one lane and b + a on its partner).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// Sum over a 1-D block (blockDim.x a multiple of 32): warp butterflies, then the warp totals
/// in warp order. Every thread gets the total. `red` is shared memory of 32 elements; the
/// function ends with a barrier, so `red` may be reused at once.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  v = warp_sum(v);
  int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T s = red[0];
  for (int i = 1; i < nw; ++i) s += red[i];
  __syncthreads();
  return s;
}

/// Two block sums at once (`red`: 64 elements of shared memory).
__device__ __forceinline__ void block_sum2(float& a, float& b, float* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  float sa = red[0], sb = red[32];
  for (int i = 1; i < nw; ++i) {
    sa += red[i];
    sb += red[32 + i];
  }
  __syncthreads();
  a = sa;
  b = sb;
}

inline constexpr int kColReduceX = 32;  ///< columns per column_reduce block
/// Group slices per column_reduce block: each thread walks groups / slices partial rows. 8
/// slices, or kColReduceWideY from kColReduceWideFrom groups on (the norm backward's 2048 row
/// groups over only d_model / 32 blocks: with 8 slices its column sums took ~40 of its 218 µs).
inline constexpr int kColReduceY = 8;
inline constexpr int kColReduceWideY = 32;
inline constexpr int kColReduceWideFrom = 256;

// ---- row kernels (add + norm) ----------------------------------------------------------------

inline constexpr int kRowElems = 8;       ///< elements of a row per thread
inline constexpr int kMaxRowDim = 8192;   ///< 1024 threads x kRowElems
/// Row groups (partial rows) of the norm backward: each group's block walks its rows one after
/// the other (three block reductions per row), so the groups are the backward's parallelism;
/// 2048 fill an H200 with 4-warp blocks at d_model 1024 (16 per SM; 512 filled a quarter of
/// it), for 16 MB of partials.
inline constexpr int kNormGroups = 2048;

/// Threads of a row kernel for `dim`: a multiple of 32 covering dim with kRowElems per thread.
inline int row_threads(int dim) {
  int const need = (dim + kRowElems - 1) / kRowElems;
  return std::clamp((need + 31) / 32 * 32, 32, 1024);
}

template <class TH, class TO>
struct AddNormForwardParams {
  int rows = 0, dim = 0;
  float const* residual_in = nullptr;
  TH const* hidden = nullptr;
  float* residual_out = nullptr;
  float const* weight = nullptr;
  float const* bias = nullptr;
  TO* out = nullptr;
  float eps = 1e-5f;
  bool rms = false;
};

template <class TD, class TC>
struct AddNormBackwardParams {
  int rows = 0, dim = 0;
  float const* residual = nullptr;
  float const* weight = nullptr;
  TD const* dout = nullptr;
  float* dresidual = nullptr;
  TC* dresidual_copy = nullptr;
  float* partial = nullptr;  ///< (gridDim.x, 2, dim): dweight then dbias partials, or null
  float eps = 1e-5f;
  bool rms = false;
};

// ---- embedding backward ----------------------------------------------------------------------

inline constexpr int kEmbChunk = 512;     ///< rows per ranking block of the counting sort
inline constexpr int kEmbPiece = 256;     ///< sorted rows per partial-sum piece
inline constexpr int kEmbThreads = 128;   ///< threads (columns or column quads) per piece block
inline constexpr int kEmbBatch = 8;       ///< rows loaded ahead in the piece walk

/// Byte offsets of the embedding backward's workspace sections (each 256-byte aligned).
struct EmbeddingBackwardLayout {
  int chunks = 0, pieces = 0;
  std::size_t hist = 0, start = 0, perm = 0, stok = 0, partial = 0, total = 0;
  EmbeddingBackwardLayout(int rows, int dim, int vocab) {
    if (rows <= 0 || dim <= 0 || vocab <= 0) return;
    chunks = (rows + kEmbChunk - 1) / kEmbChunk;
    pieces = (rows + kEmbPiece - 1) / kEmbPiece;
    std::size_t off = 0;
    auto take = [&](std::size_t bytes) {
      std::size_t const at = off;
      off = align_up(off + bytes, 256);
      return at;
    };
    hist = take(static_cast<std::size_t>(chunks) * vocab * sizeof(int));
    start = take(static_cast<std::size_t>(vocab) * sizeof(int));
    perm = take(static_cast<std::size_t>(rows) * sizeof(int));
    stok = take(static_cast<std::size_t>(rows) * sizeof(int));
    partial = take(2 * static_cast<std::size_t>(pieces) * dim * sizeof(float));
    total = off;
  }
};

struct EmbeddingBackwardParams {
  int rows = 0, dim = 0, vocab = 0, pieces = 0;
  std::int32_t const* tokens = nullptr;
  float const* dout = nullptr;
  float* dtable = nullptr;
  int* hist = nullptr;    ///< (chunks, vocab): counts, then each chunk's offset within its token
  int* start = nullptr;   ///< (vocab): first sorted position of each token
  int* perm = nullptr;    ///< (rows): sorted position -> row
  int* stok = nullptr;    ///< (rows): sorted position -> token (-1 past the valid rows)
  float* first = nullptr; ///< (pieces, dim): sum of a piece's first run when it crosses the piece
  float* last = nullptr;  ///< (pieces, dim): sum of a piece's last run when it crosses the piece
};

// ---- conv1d ----------------------------------------------------------------------------------

inline constexpr int kConvThreads = 128;   ///< channels per forward block
inline constexpr int kConvTile = 32;       ///< time steps per forward thread (at least width-1)
inline constexpr int kConvBwdX = 32;       ///< channels per backward block
inline constexpr int kConvBwdY = 8;        ///< time tiles per backward block (summed in the block)
inline constexpr int kConvBwdTile = 64;    ///< time steps per backward thread
inline constexpr int kMaxConvWidth = 64;   ///< widest kernel (ModelConfig allows d_conv <= 64)
inline constexpr int kConvVec = 4;         ///< channels per thread of the vectorized kernels
inline constexpr int kConvAhead = 8;       ///< steps a vectorized forward thread loads before using them
inline constexpr int kConvBwdAhead = 4;    ///< the same for the backward (two tensors; 2 blocks per SM)
inline constexpr int kConvVecMaxWidth = 4; ///< widest kernel of the vectorized path

template <class T>
struct ConvForwardParams {
  int batch = 0, length = 0, channels = 0, width = 0, tile = kConvTile;
  T const* x = nullptr;
  std::int64_t ld_x = 0;
  float const* weight = nullptr;
  float const* bias = nullptr;
  T* out = nullptr;
  std::int64_t ld_out = 0;
  float* state = nullptr;
  bool silu = true;
};

template <class T>
struct ConvBackwardParams {
  int batch = 0, length = 0, channels = 0, width = 0;
  T const* x = nullptr;
  std::int64_t ld_x = 0;
  float const* weight = nullptr;
  float const* bias = nullptr;
  bool silu = true;
  T const* dout = nullptr;
  std::int64_t ld_dout = 0;
  T* dx = nullptr;
  std::int64_t ld_dx = 0;
  float* partial = nullptr;  ///< (groups, channels*(width+1)): dweight (c*width+k) then dbias (c)
};

// ---- cross-entropy, reductions, AdamW --------------------------------------------------------

inline constexpr int kCeThreads = 256;     ///< 8 rows (one warp each) per block
inline constexpr int kMaxClasses = 1024;   ///< 32 logits per lane

template <class TD>
struct CrossEntropyParams {
  int rows = 0, classes = 0;
  std::int64_t zero_to = 0;  ///< dlogits columns [classes, zero_to) are set to 0
  float const* logits = nullptr;
  std::int64_t ld_logits = 0;
  std::int32_t const* targets = nullptr;
  TD* dlogits = nullptr;
  std::int64_t ld_dlogits = 0;
  float grad_scale = 1.f;
  float* row_loss = nullptr;
};

inline constexpr int kSumThreads = 256;
inline constexpr int kSumIters = 8;
inline constexpr std::size_t kSumChunk = std::size_t(kSumThreads) * 4 * kSumIters;  ///< 8192
inline constexpr int kSumFinalThreads = 1024;

inline constexpr int kAdamPiece = 4096;    ///< elements per AdamW block
inline constexpr int kAdamThreads = 256;

}  // namespace layers_detail

/// One entry of an AdamWPlan's device table: `count` (<= 4096) elements from `offset`, with
/// weight decay when `decay` != 0.
struct AdamWPiece {
  std::uint64_t offset = 0;
  std::uint32_t count = 0;
  std::uint32_t decay = 0;
};

namespace layers_detail {

struct AdamWParams {
  AdamWPiece const* pieces = nullptr;
  float* param = nullptr;
  float const* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  __nv_bfloat16* param_bf16 = nullptr;
  float lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, c1 = 1, c2 = 1;
  float const* grad_scale = nullptr;
  bool vec = false;  ///< every pointer aligned for 4-wide accesses
};

namespace kernel {

// ---- embedding -------------------------------------------------------------------------------

/// out[r, :] = table[tokens[r], :]; block r, threads over column groups of kVec.
template <int kVec>
MAMBABYTE_KERNEL void embedding_forward(int dim, std::int32_t const* MAMBABYTE_RESTRICT tokens,
                                        float const* MAMBABYTE_RESTRICT table, float* MAMBABYTE_RESTRICT out) {
  std::int64_t const r = blockIdx.x;
  float const* src = table + static_cast<std::int64_t>(tokens[r]) * dim;
  float* dst = out + r * dim;
  for (int c = threadIdx.x * kVec; c < dim; c += blockDim.x * kVec) {
    float v[kVec];
    load_vec<kVec>(src + c, v);
    store_vec<kVec>(dst + c, v);
  }
}

/// hist[chunk, token] += 1 for every row of the chunk with a valid token (integer atomics: the
/// counts do not depend on the order).
MAMBABYTE_KERNEL void __launch_bounds__(kEmbChunk)
    embedding_histogram(int rows, int vocab, std::int32_t const* MAMBABYTE_RESTRICT tokens, int* hist) {
  int const r = blockIdx.x * kEmbChunk + threadIdx.x;
  if (r >= rows) return;
  int const t = tokens[r];
  if (t >= 0 && t < vocab) atomicAdd(&hist[static_cast<std::int64_t>(blockIdx.x) * vocab + t], 1);
}

/// One block: hist[c, v] becomes the exclusive prefix over chunks (rows of token v in chunks
/// before c) and start[v] the exclusive prefix over tokens of the totals.
MAMBABYTE_KERNEL void __launch_bounds__(1024) embedding_offsets(int chunks, int vocab, int* hist, int* start) {
  __shared__ int scan[1024];
  __shared__ int carry;
  int const tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int v0 = 0; v0 < vocab; v0 += 1024) {
    int const v = v0 + tid;
    int total = 0;
    if (v < vocab) {
      int* h = hist + v;
      int c = 0;
      for (; c + 4 <= chunks; c += 4) {  // four independent loads in flight
        int const h0 = h[static_cast<std::int64_t>(c) * vocab], h1 = h[static_cast<std::int64_t>(c + 1) * vocab];
        int const h2 = h[static_cast<std::int64_t>(c + 2) * vocab], h3 = h[static_cast<std::int64_t>(c + 3) * vocab];
        h[static_cast<std::int64_t>(c) * vocab] = total;
        h[static_cast<std::int64_t>(c + 1) * vocab] = total + h0;
        h[static_cast<std::int64_t>(c + 2) * vocab] = total + h0 + h1;
        h[static_cast<std::int64_t>(c + 3) * vocab] = total + h0 + h1 + h2;
        total += h0 + h1 + h2 + h3;
      }
      for (; c < chunks; ++c) {
        int const hc = h[static_cast<std::int64_t>(c) * vocab];
        h[static_cast<std::int64_t>(c) * vocab] = total;
        total += hc;
      }
    }
    scan[tid] = total;
    __syncthreads();
    for (int o = 1; o < 1024; o <<= 1) {  // inclusive Hillis-Steele scan (integers: exact)
      int const add = tid >= o ? scan[tid - o] : 0;
      __syncthreads();
      scan[tid] += add;
      __syncthreads();
    }
    if (v < vocab) start[v] = carry + scan[tid] - total;
    __syncthreads();
    if (tid == 1023) carry += scan[1023];
    __syncthreads();
  }
}

/// Stable scatter: row r of chunk c with token t goes to sorted position
/// start[t] + hist[c, t] + (rows of the chunk before r with token t).
MAMBABYTE_KERNEL void __launch_bounds__(kEmbChunk)
    embedding_scatter(int rows, int vocab, std::int32_t const* MAMBABYTE_RESTRICT tokens,
                      int const* MAMBABYTE_RESTRICT hist, int const* MAMBABYTE_RESTRICT start,
                      int* MAMBABYTE_RESTRICT perm, int* MAMBABYTE_RESTRICT stok) {
  __shared__ int tok[kEmbChunk];
  int const i = threadIdx.x;
  int const r = blockIdx.x * kEmbChunk + i;
  int t = r < rows ? tokens[r] : -1;
  if (t >= vocab) t = -1;
  tok[i] = t;
  __syncthreads();
  if (t < 0) return;
  int rank = 0;
  for (int j = 0; j < i; ++j) rank += tok[j] == t;  // shared-memory broadcast reads
  int const pos = start[t] + hist[static_cast<std::int64_t>(blockIdx.x) * vocab + t] + rank;
  perm[pos] = r;
  stok[pos] = t;
}

/// Piece blockIdx.x of the sorted rows, columns (blockIdx.y * blockDim.x + threadIdx.x) * kVec:
/// each run of equal tokens is summed in row order; a run entirely inside the piece is added
/// to dtable here, a run that crosses the piece's start goes to first[piece], one that crosses
/// its end to last[piece] (a run crossing both: first[piece]).
template <int kVec>
MAMBABYTE_KERNEL void __launch_bounds__(kEmbThreads) embedding_pieces(EmbeddingBackwardParams p) {
  __shared__ int s_perm[kEmbPiece];
  __shared__ int s_tok[kEmbPiece];
  int const piece = blockIdx.x;
  std::int64_t const i0 = static_cast<std::int64_t>(piece) * kEmbPiece;
  int const n = static_cast<int>(imin64(kEmbPiece, p.rows - i0));
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s_perm[i] = p.perm[i0 + i];
    s_tok[i] = p.stok[i0 + i];
  }
  int const prev = piece > 0 ? p.stok[i0 - 1] : -1;
  int const next = i0 + n < p.rows ? p.stok[i0 + n] : -1;
  __syncthreads();
  int const col = (blockIdx.y * blockDim.x + threadIdx.x) * kVec;
  if (col >= p.dim) return;  // no barrier below
  float s[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) s[j] = 0.f;
  int run_begin = 0;
  for (int b0 = 0; b0 < n; b0 += kEmbBatch) {
    float val[kEmbBatch][kVec];
#pragma unroll
    for (int k = 0; k < kEmbBatch; ++k) {
      int const i = b0 + k;
      if (i < n && s_tok[i] >= 0) {
        load_vec<kVec>(p.dout + static_cast<std::int64_t>(s_perm[i]) * p.dim + col, val[k]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) val[k][j] = 0.f;
      }
    }
#pragma unroll
    for (int k = 0; k < kEmbBatch; ++k) {
      int const i = b0 + k;
      if (i < n) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) s[j] += val[k][j];
        int const v = s_tok[i];
        if (i + 1 == n || s_tok[i + 1] != v) {  // the run [run_begin, i] ends here
          if (v >= 0) {
            bool const before = run_begin == 0 && prev == v;
            bool const after = i + 1 == n && next == v;
            if (!before && !after) {
              float* dst = p.dtable + static_cast<std::int64_t>(v) * p.dim + col;
              float cur[kVec];
              load_vec<kVec>(dst, cur);
#pragma unroll
              for (int j = 0; j < kVec; ++j) cur[j] += s[j];
              store_vec<kVec>(dst, cur);
            } else {
              float* dst = (run_begin == 0 ? p.first : p.last) + static_cast<std::int64_t>(piece) * p.dim + col;
              store_vec<kVec>(dst, s);
            }
          }
#pragma unroll
          for (int j = 0; j < kVec; ++j) s[j] = 0.f;
          run_begin = i + 1;
        }
      }
    }
  }
}

/// Tokens whose rows cross piece boundaries: the piece where the run starts (its owner) adds
/// its own part and the following pieces' first[] in piece order, then dtable[token] += total.
template <int kVec>
MAMBABYTE_KERNEL void __launch_bounds__(kEmbThreads) embedding_fixup(EmbeddingBackwardParams p) {
  int const q = blockIdx.x;
  std::int64_t const i0 = static_cast<std::int64_t>(q) * kEmbPiece;
  std::int64_t const end = imin64(p.rows, i0 + kEmbPiece);
  int const v = p.stok[end - 1];
  if (v < 0 || end >= p.rows || p.stok[end] != v) return;  // the last run ends in this piece
  bool const single = p.stok[i0] == v;                     // the whole piece is one run
  if (single && q > 0 && p.stok[i0 - 1] == v) return;      // ... that started earlier: not the owner
  int const col = (blockIdx.y * blockDim.x + threadIdx.x) * kVec;
  if (col >= p.dim) return;
  float s[kVec];
  load_vec<kVec>((single ? p.first : p.last) + static_cast<std::int64_t>(q) * p.dim + col, s);
  for (int pc = q + 1; pc < p.pieces; ++pc) {
    float f[kVec];
    load_vec<kVec>(p.first + static_cast<std::int64_t>(pc) * p.dim + col, f);
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[j] += f[j];
    std::int64_t const e = imin64(p.rows, static_cast<std::int64_t>(pc + 1) * kEmbPiece);
    if (!(e < p.rows && p.stok[e - 1] == v && p.stok[e] == v)) break;  // the run ends in piece pc
  }
  float* dst = p.dtable + static_cast<std::int64_t>(v) * p.dim + col;
  float cur[kVec];
  load_vec<kVec>(dst, cur);
#pragma unroll
  for (int j = 0; j < kVec; ++j) cur[j] += s[j];
  store_vec<kVec>(dst, cur);
}

// ---- column reduction ------------------------------------------------------------------------

/// out[c] += sum_{g < groups} ws[g * ld + c] for c < n, in a fixed order: slice y of the
/// block adds groups y, y + kY, ... in turn; then the kY slices are added in slice order.
template <int kY>
MAMBABYTE_KERNEL void __launch_bounds__(kColReduceX * kY)
    column_reduce(float const* MAMBABYTE_RESTRICT ws, std::int64_t ld, int groups, std::int64_t n,
                  float* MAMBABYTE_RESTRICT out) {
  __shared__ float part[kY][kColReduceX + 1];
  std::int64_t const c = static_cast<std::int64_t>(blockIdx.x) * kColReduceX + threadIdx.x;
  float s = 0.f;
  if (c < n) {
#pragma unroll 8
    for (int g = threadIdx.y; g < groups; g += kY) s += ws[static_cast<std::int64_t>(g) * ld + c];
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float t = part[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < kY; ++y) t += part[y][threadIdx.x];
    out[c] += t;
  }
}

// ---- add + norm ------------------------------------------------------------------------------

/// Row blockIdx.x: r = residual_in + hidden (stored to residual_out), then LayerNorm / RMSNorm.
/// Thread tid holds elements (it * blockDim.x + tid) * kVec + [0, kVec) for it < kRowElems / kVec.
template <class TH, class TO, int kVec>
MAMBABYTE_KERNEL void __launch_bounds__(1024) add_norm_forward(AddNormForwardParams<TH, TO> p) {
  constexpr int kIters = kRowElems / kVec;
  __shared__ float red[32];
  int const D = p.dim;
  std::int64_t const base = static_cast<std::int64_t>(blockIdx.x) * D;
  float v[kIters][kVec];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[it][j] = 0.f;
    if (e < D) {
      if (p.residual_in) load_vec<kVec>(p.residual_in + base + e, v[it]);
      if (p.hidden) {
        float h[kVec];
        load_vec<kVec>(p.hidden + base + e, h);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[it][j] += h[j];
      }
      store_vec<kVec>(p.residual_out + base + e, v[it]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum += v[it][j];
    }
  }
  float const mean = p.rms ? 0.f : block_sum(sum, red) / static_cast<float>(D);
  float sq = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
    if (e < D) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float const d = v[it][j] - mean;
        sq += d * d;
      }
    }
  }
  float const var = block_sum(sq, red) / static_cast<float>(D);
  float const rstd = 1.f / sqrtf(var + p.eps);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
    if (e < D) {
      float w[kVec], b[kVec], o[kVec];
      load_vec<kVec>(p.weight + e, w);
      if (p.bias) {
        load_vec<kVec>(p.bias + e, b);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) b[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = (v[it][j] - mean) * rstd * w[j] + b[j];
      store_vec<kVec>(p.out + base + e, o);
    }
  }
}

/// Rows blockIdx.x, + gridDim.x, ...: dresidual += gradient through the norm (and the TC copy);
/// the block's sums over its rows of dout * xh and dout go to partial[blockIdx.x] (fixed rows,
/// fixed order).
template <class TD, class TC, int kVec>
MAMBABYTE_KERNEL void __launch_bounds__(1024) add_norm_backward(AddNormBackwardParams<TD, TC> p) {
  constexpr int kIters = kRowElems / kVec;
  __shared__ float red[64];
  int const D = p.dim;
  float const inv_d = 1.f / static_cast<float>(D);
  float dw[kIters][kVec], db[kIters][kVec];  // this thread's columns, summed over the group's rows
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dw[it][j] = db[it][j] = 0.f;
  }
  for (int row = blockIdx.x; row < p.rows; row += gridDim.x) {
    std::int64_t const base = static_cast<std::int64_t>(row) * D;
    float x[kIters][kVec], g[kIters][kVec];
    float sum = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[it][j] = g[it][j] = 0.f;
      if (e < D) {
        load_vec<kVec>(p.residual + base + e, x[it]);
        load_vec<kVec>(p.dout + base + e, g[it]);  // dout for now; g = dout * w below
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum += x[it][j];
      }
    }
    float const mean = p.rms ? 0.f : block_sum(sum, red) * inv_d;
    float sq = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
      if (e < D) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          float const d = x[it][j] - mean;
          sq += d * d;
        }
      }
    }
    float const rstd = 1.f / sqrtf(block_sum(sq, red) * inv_d + p.eps);
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
      if (e < D) {
        float w[kVec];  // re-read per row (L1): fewer live registers than keeping it
        load_vec<kVec>(p.weight + e, w);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          float const dout = g[it][j];
          float const xh = (x[it][j] - mean) * rstd;
          x[it][j] = xh;
          dw[it][j] += dout * xh;
          db[it][j] += dout;
          float const gg = dout * w[j];
          g[it][j] = gg;
          sg += gg;
          sgx += gg * xh;
        }
      }
    }
    block_sum2(sg, sgx, red);
    float const mg = p.rms ? 0.f : sg * inv_d, mgx = sgx * inv_d;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
      if (e < D) {
        float dr[kVec];
        load_vec<kVec>(p.dresidual + base + e, dr);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dr[j] += rstd * (g[it][j] - mg - x[it][j] * mgx);
        store_vec<kVec>(p.dresidual + base + e, dr);
        if (p.dresidual_copy) store_vec<kVec>(p.dresidual_copy + base + e, dr);
      }
    }
  }
  if (p.partial) {
    float* dst = p.partial + static_cast<std::int64_t>(blockIdx.x) * 2 * D;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      int const e = (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
      if (e < D) {
        store_vec<kVec>(dst + e, dw[it]);
        store_vec<kVec>(dst + D + e, db[it]);
      }
    }
  }
}

// ---- conv1d ----------------------------------------------------------------------------------

/// silu(x) = x sig(x) with the special-function sigmoid (a few ulp; expf and an IEEE division
/// were about half of the conv kernels' instructions). Both conv paths use it: the vectorized
/// and the scalar kernels agree bitwise.
__device__ __forceinline__ float silu_f(float x) { return x * fast::sigmoid_fast(x); }
/// d silu(x) / dx = sig(x) (1 + x (1 - sig(x))).
__device__ __forceinline__ float dsilu_f(float x) {
  float const sig = fast::sigmoid_fast(x);
  return sig * (1.f + x * (1.f - sig));
}

/// Channel blockIdx.x * blockDim.x + threadIdx.x, time tile blockIdx.y (p.tile steps), batch
/// blockIdx.z. The last width-1 inputs live in registers (kW > 0: the width at compile time;
/// kW == 0: any width up to kMaxConvWidth, in local memory). Tile 0's thread also writes the
/// new state: it alone reads the old one (p.tile >= width-1), and it has read it already.
template <class T, int kW>
MAMBABYTE_KERNEL void __launch_bounds__(kConvThreads) conv1d_forward(ConvForwardParams<T> p) {
  constexpr int kCap = kW > 0 ? kW : kMaxConvWidth;
  int const K = kW > 0 ? kW : p.width;
  int const C = p.channels, L = p.length;
  int const c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  int const b = blockIdx.z;
  int const t0 = blockIdx.y * p.tile, t1 = min(L, t0 + p.tile);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * L;
  float w[kCap], win[kCap];
  for (int k = 0; k < K; ++k) w[k] = p.weight[static_cast<std::int64_t>(c) * K + k];
  float const bias = p.bias ? p.bias[c] : 0.f;
  float* const st = p.state ? p.state + static_cast<std::int64_t>(b) * (K - 1) * C + c : nullptr;
  for (int k = 0; k < K - 1; ++k) {  // win[k]: input at time t0 - (K-1) + k
    int const s = t0 - (K - 1) + k;
    win[k] = s >= 0 ? widen(p.x[(row0 + s) * p.ld_x + c])
                    : (st ? st[static_cast<std::int64_t>(K - 1 + s) * C] : 0.f);
  }
  if (st && blockIdx.y == 0) {
    // New state: the last K-1 inputs of [old state ; x], oldest first. With t0 = 0, win[i]
    // holds old state entry i, so old entry L + j (a negative time L - (K-1) + j) is win[L + j].
    for (int j = 0; j < K - 1; ++j) {
      int const s = L - (K - 1) + j;
      float v = 0.f;
      if (s >= 0) {
        v = widen(p.x[(row0 + s) * p.ld_x + c]);
      } else {
        for (int i = 0; i < K - 1; ++i)
          if (i == L + j) v = win[i];
      }
      st[static_cast<std::int64_t>(j) * C] = v;
    }
  }
#pragma unroll 4
  for (int t = t0; t < t1; ++t) {
    float const xt = widen(p.x[(row0 + t) * p.ld_x + c]);
    float acc = bias;
    for (int k = 0; k < K - 1; ++k) acc += w[k] * win[k];
    acc += w[K - 1] * xt;
    for (int k = 0; k + 2 < K; ++k) win[k] = win[k + 1];
    if (K > 1) win[K > 1 ? K - 2 : 0] = xt;
    p.out[(row0 + t) * p.ld_out + c] = narrow<T>(p.silu ? silu_f(acc) : acc);
  }
}

/// The vectorized forward (conv_vector_path): channels [c, c + kConvVec) per thread (one
/// 16-byte fp32 / 8-byte bf16 access per step and tensor), time tile blockIdx.y (p.tile steps),
/// batch blockIdx.z, width kW in 1..4. The inputs of kConvAhead steps are loaded before any of
/// them is used (a thread has that many loads in flight instead of one: the scalar kernel waits
/// for each load, its stores possibly aliasing the next). Same arithmetic, in the same order, as
/// conv1d_forward: the results are bitwise equal.
template <class T, int kW>
MAMBABYTE_KERNEL void __launch_bounds__(kConvThreads) conv1d_forward_vec(ConvForwardParams<T> p) {
  constexpr int V = kConvVec, H = kW > 1 ? kW - 1 : 1;
  int const C = p.channels, L = p.length;
  int const c = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  int const b = blockIdx.z;
  int const t0 = blockIdx.y * p.tile, t1 = min(L, t0 + p.tile);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * L;
  float w[kW][V], bias[V], win[H][V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int k = 0; k < kW; ++k) w[k][j] = p.weight[static_cast<std::int64_t>(c + j) * kW + k];
    bias[j] = p.bias ? p.bias[c + j] : 0.f;
  }
  float* const st = p.state ? p.state + static_cast<std::int64_t>(b) * (kW - 1) * C + c : nullptr;
#pragma unroll
  for (int k = 0; k < kW - 1; ++k) {  // win[k]: input at time t0 - (kW-1) + k
    int const s = t0 - (kW - 1) + k;
    if (s >= 0) {
      load_vec<V>(p.x + (row0 + s) * p.ld_x + c, win[k]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) win[k][j] = st ? st[static_cast<std::int64_t>(kW - 1 + s) * C + j] : 0.f;
    }
  }
  if (st && blockIdx.y == 0) {  // the new state, as conv1d_forward (t0 = 0: win[i] = old entry i)
#pragma unroll
    for (int jj = 0; jj < kW - 1; ++jj) {
      int const s = L - (kW - 1) + jj;
      float v[V];
      if (s >= 0) {
        load_vec<V>(p.x + (row0 + s) * p.ld_x + c, v);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          v[j] = 0.f;
#pragma unroll
          for (int i = 0; i < kW - 1; ++i)
            if (i == L + jj) v[j] = win[i][j];
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) st[static_cast<std::int64_t>(jj) * C + j] = v[j];
    }
  }
  static_assert(V == 4, "one Raw4 per step");
  for (int t = t0; t < t1; t += kConvAhead) {
    Raw4<T> raw[kConvAhead];
#pragma unroll
    for (int u = 0; u < kConvAhead; ++u)
      if (t + u < t1) raw[u] = load_raw4(p.x + (row0 + t + u) * p.ld_x + c);
#pragma unroll
    for (int u = 0; u < kConvAhead; ++u) {
      if (t + u < t1) {
        float xt[V], o[V];
        widen4(raw[u], xt);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float acc = bias[j];
#pragma unroll
          for (int k = 0; k < kW - 1; ++k) acc += w[k][j] * win[k][j];
          acc += w[kW - 1][j] * xt[j];
          o[j] = p.silu ? silu_f(acc) : acc;
#pragma unroll
          for (int k = 0; k + 2 < kW; ++k) win[k][j] = win[k + 1][j];
          if constexpr (kW > 1) win[kW - 2][j] = xt[j];
        }
        store_vec<V>(p.out + (row0 + t + u) * p.ld_out + c, o);
      }
    }
  }
}

/// Channel blockIdx.x * 32 + threadIdx.x, time tile blockIdx.y * 8 + threadIdx.y (kConvBwdTile
/// steps), batch blockIdx.z, zero initial window. Walks t = t0 .. t1 + K - 2 forward with the
/// last K-1 inputs and the last K-1 pre-activation gradients in registers: recomputes
/// pre[t], dpre[t]; accumulates the taps' gradients over t < t1; writes dx[t - (K-1)] once the
/// K outputs that read it are known. The block's 8 time tiles are summed in shared memory in
/// tile order into partial[batch * gridDim.y + blockIdx.y].
template <class T, int kW>
MAMBABYTE_KERNEL void __launch_bounds__(kConvBwdX * kConvBwdY) conv1d_backward(ConvBackwardParams<T> p) {
  constexpr int kCap = kW > 0 ? kW : kMaxConvWidth;
  __shared__ float red[kConvBwdY][kConvBwdX];
  int const K = kW > 0 ? kW : p.width;
  int const C = p.channels, L = p.length;
  int const tx = threadIdx.x, ty = threadIdx.y;
  int const c = blockIdx.x * kConvBwdX + tx;
  int const b = blockIdx.z;
  int const t0 = (blockIdx.y * kConvBwdY + ty) * kConvBwdTile;
  int const t1 = min(L, t0 + kConvBwdTile);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * L;
  float dw[kCap];
  for (int k = 0; k < K; ++k) dw[k] = 0.f;
  float db = 0.f;
  if (c < C && t0 < L) {
    float w[kCap], win[kCap], dq[kCap];  // win / dq [k]: input / dpre at time t - (K-1) + k
    for (int k = 0; k < K; ++k) w[k] = p.weight[static_cast<std::int64_t>(c) * K + k];
    float const bias = p.bias ? p.bias[c] : 0.f;
    for (int k = 0; k < K - 1; ++k) {
      int const s = t0 - (K - 1) + k;
      win[k] = s >= 0 ? widen(p.x[(row0 + s) * p.ld_x + c]) : 0.f;
      dq[k] = 0.f;
    }
    int const t_end = t1 + K - 1;
    for (int t = t0; t < t_end; ++t) {
      float xt = 0.f, dp = 0.f;
      if (t < L) {
        xt = widen(p.x[(row0 + t) * p.ld_x + c]);
        float pre = bias;
        for (int k = 0; k < K - 1; ++k) pre += w[k] * win[k];
        pre += w[K - 1] * xt;
        float const g = widen(p.dout[(row0 + t) * p.ld_dout + c]);
        dp = p.silu ? g * dsilu_f(pre) : g;
        if (t < t1) {
          for (int k = 0; k < K - 1; ++k) dw[k] += dp * win[k];
          dw[K - 1] += dp * xt;
          db += dp;
        }
      }
      int const s = t - (K - 1);
      if (s >= t0 && p.dx) {  // dx[s] = sum_k w[k] dpre[s + (K-1) - k] = sum_k w[k] dpre[t - k]
        float acc = w[0] * dp;
        for (int k = 1; k < K; ++k) acc += w[k] * dq[K - 1 - k];
        p.dx[(row0 + s) * p.ld_dx + c] = narrow<T>(acc);
      }
      for (int k = 0; k + 2 < K; ++k) {
        win[k] = win[k + 1];
        dq[k] = dq[k + 1];
      }
      if (K > 1) {
        win[K > 1 ? K - 2 : 0] = xt;
        dq[K > 1 ? K - 2 : 0] = dp;
      }
    }
  }
  if (p.partial) {
    std::int64_t const group = static_cast<std::int64_t>(b) * gridDim.y + blockIdx.y;
    std::int64_t const ld = static_cast<std::int64_t>(C) * (K + 1);
    float* const dst = p.partial + group * ld;
    for (int k = 0; k <= K; ++k) {
      red[ty][tx] = k < K ? dw[k] : db;
      __syncthreads();
      if (ty == 0 && c < C) {
        float s = red[0][tx];
#pragma unroll
        for (int y = 1; y < kConvBwdY; ++y) s += red[y][tx];
        if (k < K) dst[static_cast<std::int64_t>(c) * K + k] = s;
        else dst[static_cast<std::int64_t>(C) * K + c] = s;
      }
      __syncthreads();
    }
  }
}

// ---- cross-entropy ---------------------------------------------------------------------------

/// One warp per row, kPerLane logits per lane (lane + 32 i). All loads of the row precede the
/// warp-wide max, and all stores follow it, so dlogits may alias logits.
template <class TD, int kPerLane>
MAMBABYTE_KERNEL void __launch_bounds__(kCeThreads) cross_entropy(CrossEntropyParams<TD> p) {
  int const lane = threadIdx.x & 31;
  std::int64_t const r = static_cast<std::int64_t>(blockIdx.x) * (kCeThreads / 32) + (threadIdx.x >> 5);
  if (r >= p.rows) return;  // the whole warp leaves together
  int const tgt = p.targets[r];
  float const* x = p.logits + r * p.ld_logits;
  float v[kPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const idx = lane + 32 * i;
    v[i] = idx < p.classes ? x[idx] : -INFINITY;
    mx = fmaxf(mx, v[i]);
  }
  mx = warp_max(mx);
  float se = 0.f, xt = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const idx = lane + 32 * i;
    if (idx < p.classes) se += expf(v[i] - mx);
    if (idx == tgt) xt = v[i];
  }
  se = warp_sum(se);
  xt = __shfl_sync(0xffffffffu, xt, tgt & 31);
  float const lse = mx + logf(se);
  bool const counted = tgt >= 0;
  if (lane == 0)
    p.row_loss[r] = !counted ? 0.f : (tgt < p.classes ? lse - xt : __int_as_float(0x7fc00000));
  if (p.dlogits) {
    TD* d = p.dlogits + r * p.ld_dlogits;
    float const gs = p.grad_scale;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      int const idx = lane + 32 * i;
      if (idx < p.classes) {
        float val = 0.f;
        if (counted) {
          val = expf(v[i] - lse) * gs;
          if (idx == tgt) val -= gs;
        }
        d[idx] = narrow<TD>(val);
      }
    }
    for (std::int64_t idx = p.classes + lane; idx < p.zero_to; idx += 32) d[idx] = narrow<TD>(0.f);
  }
}

/// counts[0] = rows with target >= 0, counts[1] = rows with target >= classes (one block).
MAMBABYTE_KERNEL void __launch_bounds__(1024)
    count_targets(int rows, int classes, std::int32_t const* MAMBABYTE_RESTRICT targets, int* counts) {
  __shared__ int red[32];
  int n = 0, bad = 0;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    int const t = targets[r];
    n += t >= 0;
    bad += t >= classes;
  }
  n = block_sum(n, red);
  bad = block_sum(bad, red);
  if (threadIdx.x == 0) {
    counts[0] = n;
    counts[1] = bad;
  }
}

// ---- reductions ------------------------------------------------------------------------------

/// Block b sums elements [b * 8192, (b+1) * 8192) in double (thread t: groups of 4 at
/// (it * 256 + t) * 4, it = 0..7, whether loaded as one float4 or four floats), then the block
/// total goes to dst[b].
template <bool kSquare>
MAMBABYTE_KERNEL void __launch_bounds__(kSumThreads)
    sum_partials(float const* MAMBABYTE_RESTRICT x, std::size_t n, bool vec, double* MAMBABYTE_RESTRICT dst) {
  __shared__ double red[32];
  std::size_t const base = static_cast<std::size_t>(blockIdx.x) * kSumChunk;
  double acc = 0.0;
#pragma unroll
  for (int it = 0; it < kSumIters; ++it) {
    std::size_t const i = base + (static_cast<std::size_t>(it) * kSumThreads + threadIdx.x) * 4;
    float v[4];
    if (vec && i + 4 <= n) {
      load_vec<4>(x + i, v);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = i + j < n ? x[i + j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      double const d = v[j];
      acc += kSquare ? d * d : d;
    }
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) dst[blockIdx.x] = acc;
}

/// *out = sum of the n partials: thread t adds partials t, t + 1024, ... in turn, then the block sum.
MAMBABYTE_KERNEL void __launch_bounds__(kSumFinalThreads)
    sum_final(double const* MAMBABYTE_RESTRICT partial, std::size_t n, double* MAMBABYTE_RESTRICT out) {
  __shared__ double red[32];
  double acc = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += kSumFinalThreads) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

MAMBABYTE_KERNEL void clip_scale(double const* sumsq, float max_norm, float* scale) {
  double const norm = sqrt(*sumsq);
  double const mx = max_norm;
  *scale = (mx > 0 && norm > mx) ? static_cast<float>(mx / (norm + 1e-6)) : 1.f;
}

// ---- AdamW -----------------------------------------------------------------------------------

__device__ __forceinline__ void adamw_update(AdamWParams const& a, float wd, float g, float& p, float& m, float& v) {
  m = a.beta1 * m + (1.f - a.beta1) * g;
  v = a.beta2 * v + (1.f - a.beta2) * g * g;
  float const upd = (m / a.c1) / (sqrtf(v / a.c2) + a.eps) + wd * p;
  p = p - a.lr * upd;
}

/// Piece blockIdx.x of the plan: 4-wide when the piece and every pointer allow it.
MAMBABYTE_KERNEL void __launch_bounds__(kAdamThreads) adamw(AdamWParams a) {
  AdamWPiece const pc = a.pieces[blockIdx.x];
  float const wd = pc.decay ? a.weight_decay : 0.f;
  float const scale = a.grad_scale ? *a.grad_scale : 1.f;
  int const n = static_cast<int>(pc.count);
  std::size_t const base = pc.offset;
  if (a.vec && base % 4 == 0 && n % 4 == 0) {
    for (int i = threadIdx.x * 4; i < n; i += kAdamThreads * 4) {
      std::size_t const at = base + i;
      float p[4], g[4], m[4], v[4];
      load_vec<4>(a.param + at, p);
      load_vec<4>(a.grad + at, g);
      load_vec<4>(a.m + at, m);
      load_vec<4>(a.v + at, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) adamw_update(a, wd, g[j] * scale, p[j], m[j], v[j]);
      store_vec<4>(a.param + at, p);
      store_vec<4>(a.m + at, m);
      store_vec<4>(a.v + at, v);
      if (a.param_bf16) store_vec<4>(a.param_bf16 + at, p);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += kAdamThreads) {
      std::size_t const at = base + i;
      float p = a.param[at], m = a.m[at], v = a.v[at];
      adamw_update(a, wd, a.grad[at] * scale, p, m, v);
      a.param[at] = p;
      a.m[at] = m;
      a.v[at] = v;
      if (a.param_bf16) a.param_bf16[at] = __float2bfloat16_rn(p);
    }
  }
}

// ---- conversion ------------------------------------------------------------------------------

template <class TO, class TI>
MAMBABYTE_KERNEL void convert(TI const* MAMBABYTE_RESTRICT in, TO* MAMBABYTE_RESTRICT out, std::size_t n) {
  std::size_t const stride = static_cast<std::size_t>(blockDim.x) * gridDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = narrow<TO>(widen(in[i]));
}

template <class TO, class TI>
MAMBABYTE_KERNEL void convert_2d(int rows, int cols, TI const* MAMBABYTE_RESTRICT in, std::int64_t ld_in,
                                 TO* MAMBABYTE_RESTRICT out, std::int64_t ld_out) {
  int const c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y)
    out[static_cast<std::int64_t>(r) * ld_out + c] = narrow<TO>(widen(in[static_cast<std::int64_t>(r) * ld_in + c]));
}

/// The vectorized backward (conv_vector_path): channels [c, c + kConvVec) per thread, the
/// block and time tiles of conv1d_backward (so the same partials, bitwise: same arithmetic in the
/// same order), width kW in 1..4; x and dout of kConvAhead steps loaded before any is used.
template <class T, int kW>
MAMBABYTE_KERNEL void __launch_bounds__(kConvBwdX * kConvBwdY, 2) conv1d_backward_vec(ConvBackwardParams<T> p) {
  constexpr int V = kConvVec, H = kW > 1 ? kW - 1 : 1;
  static_assert(V == 4, "the block's partial sums are staged as float4");
  __shared__ float4 red[kConvBwdY][kConvBwdX];
  int const C = p.channels, L = p.length;
  int const tx = threadIdx.x, ty = threadIdx.y;
  int const c = (blockIdx.x * kConvBwdX + tx) * V;
  int const b = blockIdx.z;
  int const t0 = (blockIdx.y * kConvBwdY + ty) * kConvBwdTile;
  int const t1 = min(L, t0 + kConvBwdTile);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * L;
  float dw[kW][V], db[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    db[j] = 0.f;
#pragma unroll
    for (int k = 0; k < kW; ++k) dw[k][j] = 0.f;
  }
  if (c < C && t0 < L) {
    float w[kW][V], bias[V], win[H][V], dq[H][V];  // win / dq [k]: input / dpre at time t - (kW-1) + k
#pragma unroll
    for (int j = 0; j < V; ++j) {
#pragma unroll
      for (int k = 0; k < kW; ++k) w[k][j] = p.weight[static_cast<std::int64_t>(c + j) * kW + k];
      bias[j] = p.bias ? p.bias[c + j] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kW - 1; ++k) {
      int const s = t0 - (kW - 1) + k;
      if (s >= 0) {
        load_vec<V>(p.x + (row0 + s) * p.ld_x + c, win[k]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) win[k][j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) dq[k][j] = 0.f;
    }
    int const t_end = t1 + kW - 1, t_load = min(t_end, L);
    for (int t = t0; t < t_end; t += kConvBwdAhead) {
      Raw4<T> xr[kConvBwdAhead], gr[kConvBwdAhead];
#pragma unroll
      for (int u = 0; u < kConvBwdAhead; ++u) {
        if (t + u < t_load) {
          xr[u] = load_raw4(p.x + (row0 + t + u) * p.ld_x + c);
          gr[u] = load_raw4(p.dout + (row0 + t + u) * p.ld_dout + c);
        }
      }
#pragma unroll
      for (int u = 0; u < kConvBwdAhead; ++u) {
        int const tt = t + u;
        if (tt >= t_end) break;
        float xt[V], dp[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          xt[j] = 0.f;
          dp[j] = 0.f;
        }
        if (tt < L) {
          float gv[V];
          widen4(xr[u], xt);
          widen4(gr[u], gv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            float pre = bias[j];
#pragma unroll
            for (int k = 0; k < kW - 1; ++k) pre += w[k][j] * win[k][j];
            pre += w[kW - 1][j] * xt[j];
            float const g = gv[j];
            dp[j] = p.silu ? g * dsilu_f(pre) : g;
          }
          if (tt < t1) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
#pragma unroll
              for (int k = 0; k < kW - 1; ++k) dw[k][j] += dp[j] * win[k][j];
              dw[kW - 1][j] += dp[j] * xt[j];
              db[j] += dp[j];
            }
          }
        }
        int const s = tt - (kW - 1);
        if (s >= t0 && p.dx) {  // dx[s] = sum_k w[k] dpre[tt - k]
          float acc[V];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc[j] = w[0][j] * dp[j];
#pragma unroll
            for (int k = 1; k < kW; ++k) acc[j] += w[k][j] * dq[kW - 1 - k][j];
          }
          store_vec<V>(p.dx + (row0 + s) * p.ld_dx + c, acc);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
#pragma unroll
          for (int k = 0; k + 2 < kW; ++k) {
            win[k][j] = win[k + 1][j];
            dq[k][j] = dq[k + 1][j];
          }
          if constexpr (kW > 1) {
            win[kW - 2][j] = xt[j];
            dq[kW - 2][j] = dp[j];
          }
        }
      }
    }
  }
  if (p.partial) {
    std::int64_t const group = static_cast<std::int64_t>(b) * gridDim.y + blockIdx.y;
    std::int64_t const ld = static_cast<std::int64_t>(C) * (kW + 1);
    float* const dst = p.partial + group * ld;
#pragma unroll
    for (int k = 0; k <= kW; ++k) {
      float const* v = k < kW ? dw[k < kW ? k : 0] : db;
      red[ty][tx] = make_float4(v[0], v[1], v[2], v[3]);
      __syncthreads();
      if (ty == 0 && c < C) {
        float4 s = red[0][tx];
#pragma unroll
        for (int y = 1; y < kConvBwdY; ++y) {
          float4 const r = red[y][tx];
          s.x += r.x; s.y += r.y; s.z += r.z; s.w += r.w;
        }
        float const sv[V] = {s.x, s.y, s.z, s.w};
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (k < kW) dst[static_cast<std::int64_t>(c + j) * kW + k] = sv[j];
          else dst[static_cast<std::int64_t>(C) * kW + c + j] = sv[j];
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace kernel

/// dst[c] += sum over `groups` rows of ws (leading dimension ld) for c < n, in an order fixed by
/// `groups` alone.
inline void launch_column_reduce(Cuda const& be, float const* ws, std::int64_t ld, int groups, std::int64_t n,
                                 float* out) {
  if (n <= 0 || groups <= 0 || out == nullptr) return;
  auto const grid = static_cast<unsigned>((n + kColReduceX - 1) / kColReduceX);
  if (groups >= kColReduceWideFrom)
    kernel::column_reduce<kColReduceWideY><<<grid, dim3(kColReduceX, kColReduceWideY), 0, be.stream>>>(ws, ld, groups, n, out);
  else
    kernel::column_reduce<kColReduceY><<<grid, dim3(kColReduceX, kColReduceY), 0, be.stream>>>(ws, ld, groups, n, out);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// Row groups of the norm backward: a function of the row count only (never of the device).
inline int norm_groups(int rows) { return std::min(rows, kNormGroups); }

inline int conv_bwd_time_blocks(int length) {
  int const span = kConvBwdY * kConvBwdTile;
  return (length + span - 1) / span;
}

/// The vectorized conv kernels apply: width 1..kConvVecMaxWidth, channels and every leading
/// dimension multiples of kConvVec, every tensor aligned to kConvVec elements (a null tensor
/// never stops the vector path). Otherwise the scalar kernels run (same results, bitwise).
template <class T>
bool conv_vector_path(int channels, int width, std::initializer_list<std::pair<void const*, std::int64_t>> tensors) {
  if (width < 1 || width > kConvVecMaxWidth || channels % kConvVec != 0) return false;
  for (auto const& [ptr, ld] : tensors)
    if (ld % kConvVec != 0 || !is_aligned(ptr, kConvVec * sizeof(T))) return false;
  return true;
}

template <class T>
bool conv_vector_path(ConvForwardParams<T> const& p) {
  return conv_vector_path<T>(p.channels, p.width, {{p.x, p.ld_x}, {p.out, p.ld_out}});
}

template <class T>
bool conv_vector_path(ConvBackwardParams<T> const& p) {
  return conv_vector_path<T>(p.channels, p.width, {{p.x, p.ld_x}, {p.dout, p.ld_dout}, {p.dx, p.dx ? p.ld_dx : 0}});
}

template <class T>
void conv_forward_launch(Cuda const& be, ConvForwardParams<T> const& p) {
  if (conv_vector_path(p)) {
    int const per_block = kConvThreads * kConvVec;
    dim3 const grid((p.channels + per_block - 1) / per_block, (p.length + p.tile - 1) / p.tile, p.batch);
    switch (p.width) {
      case 1: kernel::conv1d_forward_vec<T, 1><<<grid, kConvThreads, 0, be.stream>>>(p); break;
      case 2: kernel::conv1d_forward_vec<T, 2><<<grid, kConvThreads, 0, be.stream>>>(p); break;
      case 3: kernel::conv1d_forward_vec<T, 3><<<grid, kConvThreads, 0, be.stream>>>(p); break;
      default: kernel::conv1d_forward_vec<T, 4><<<grid, kConvThreads, 0, be.stream>>>(p); break;
    }
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  dim3 const block(kConvThreads);
  dim3 const grid((p.channels + kConvThreads - 1) / kConvThreads, (p.length + p.tile - 1) / p.tile, p.batch);
  switch (p.width) {
    case 1: kernel::conv1d_forward<T, 1><<<grid, block, 0, be.stream>>>(p); break;
    case 2: kernel::conv1d_forward<T, 2><<<grid, block, 0, be.stream>>>(p); break;
    case 3: kernel::conv1d_forward<T, 3><<<grid, block, 0, be.stream>>>(p); break;
    case 4: kernel::conv1d_forward<T, 4><<<grid, block, 0, be.stream>>>(p); break;
    default: kernel::conv1d_forward<T, 0><<<grid, block, 0, be.stream>>>(p); break;
  }
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void conv_backward_launch(Cuda const& be, ConvBackwardParams<T> const& p) {
  dim3 const block(kConvBwdX, kConvBwdY);
  if (conv_vector_path(p)) {
    int const per_block = kConvBwdX * kConvVec;
    dim3 const grid((p.channels + per_block - 1) / per_block, conv_bwd_time_blocks(p.length), p.batch);
    switch (p.width) {
      case 1: kernel::conv1d_backward_vec<T, 1><<<grid, block, 0, be.stream>>>(p); break;
      case 2: kernel::conv1d_backward_vec<T, 2><<<grid, block, 0, be.stream>>>(p); break;
      case 3: kernel::conv1d_backward_vec<T, 3><<<grid, block, 0, be.stream>>>(p); break;
      default: kernel::conv1d_backward_vec<T, 4><<<grid, block, 0, be.stream>>>(p); break;
    }
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  dim3 const grid((p.channels + kConvBwdX - 1) / kConvBwdX, conv_bwd_time_blocks(p.length), p.batch);
  switch (p.width) {
    case 1: kernel::conv1d_backward<T, 1><<<grid, block, 0, be.stream>>>(p); break;
    case 2: kernel::conv1d_backward<T, 2><<<grid, block, 0, be.stream>>>(p); break;
    case 3: kernel::conv1d_backward<T, 3><<<grid, block, 0, be.stream>>>(p); break;
    case 4: kernel::conv1d_backward<T, 4><<<grid, block, 0, be.stream>>>(p); break;
    default: kernel::conv1d_backward<T, 0><<<grid, block, 0, be.stream>>>(p); break;
  }
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

template <class TD>
void cross_entropy_launch(Cuda const& be, CrossEntropyParams<TD> const& p) {
  auto const grid = static_cast<unsigned>((static_cast<std::int64_t>(p.rows) + kCeThreads / 32 - 1) / (kCeThreads / 32));
  if (p.classes <= 256) kernel::cross_entropy<TD, 8><<<grid, kCeThreads, 0, be.stream>>>(p);
  else if (p.classes <= 512) kernel::cross_entropy<TD, 16><<<grid, kCeThreads, 0, be.stream>>>(p);
  else kernel::cross_entropy<TD, 32><<<grid, kCeThreads, 0, be.stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

template <bool kSquare>
void sum_launch(Cuda const& be, float const* x, std::size_t n, double* out, void* workspace, char const* what) {
  require(out != nullptr, what, ": null output pointer");
  ScopedDevice guard(be.device);
  if (n == 0) {
    MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), be.stream));  // +0.0
    return;
  }
  require(x != nullptr, what, ": null input for ", n, " elements");
  std::size_t const blocks = (n + kSumChunk - 1) / kSumChunk;
  require(blocks <= static_cast<std::size_t>(std::numeric_limits<int>::max()), what, ": ", n, " elements are too many");
  bool const vec = is_aligned(x, 16);
  if (blocks == 1) {
    kernel::sum_partials<kSquare><<<1, kSumThreads, 0, be.stream>>>(x, n, vec, out);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  require(workspace != nullptr, what, ": null workspace (reduce_workspace_bytes(", n, ") bytes needed)");
  require(is_aligned(workspace, alignof(double)), what, ": workspace must be 8-byte aligned");
  auto* partial = static_cast<double*>(workspace);
  kernel::sum_partials<kSquare><<<static_cast<unsigned>(blocks), kSumThreads, 0, be.stream>>>(x, n, vec, partial);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  kernel::sum_final<<<1, kSumFinalThreads, 0, be.stream>>>(partial, blocks, out);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace layers_detail

// =============================================================================================
// Embedding
// =============================================================================================

/// out[r, :] = table[tokens[r], :] for r < rows. table (vocab, dim) and out (rows, dim) are
/// float, rows contiguous; tokens are device int32 and must be valid rows of the table (they
/// are not checked: the host cannot read them). 4-wide when dim % 4 == 0 and both pointers
/// are 16-byte aligned.
inline void embedding_forward(Cuda const& be, int rows, int dim, std::int32_t const* tokens, float const* table,
                              float* out) {
  require(rows >= 0 && dim > 0, "embedding_forward: rows must be >= 0 and dim > 0 (got rows=", rows, ", dim=", dim, ")");
  if (rows == 0) return;
  require(tokens && table && out, "embedding_forward: null tokens, table or out pointer");
  using namespace layers_detail;
  ScopedDevice guard(be.device);
  bool const vec = dim % 4 == 0 && is_aligned(table, 16) && is_aligned(out, 16);
  int const groups = vec ? dim / 4 : dim;
  int const threads = std::clamp((groups + 31) / 32 * 32, 32, 256);
  if (vec) layers_detail::kernel::embedding_forward<4><<<static_cast<unsigned>(rows), threads, 0, be.stream>>>(dim, tokens, table, out);
  else layers_detail::kernel::embedding_forward<1><<<static_cast<unsigned>(rows), threads, 0, be.stream>>>(dim, tokens, table, out);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// Workspace of embedding_backward: with chunks = ceil(rows/512) and pieces = ceil(rows/256),
/// int32 (chunks x vocab) + (vocab) + 2 (rows), and float 2 (pieces x dim), each section
/// rounded up to 256 bytes. 0 when rows == 0.
inline std::size_t embedding_backward_workspace_bytes(int rows, int dim, int vocab) {
  return layers_detail::EmbeddingBackwardLayout(rows, dim, vocab).total;
}

/// dtable[tokens[r], :] += dout[r, :] for r < rows (dout (rows, dim), dtable (vocab, dim), float),
/// deterministically: the rows are sorted by token with a stable counting sort (positions do not
/// depend on scheduling), each token's rows are summed in row order in pieces of 256 sorted rows,
/// and a token's piece sums are added in piece order; dtable[v] receives one += per token.
/// Tokens outside [0, vocab) are skipped. Workspace: embedding_backward_workspace_bytes().
inline void embedding_backward(Cuda const& be, int rows, int dim, int vocab, std::int32_t const* tokens,
                               float const* dout, float* dtable, void* workspace) {
  require(rows >= 0 && dim > 0 && vocab > 0, "embedding_backward: need rows >= 0, dim > 0, vocab > 0 (got rows=",
          rows, ", dim=", dim, ", vocab=", vocab, ")");
  if (rows == 0) return;
  require(tokens && dout && dtable, "embedding_backward: null tokens, dout or dtable pointer");
  require(workspace != nullptr, "embedding_backward: null workspace (embedding_backward_workspace_bytes() bytes needed)");
  require(layers_detail::is_aligned(workspace, 16), "embedding_backward: workspace must be 16-byte aligned");
  using namespace layers_detail;
  EmbeddingBackwardLayout const lay(rows, dim, vocab);
  auto* ws = static_cast<unsigned char*>(workspace);
  EmbeddingBackwardParams p;
  p.rows = rows; p.dim = dim; p.vocab = vocab; p.pieces = lay.pieces;
  p.tokens = tokens; p.dout = dout; p.dtable = dtable;
  p.hist = reinterpret_cast<int*>(ws + lay.hist);
  p.start = reinterpret_cast<int*>(ws + lay.start);
  p.perm = reinterpret_cast<int*>(ws + lay.perm);
  p.stok = reinterpret_cast<int*>(ws + lay.stok);
  p.first = reinterpret_cast<float*>(ws + lay.partial);
  p.last = p.first + static_cast<std::size_t>(lay.pieces) * dim;

  ScopedDevice guard(be.device);
  MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(p.hist, 0, static_cast<std::size_t>(lay.chunks) * vocab * sizeof(int), be.stream));
  MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(p.stok, 0xff, static_cast<std::size_t>(rows) * sizeof(int), be.stream));  // -1
  layers_detail::kernel::embedding_histogram<<<lay.chunks, kEmbChunk, 0, be.stream>>>(rows, vocab, tokens, p.hist);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  layers_detail::kernel::embedding_offsets<<<1, 1024, 0, be.stream>>>(lay.chunks, vocab, p.hist, p.start);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  layers_detail::kernel::embedding_scatter<<<lay.chunks, kEmbChunk, 0, be.stream>>>(rows, vocab, tokens, p.hist, p.start, p.perm,
                                                                     p.stok);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  bool const vec = dim % 4 == 0 && is_aligned(dout, 16) && is_aligned(dtable, 16);
  int const per_block = kEmbThreads * (vec ? 4 : 1);
  dim3 const grid(static_cast<unsigned>(lay.pieces), static_cast<unsigned>((dim + per_block - 1) / per_block));
  require(grid.y <= 65535, "embedding_backward: dim ", dim, " is too large");
  if (vec) {
    layers_detail::kernel::embedding_pieces<4><<<grid, kEmbThreads, 0, be.stream>>>(p);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    if (lay.pieces > 1) layers_detail::kernel::embedding_fixup<4><<<grid, kEmbThreads, 0, be.stream>>>(p);
  } else {
    layers_detail::kernel::embedding_pieces<1><<<grid, kEmbThreads, 0, be.stream>>>(p);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    if (lay.pieces > 1) layers_detail::kernel::embedding_fixup<1><<<grid, kEmbThreads, 0, be.stream>>>(p);
  }
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

// =============================================================================================
// Residual add + LayerNorm / RMSNorm
// =============================================================================================

/// Per row r < rows (all tensors (rows, dim), rows contiguous):
///   residual_out = (residual_in or 0 when null) + (hidden or 0 when null)      [float]
///   LayerNorm (rms = false): out = (x - mean) / sqrt(var + eps) * weight (+ bias), var biased
///   RMSNorm   (rms = true):  out = x / sqrt(mean(x^2) + eps) * weight  (bias must be null)
/// with x = residual_out; out is TO (float or bf16), weight/bias float (dim). residual_out may
/// alias residual_in. One block per row, 8 elements per thread kept in registers, 4-wide when
/// dim % 4 == 0 and every pointer is aligned; dim <= 8192.
template <class TH, class TO>
void add_norm_forward(Cuda const& be, int rows, int dim, float const* residual_in, TH const* hidden,
                      float* residual_out, float const* weight, float const* bias, TO* out, float eps, bool rms) {
  static_assert(layers_detail::is_storage_v<TH> && layers_detail::is_storage_v<TO>,
                "add_norm_forward: TH and TO are float or __nv_bfloat16");
  using namespace layers_detail;
  require(rows >= 0 && dim > 0, "add_norm_forward: rows must be >= 0 and dim > 0 (got rows=", rows, ", dim=", dim, ")");
  require(dim <= kMaxRowDim, "add_norm_forward: dim ", dim, " exceeds the supported ", kMaxRowDim);
  require(eps > 0, "add_norm_forward: eps must be positive (got ", eps, ")");
  if (rows == 0) return;
  require(!(rms && bias), "add_norm_forward: RMSNorm takes no bias");
  require(residual_out && weight && out, "add_norm_forward: null residual_out, weight or out pointer");
  AddNormForwardParams<TH, TO> p;
  p.rows = rows; p.dim = dim; p.residual_in = residual_in; p.hidden = hidden; p.residual_out = residual_out;
  p.weight = weight; p.bias = bias; p.out = out; p.eps = eps; p.rms = rms;
  bool const vec = dim % 4 == 0 && is_aligned(residual_in, 16) && is_aligned(hidden, 4 * sizeof(TH)) &&
                   is_aligned(residual_out, 16) && is_aligned(weight, 16) && is_aligned(bias, 16) &&
                   is_aligned(out, 4 * sizeof(TO));
  int const threads = row_threads(dim);
  ScopedDevice guard(be.device);
  if (vec) layers_detail::kernel::add_norm_forward<TH, TO, 4><<<static_cast<unsigned>(rows), threads, 0, be.stream>>>(p);
  else layers_detail::kernel::add_norm_forward<TH, TO, 1><<<static_cast<unsigned>(rows), threads, 0, be.stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// Workspace of add_norm_backward: min(rows, kNormGroups = 2048) x 2 x dim floats (0 when rows == 0).
inline std::size_t add_norm_backward_workspace_bytes(int rows, int dim) {
  if (rows <= 0 || dim <= 0) return 0;
  return static_cast<std::size_t>(layers_detail::norm_groups(rows)) * 2 * dim * sizeof(float);
}

/// Backward of add_norm_forward given the norm input r = `residual` (rows, dim) float:
///   LayerNorm: xh = (r - mean) rstd;  dresidual += rstd (g - mean(g) - xh mean(g xh)),  g = dout * weight
///   RMSNorm:   xh = r rstd;           dresidual += rstd (g - xh mean(g xh))
///   dweight += sum_rows dout * xh;  dbias += sum_rows dout  (dbias LayerNorm only; either may be null)
/// dresidual (float) is in/out; dresidual_copy (TC, may be null) receives the final dresidual.
/// dout is TD. Row groups: block g of min(rows, kNormGroups) takes rows g, g + groups, ... and keeps
/// its column sums in registers; the partial rows are added in group order (column_reduce).
/// Workspace: add_norm_backward_workspace_bytes(rows, dim) (needed when dweight or dbias).
template <class TD, class TC>
void add_norm_backward(Cuda const& be, int rows, int dim, float const* residual, float const* weight, TD const* dout,
                       float* dresidual, TC* dresidual_copy, float* dweight, float* dbias, float eps, bool rms,
                       void* workspace) {
  static_assert(layers_detail::is_storage_v<TD> && layers_detail::is_storage_v<TC>,
                "add_norm_backward: TD and TC are float or __nv_bfloat16");
  using namespace layers_detail;
  require(rows >= 0 && dim > 0, "add_norm_backward: rows must be >= 0 and dim > 0 (got rows=", rows, ", dim=", dim, ")");
  require(dim <= kMaxRowDim, "add_norm_backward: dim ", dim, " exceeds the supported ", kMaxRowDim);
  require(eps > 0, "add_norm_backward: eps must be positive (got ", eps, ")");
  require(!(rms && dbias), "add_norm_backward: RMSNorm has no bias gradient");
  if (rows == 0) return;
  require(residual && weight && dout && dresidual, "add_norm_backward: null residual, weight, dout or dresidual pointer");
  bool const want_p = dweight || dbias;
  require(!want_p || workspace, "add_norm_backward: null workspace (add_norm_backward_workspace_bytes() bytes needed)");
  require(!want_p || is_aligned(workspace, 16), "add_norm_backward: workspace must be 16-byte aligned");
  int const groups = norm_groups(rows);
  AddNormBackwardParams<TD, TC> p;
  p.rows = rows; p.dim = dim; p.residual = residual; p.weight = weight; p.dout = dout; p.dresidual = dresidual;
  p.dresidual_copy = dresidual_copy; p.partial = want_p ? static_cast<float*>(workspace) : nullptr;
  p.eps = eps; p.rms = rms;
  bool const vec = dim % 4 == 0 && is_aligned(residual, 16) && is_aligned(weight, 16) &&
                   is_aligned(dout, 4 * sizeof(TD)) && is_aligned(dresidual, 16) &&
                   is_aligned(dresidual_copy, 4 * sizeof(TC));
  int const threads = row_threads(dim);
  ScopedDevice guard(be.device);
  if (vec) layers_detail::kernel::add_norm_backward<TD, TC, 4><<<static_cast<unsigned>(groups), threads, 0, be.stream>>>(p);
  else layers_detail::kernel::add_norm_backward<TD, TC, 1><<<static_cast<unsigned>(groups), threads, 0, be.stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  if (dweight) launch_column_reduce(be, p.partial, 2 * static_cast<std::int64_t>(dim), groups, dim, dweight);
  if (dbias) launch_column_reduce(be, p.partial + dim, 2 * static_cast<std::int64_t>(dim), groups, dim, dbias);
}

// =============================================================================================
// Causal depthwise conv1d (+ SiLU)
// =============================================================================================

/// out[b,t,c] = act(bias[c] + sum_{k<width} weight[c*width+k] * in[b, t-(width-1)+k, c]),
/// act = SiLU when silu (else identity); x and out are T rows (b*length + t) with leading
/// dimensions ld_x, ld_out (elements); weight (channels, width) and bias (channels, may be
/// null) float. Inputs before t = 0 come from `state` (float, (batch, width-1, channels), oldest
/// first) or are zero when state is null; with a state, it is updated to the last width-1
/// inputs of [state ; x] (so a length < width-1 shifts the window). width <= 64.
/// One thread per (channel, 32-step time tile, batch); the window lives in registers for
/// width <= 4.
template <class T>
void conv1d_forward(Cuda const& be, int batch, int length, int channels, int width, T const* x, std::int64_t ld_x,
                    float const* weight, float const* bias, T* out, std::int64_t ld_out, float* state, bool silu) {
  static_assert(layers_detail::is_storage_v<T>, "conv1d_forward: T is float or __nv_bfloat16");
  using namespace layers_detail;
  require(batch >= 0 && length >= 0 && channels > 0 && width > 0,
          "conv1d_forward: need batch >= 0, length >= 0, channels > 0, width > 0 (got batch=", batch, ", length=",
          length, ", channels=", channels, ", width=", width, ")");
  require(width <= kMaxConvWidth, "conv1d_forward: width ", width, " exceeds the supported ", kMaxConvWidth);
  if (batch == 0 || length == 0) return;
  require(x && weight && out, "conv1d_forward: null x, weight or out pointer");
  require(ld_x >= channels && ld_out >= channels, "conv1d_forward: leading dimensions (", ld_x, ", ", ld_out,
          ") must be >= channels (", channels, ")");
  ConvForwardParams<T> p;
  p.batch = batch; p.length = length; p.channels = channels; p.width = width;
  p.tile = std::max(kConvTile, width - 1);
  p.x = x; p.ld_x = ld_x; p.weight = weight; p.bias = bias; p.out = out; p.ld_out = ld_out;
  p.state = state; p.silu = silu;
  require((length + p.tile - 1) / p.tile <= 65535 && batch <= 65535, "conv1d_forward: batch ", batch,
          " or length ", length, " is too large for one launch");
  ScopedDevice guard(be.device);
  conv_forward_launch(be, p);
}

/// Workspace of conv1d_backward: batch x ceil(length / 512) x channels x (width + 1) floats.
inline std::size_t conv1d_backward_workspace_bytes(int batch, int length, int channels, int width) {
  if (batch <= 0 || length <= 0 || channels <= 0 || width <= 0) return 0;
  return static_cast<std::size_t>(batch) * layers_detail::conv_bwd_time_blocks(length) * channels * (width + 1) *
         sizeof(float);
}

/// Backward of conv1d_forward with a zero initial window (training). With
/// pre[t] = bias + sum_k w[c,k] in[t-(width-1)+k] recomputed from x and
/// dpre = dout * silu'(pre) (dout when !silu):
///   dx[t]        = sum_k w[c,k] dpre[t + (width-1) - k]          (WRITTEN as T; dx may be null)
///   dweight[c,k] += sum_{b,t} dpre[t] in[t - (width-1) + k]       (float, may be null)
///   dbias[c]     += sum_{b,t} dpre[t]                             (float, may be null)
/// Deterministic: each block sums its 8 time tiles in order into one partial per
/// (batch, 512-step block); the partials are added in that order (column_reduce).
/// Workspace: conv1d_backward_workspace_bytes() (needed when dweight or dbias).
template <class T>
void conv1d_backward(Cuda const& be, int batch, int length, int channels, int width, T const* x, std::int64_t ld_x,
                     float const* weight, float const* bias, bool silu, T const* dout, std::int64_t ld_dout,
                     T* dx, std::int64_t ld_dx, float* dweight, float* dbias, void* workspace) {
  static_assert(layers_detail::is_storage_v<T>, "conv1d_backward: T is float or __nv_bfloat16");
  using namespace layers_detail;
  require(batch >= 0 && length >= 0 && channels > 0 && width > 0,
          "conv1d_backward: need batch >= 0, length >= 0, channels > 0, width > 0 (got batch=", batch, ", length=",
          length, ", channels=", channels, ", width=", width, ")");
  require(width <= kMaxConvWidth, "conv1d_backward: width ", width, " exceeds the supported ", kMaxConvWidth);
  if (batch == 0 || length == 0) return;
  require(x && weight && dout, "conv1d_backward: null x, weight or dout pointer");
  require(ld_x >= channels && ld_dout >= channels && (!dx || ld_dx >= channels),
          "conv1d_backward: leading dimensions must be >= channels (", channels, ")");
  require(batch <= 65535, "conv1d_backward: batch ", batch, " is too large for one launch");
  bool const want_p = dweight || dbias;
  require(!want_p || workspace, "conv1d_backward: null workspace (conv1d_backward_workspace_bytes() bytes needed)");
  require(!want_p || is_aligned(workspace, 4), "conv1d_backward: workspace must be 4-byte aligned");
  ConvBackwardParams<T> p;
  p.batch = batch; p.length = length; p.channels = channels; p.width = width;
  p.x = x; p.ld_x = ld_x; p.weight = weight; p.bias = bias; p.silu = silu;
  p.dout = dout; p.ld_dout = ld_dout; p.dx = dx; p.ld_dx = ld_dx;
  p.partial = want_p ? static_cast<float*>(workspace) : nullptr;
  ScopedDevice guard(be.device);
  conv_backward_launch(be, p);
  int const groups = batch * conv_bwd_time_blocks(length);
  std::int64_t const ld = static_cast<std::int64_t>(channels) * (width + 1);
  if (dweight) launch_column_reduce(be, p.partial, ld, groups, static_cast<std::int64_t>(channels) * width, dweight);
  if (dbias) launch_column_reduce(be, p.partial + static_cast<std::int64_t>(channels) * width, ld, groups, channels, dbias);
}

// =============================================================================================
// Cross-entropy
// =============================================================================================

/// For each row r < rows, over its first `classes` logits (float, leading dimension ld_logits):
///   row_loss[r] = logsumexp(logits[r, :classes]) - logits[r, target_r]     (float, written)
///   dlogits[r, :classes] = grad_scale * (softmax(logits[r, :classes]) - onehot(target_r))  (TD)
/// Rows with target < 0: row_loss 0 and a zero dlogits row. A target >= classes gives a NaN
/// row loss (the targets live on the device and are not checked). dlogits may be null, or
/// alias logits with the same leading dimension (TD = float). classes <= 1024. Columns
/// [classes, ld_dlogits) are not written. One warp per row.
template <class TD>
void cross_entropy(Cuda const& be, int rows, int classes, float const* logits, std::int64_t ld_logits,
                   std::int32_t const* targets, TD* dlogits, std::int64_t ld_dlogits, float grad_scale,
                   float* row_loss) {
  static_assert(layers_detail::is_storage_v<TD>, "cross_entropy: TD is float or __nv_bfloat16");
  using namespace layers_detail;
  require(rows >= 0 && classes > 0 && classes <= kMaxClasses, "cross_entropy: need rows >= 0 and 0 < classes <= ",
          kMaxClasses, " (got rows=", rows, ", classes=", classes, ")");
  if (rows == 0) return;
  require(logits && targets && row_loss, "cross_entropy: null logits, targets or row_loss pointer");
  require(ld_logits >= classes && (!dlogits || ld_dlogits >= classes),
          "cross_entropy: leading dimensions must be >= classes (", classes, ")");
  require(!dlogits || static_cast<void const*>(dlogits) != static_cast<void const*>(logits) || ld_dlogits == ld_logits,
          "cross_entropy: in-place dlogits needs ld_dlogits == ld_logits");
  CrossEntropyParams<TD> p;
  p.rows = rows; p.classes = classes; p.zero_to = classes;
  p.logits = logits; p.ld_logits = ld_logits; p.targets = targets; p.dlogits = dlogits; p.ld_dlogits = ld_dlogits;
  p.grad_scale = grad_scale; p.row_loss = row_loss;
  ScopedDevice guard(be.device);
  cross_entropy_launch(be, p);
}

// =============================================================================================
// Deterministic reductions and gradient clipping
// =============================================================================================

/// Workspace of deterministic_sum / sum_of_squares over n floats: 8 bytes per 8192-element
/// block when there is more than one block, else 0.
inline std::size_t reduce_workspace_bytes(std::size_t n) {
  std::size_t const blocks = (n + layers_detail::kSumChunk - 1) / layers_detail::kSumChunk;
  return blocks > 1 ? blocks * sizeof(double) : 0;
}

/// *out = sum_{i<n} x[i], accumulated in double; out is device memory. Deterministic: fixed
/// 8192-element blocks (each summed in a fixed thread/warp order), then the block sums in block
/// order; the result depends only on the values and n. n == 0 gives +0.
inline void deterministic_sum(Cuda const& be, float const* x, std::size_t n, double* out, void* workspace) {
  layers_detail::sum_launch<false>(be, x, n, out, workspace, "deterministic_sum");
}

/// *out = sum_{i<n} x[i]^2 in double (squares taken in double), deterministic as
/// deterministic_sum: the squared global gradient norm. out is device memory.
inline void sum_of_squares(Cuda const& be, float const* x, std::size_t n, double* out, void* workspace) {
  layers_detail::sum_launch<true>(be, x, n, out, workspace, "sum_of_squares");
}

/// *scale = (max_norm > 0 && sqrt(*sumsq) > max_norm) ? max_norm / (sqrt(*sumsq) + 1e-6) : 1,
/// computed in double and rounded to float (train::clip_grad_norm's factor). Device scalars.
inline void clip_scale(Cuda const& be, double const* sumsq, float max_norm, float* scale) {
  require(sumsq && scale, "clip_scale: null sumsq or scale pointer");
  ScopedDevice guard(be.device);
  layers_detail::kernel::clip_scale<<<1, 1, 0, be.stream>>>(sumsq, max_norm, scale);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

// =============================================================================================
// AdamW
// =============================================================================================

/// A tensor of a flat parameter buffer: numel elements from offset, with weight decay or not.
struct AdamWSegment {
  std::size_t offset = 0, numel = 0;
  bool decay = true;
};

/// The device table of an AdamW update: the segments cut into pieces of at most 4096 elements
/// (one block each). Built once on the host (throws on overlapping segments) and uploaded
/// (synchronously) to be.device; move-only.
class AdamWPlan {
 public:
  AdamWPlan() = default;
  AdamWPlan(std::vector<AdamWSegment> const& segments, Cuda const& be) {
    std::vector<AdamWSegment> sorted;
    for (auto const& s : segments)
      if (s.numel > 0) sorted.push_back(s);
    std::sort(sorted.begin(), sorted.end(), [](auto const& a, auto const& b) { return a.offset < b.offset; });
    for (std::size_t i = 1; i < sorted.size(); ++i)
      require(sorted[i - 1].offset + sorted[i - 1].numel <= sorted[i].offset, "AdamWPlan: segment at offset ",
              sorted[i - 1].offset, " (", sorted[i - 1].numel, " elements) overlaps the one at offset ",
              sorted[i].offset);
    std::vector<AdamWPiece> pieces;
    for (auto const& s : segments) {
      if (s.numel == 0) continue;
      for (std::size_t off = 0; off < s.numel; off += layers_detail::kAdamPiece) {
        AdamWPiece pc;
        pc.offset = s.offset + off;
        pc.count = static_cast<std::uint32_t>(std::min<std::size_t>(layers_detail::kAdamPiece, s.numel - off));
        pc.decay = s.decay ? 1u : 0u;
        pieces.push_back(pc);
      }
      numel_ += s.numel;
      extent_ = std::max(extent_, s.offset + s.numel);
    }
    require(pieces.size() <= static_cast<std::size_t>(std::numeric_limits<int>::max()), "AdamWPlan: too many pieces");
    size_ = static_cast<int>(pieces.size());
    if (size_ > 0) {
      table_ = DeviceBuffer<AdamWPiece>(pieces.size(), be);
      table_.copy_from_host(pieces.data(), pieces.size(), be.stream);
    }
  }

  /// Device pointer to the piece table (null when empty).
  [[nodiscard]] AdamWPiece const* pieces() const noexcept { return table_.data(); }
  /// Number of pieces (blocks of one adamw_step launch).
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  /// Elements covered by the segments.
  [[nodiscard]] std::size_t numel() const noexcept { return numel_; }
  /// One past the last element covered: the buffers must hold at least this many.
  [[nodiscard]] std::size_t extent() const noexcept { return extent_; }

 private:
  DeviceBuffer<AdamWPiece> table_;
  int size_ = 0;
  std::size_t numel_ = 0, extent_ = 0;
};

/// One fused AdamW update (fp32 math) of every element i covered by the plan:
///   g = grad[i] * (*grad_scale) (or grad[i] when grad_scale is null; a device scalar)
///   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
///   p -= lr * ((m / c1) / (sqrt(v / c2) + eps) + wd p),  wd = weight_decay on decayed segments, else 0
/// with the bias corrections c1 = 1 - b1^t, c2 = 1 - b2^t given by the caller. param_bf16 (may
/// be null) receives bf16(p_new) at the same index. Elements outside the segments are never
/// touched. Element-wise, so trivially deterministic.
inline void adamw_step(Cuda const& be, AdamWPlan const& plan, float* param, float const* grad, float* m, float* v,
                       bf16* param_bf16, float lr, float beta1, float beta2, float eps, float weight_decay, float c1,
                       float c2, float const* grad_scale) {
  if (plan.empty()) return;
  require(param && grad && m && v, "adamw_step: null param, grad, m or v pointer");
  require(c1 > 0 && c2 > 0, "adamw_step: bias corrections must be positive (got c1=", c1, ", c2=", c2, ")");
  using namespace layers_detail;
  AdamWParams a;
  a.pieces = plan.pieces(); a.param = param; a.grad = grad; a.m = m; a.v = v; a.param_bf16 = param_bf16;
  a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps; a.weight_decay = weight_decay; a.c1 = c1; a.c2 = c2;
  a.grad_scale = grad_scale;
  a.vec = is_aligned(param, 16) && is_aligned(grad, 16) && is_aligned(m, 16) && is_aligned(v, 16) &&
          is_aligned(param_bf16, 8);
  ScopedDevice guard(be.device);
  layers_detail::kernel::adamw<<<static_cast<unsigned>(plan.size()), kAdamThreads, 0, be.stream>>>(a);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

// =============================================================================================
// Conversion
// =============================================================================================

/// out[i] = TO(in[i]) for i < n (float <-> bf16, round to nearest even; same type: a copy).
template <class TO, class TI>
void convert(Cuda const& be, TI const* in, TO* out, std::size_t n) {
  static_assert(layers_detail::is_storage_v<TO> && layers_detail::is_storage_v<TI>,
                "convert: TO and TI are float or __nv_bfloat16");
  if (n == 0) return;
  require(in && out, "convert: null pointer for ", n, " elements");
  ScopedDevice guard(be.device);
  layers_detail::kernel::convert<TO, TI><<<layers_detail::grid_1d(n, 256, 8192), 256, 0, be.stream>>>(in, out, n);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

/// out[r * ld_out + c] = TO(in[r * ld_in + c]) for r < rows, c < cols (leading dimensions in
/// elements; columns past cols are not touched).
template <class TO, class TI>
void convert_2d(Cuda const& be, int rows, int cols, TI const* in, std::int64_t ld_in, TO* out, std::int64_t ld_out) {
  static_assert(layers_detail::is_storage_v<TO> && layers_detail::is_storage_v<TI>,
                "convert_2d: TO and TI are float or __nv_bfloat16");
  require(rows >= 0 && cols >= 0, "convert_2d: negative shape (", rows, " x ", cols, ")");
  if (rows == 0 || cols == 0) return;
  require(in && out, "convert_2d: null pointer");
  require(ld_in >= cols && ld_out >= cols, "convert_2d: leading dimensions (", ld_in, ", ", ld_out,
          ") must be >= cols (", cols, ")");
  dim3 const grid(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(std::min(rows, 65535)));
  ScopedDevice guard(be.device);
  layers_detail::kernel::convert_2d<TO, TI><<<grid, 256, 0, be.stream>>>(rows, cols, in, ld_in, out, ld_out);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mambabyte::backend::cuda

// =============================================================================================
// Operator contracts for (backend::Cuda, float): device pointers in the Arguments
// =============================================================================================

namespace mambabyte::layers {

namespace cuda_detail {
/// Throws mambabyte::Error naming the operator when can_implement() refused the arguments.
inline void check_status(Status st, char const* op) {
  require(st == Status::kSuccess, op, " (CUDA): cannot run (", to_string(st), ")");
}
}  // namespace cuda_detail

/// Embedding on the device. can_implement() checks shapes and pointers only: the tokens are
/// device memory and are not read on the host (they must lie in [0, vocab)).
template <>
struct Embedding<backend::Cuda, float> {
  using Arguments = EmbeddingArguments<float>;
  static Status can_implement(Arguments const& a) {
    if (a.rows < 0 || a.dim <= 0 || a.vocab <= 0) return Status::kInvalidArgument;
    if (a.rows == 0) return Status::kSuccess;
    if (!a.tokens || !a.table || !a.out) return Status::kInvalidArgument;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const&, backend::Cuda const&) { return 0; }
  static void run(Arguments const& a, void*, backend::Cuda const& be) {
    cuda_detail::check_status(can_implement(a), "embedding");
    backend::cuda::embedding_forward(be, a.rows, a.dim, a.tokens, a.table, a.out);
  }
};

/// residual += hidden (when given); out = LayerNorm / RMSNorm(residual). dim <= 8192.
template <>
struct AddNorm<backend::Cuda, float> {
  using Arguments = AddNormArguments<float>;
  static Status can_implement(Arguments const& a) {
    Status const st = validate(a);  // shapes and pointers only
    if (st != Status::kSuccess) return st;
    if (a.dim > backend::cuda::layers_detail::kMaxRowDim) return Status::kUnsupported;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const&, backend::Cuda const&) { return 0; }
  static void run(Arguments const& a, void*, backend::Cuda const& be) {
    cuda_detail::check_status(can_implement(a), "add+norm");
    backend::cuda::add_norm_forward<float, float>(be, a.rows, a.dim, a.residual, a.hidden, a.residual, a.weight,
                                                  a.bias, a.out, static_cast<float>(a.eps), a.rms);
  }
};

/// Causal depthwise conv1d (+ SiLU), optional state in/out (float, device). width <= 64.
template <>
struct CausalConv1d<backend::Cuda, float> {
  using Arguments = CausalConv1dArguments<float>;
  static Status can_implement(Arguments const& a) {
    Status const st = validate(a);  // shapes and pointers only
    if (st != Status::kSuccess) return st;
    if (a.width > backend::cuda::layers_detail::kMaxConvWidth) return Status::kUnsupported;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const&, backend::Cuda const&) { return 0; }
  static void run(Arguments const& a, void*, backend::Cuda const& be) {
    cuda_detail::check_status(can_implement(a), "causal conv1d");
    backend::cuda::conv1d_forward<float>(be, a.batch, a.length, a.channels, a.width, a.x, a.ld_x, a.weight, a.bias,
                                         a.out, a.ld_out, a.state, a.silu);
  }
};

/// dtable[tokens[r]] += dout[r], deterministic (see backend::cuda::embedding_backward). Tokens
/// are not read on the host; out-of-range tokens are skipped on the device.
template <>
struct EmbeddingBackward<backend::Cuda, float> {
  using Arguments = EmbeddingBackwardArguments<float>;
  static Status can_implement(Arguments const& a) {
    if (a.rows < 0 || a.dim <= 0 || a.vocab <= 0) return Status::kInvalidArgument;
    if (a.rows == 0) return Status::kSuccess;
    if (!a.tokens || !a.dout || !a.dtable) return Status::kInvalidArgument;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const&) {
    return backend::cuda::embedding_backward_workspace_bytes(a.rows, a.dim, a.vocab);
  }
  static void run(Arguments const& a, void* workspace, backend::Cuda const& be) {
    cuda_detail::check_status(can_implement(a), "embedding backward");
    backend::cuda::embedding_backward(be, a.rows, a.dim, a.vocab, a.tokens, a.dout, a.dtable, workspace);
  }
};

/// dresidual += gradient through the norm; dweight, dbias accumulated deterministically.
template <>
struct AddNormBackward<backend::Cuda, float> {
  using Arguments = AddNormBackwardArguments<float>;
  static Status can_implement(Arguments const& a) {
    Status const st = validate(a);  // shapes and pointers only
    if (st != Status::kSuccess) return st;
    if (a.dim > backend::cuda::layers_detail::kMaxRowDim) return Status::kUnsupported;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const&) {
    return backend::cuda::add_norm_backward_workspace_bytes(a.rows, a.dim);
  }
  static void run(Arguments const& a, void* workspace, backend::Cuda const& be) {
    cuda_detail::check_status(can_implement(a), "add+norm backward");
    backend::cuda::add_norm_backward<float, float>(be, a.rows, a.dim, a.residual, a.weight, a.dout, a.dresidual,
                                                   static_cast<float*>(nullptr), a.dweight, a.dbias,
                                                   static_cast<float>(a.eps), a.rms, workspace);
  }
};

/// Backward of the causal conv1d with a zero initial window: dx written; dweight, dbias
/// accumulated deterministically. An initial state, dstate or accumulate_dx: kUnsupported.
template <>
struct CausalConv1dBackward<backend::Cuda, float> {
  using Arguments = CausalConv1dBackwardArguments<float>;
  static Status can_implement(Arguments const& a) {
    Status const st = validate(a);  // shapes and pointers only
    if (st != Status::kSuccess) return st;
    if (a.width > backend::cuda::layers_detail::kMaxConvWidth || a.state || a.dstate || a.accumulate_dx)
      return Status::kUnsupported;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const&) {
    return backend::cuda::conv1d_backward_workspace_bytes(a.batch, a.length, a.channels, a.width);
  }
  static void run(Arguments const& a, void* workspace, backend::Cuda const& be) {
    cuda_detail::check_status(can_implement(a), "causal conv1d backward");
    backend::cuda::conv1d_backward<float>(be, a.batch, a.length, a.channels, a.width, a.x, a.ld_x, a.weight, a.bias,
                                          a.silu, a.dout, a.ld_dout, a.dx, a.ld_dx, a.dweight, a.dbias, workspace);
  }
};

/// Mean cross-entropy over the rows with a target >= 0 and its gradient (layers/backward.hpp).
/// run() SYNCHRONISES be.stream twice: once to learn the number of counted rows (which scales
/// dlogits by grad_scale / n) and to reject targets >= classes, once to return the loss.
/// Workspace (device): the per-row losses, two counters, the double sum and its reduction
/// workspace.
template <>
struct CrossEntropy<backend::Cuda, float> {
  using Arguments = CrossEntropyArguments<float>;

  struct Layout {
    std::size_t row_loss = 0, counts = 0, sum = 0, reduce = 0, total = 0;
    explicit Layout(int rows) {
      if (rows <= 0) return;
      auto up = [](std::size_t n) { return (n + 255) / 256 * 256; };
      row_loss = 0;
      counts = up(static_cast<std::size_t>(rows) * sizeof(float));
      sum = counts + 256;
      reduce = sum + 256;
      total = reduce + up(backend::cuda::reduce_workspace_bytes(static_cast<std::size_t>(rows)));
    }
  };

  static Status can_implement(Arguments const& a) {
    if (a.rows < 0 || a.classes <= 0) return Status::kInvalidArgument;
    if (a.classes > backend::cuda::layers_detail::kMaxClasses) return Status::kUnsupported;
    if (a.rows == 0) return Status::kSuccess;
    if (!a.logits || !a.targets || a.ld_logits < a.classes) return Status::kInvalidArgument;
    if (a.dlogits && a.ld_dlogits < a.classes) return Status::kInvalidArgument;
    if (a.dlogits && static_cast<void const*>(a.dlogits) == static_cast<void const*>(a.logits) &&
        a.ld_dlogits != a.ld_logits)
      return Status::kInvalidArgument;
    return Status::kSuccess;
  }
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const&) { return Layout(a.rows).total; }

  /// Returns the mean loss over the counted rows (0 when none); writes dlogits when given,
  /// scaled by grad_scale / n, with zeros in [classes, ld_dlogits) when zero_padding.
  static double run(Arguments const& a, void* workspace, backend::Cuda const& be) {
    namespace bc = backend::cuda;
    using namespace bc::layers_detail;
    cuda_detail::check_status(can_implement(a), "cross entropy");
    if (a.rows == 0) return 0.0;
    require(workspace != nullptr, "cross entropy (CUDA): null workspace (workspace_bytes() bytes needed)");
    require(is_aligned(workspace, 16), "cross entropy (CUDA): workspace must be 16-byte aligned");
    Layout const lay(a.rows);
    auto* ws = static_cast<unsigned char*>(workspace);
    auto* row_loss = reinterpret_cast<float*>(ws + lay.row_loss);
    auto* counts = reinterpret_cast<int*>(ws + lay.counts);
    auto* sum = reinterpret_cast<double*>(ws + lay.sum);
    bc::ScopedDevice guard(be.device);
    bc::layers_detail::kernel::count_targets<<<1, 1024, 0, be.stream>>>(a.rows, a.classes, a.targets, counts);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    int host_counts[2] = {0, 0};
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(host_counts, counts, sizeof(host_counts), cudaMemcpyDeviceToHost, be.stream));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
    require(host_counts[1] == 0, "cross entropy (CUDA): ", host_counts[1], " targets are >= classes (", a.classes, ")");
    double const inv_n = host_counts[0] > 0 ? 1.0 / static_cast<double>(host_counts[0]) : 0.0;
    CrossEntropyParams<float> p;
    p.rows = a.rows; p.classes = a.classes;
    p.zero_to = (a.dlogits && a.zero_padding) ? a.ld_dlogits : static_cast<std::int64_t>(a.classes);
    p.logits = a.logits; p.ld_logits = a.ld_logits; p.targets = a.targets;
    p.dlogits = a.dlogits; p.ld_dlogits = a.ld_dlogits;
    p.grad_scale = static_cast<float>(a.grad_scale * inv_n);
    p.row_loss = row_loss;
    cross_entropy_launch(be, p);
    bc::deterministic_sum(be, row_loss, static_cast<std::size_t>(a.rows), sum, ws + lay.reduce);
    double total = 0;
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(&total, sum, sizeof(double), cudaMemcpyDeviceToHost, be.stream));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
    return total * inv_n;
  }
};

}  // namespace mambabyte::layers
