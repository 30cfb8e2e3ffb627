/*! \file
 *  \brief The single-token step's causal conv + SiLU and x_proj in one kernel (the layer-by-layer
 *         decode step, used above the persistent step's batch and in fp32): one launch where
 *         the conv kernel and the x_proj GEMM were two.
 *
 *  For batch row b and channel c (T = float or __nv_bfloat16 storage, fp32 math):
 *      acc      = bias[c] + sum_{k < K-1} w[c,k] state[b,k,c] + w[c,K-1] x[b,c]   (in that order)
 *      u[b,c]   = round_T(silu(acc)),      state[b,:,c] <- (state[b,1:,c], x[b,c])
 *      out[b,j] = round_T(sum_c W[j,c] u[b,c])                     j < X (x_proj's outputs)
 *  The conv is the arithmetic of layers.cuh's conv1d_forward over one step with a state (u and
 *  the new state bitwise equal to it). x_proj's sum over d_inner is split: block (s, g) owns the
 *  channels [s kChannels, (s + 1) kChannels) of the batch rows [g rows, (g + 1) rows); it
 *  stages its slice of W in shared memory (copies in flight during the conv), computes the conv,
 *  then its partial sums of the rows' X outputs over its channels (each a fixed order: four lanes
 *  per output, lane k summing the 16-byte chunks of channels k, k + 4, ... in order with fmaf,
 *  the lanes added as (0 + 1) + (2 + 3)) into `partial`.
 *  The last block of a row group to finish (a counter per group, after a fence) adds the groups'
 *  partials in split order and writes `out`, then sets the counter back to 0 for the next
 *  launch: a fixed summation order, so the step is bitwise reproducible (cuBLAS's GEMM sums in
 *  its own order: the results differ from the GEMM's by rounding, not from run to run).
 *
 *  Workspace: conv_xproj_partial_floats() floats and conv_xproj_counters() unsigned, the
 *  counters zeroed once (conv_xproj_reset) before the first launch; the kernel leaves them zero.
 *  Launches on one stream must not overlap (a graph of steps on one stream is fine).
 *  Capturable in a CUDA graph: one kernel launch, no allocation, no host synchronisation.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/decode.cuh"
#include "mambabyte/backend/cuda/layers.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/core/error.hpp"

namespace mambabyte::backend::cuda {

namespace conv_xproj_detail {

inline constexpr int kThreads = 256;   ///< threads per block
inline constexpr int kChannels = 128;  ///< channels per block: x_proj's sum is split in d_inner / kChannels parts
inline constexpr int kMaxRows = 8;     ///< batch rows per block
inline constexpr int kTargetBlocks = 256;  ///< row groups x splits wanted (two blocks per SM)
/// Dynamic shared memory the kernel may use (and the device must allow): x_proj widths up to 163
/// in fp32, 294 in bf16 (conv_xproj_supported; the model keeps the conv kernel + GEMM beyond).
inline constexpr std::size_t kMaxSmem = 96 * 1024;
inline constexpr int kSumAhead = 16;       ///< partials loaded before the last block adds them
/// Channels per 16-byte chunk of T (the unit of the x_proj lanes' interleave).
template <class T>
inline constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
/// Shared-memory stride of a W row (bytes): = 64 mod 128, so that the 4 lanes of an output and
/// the 2 outputs of a quarter warp read 16 bytes each from 8 different bank groups.
template <class T>
inline constexpr int kWStride = kChannels * static_cast<int>(sizeof(T)) + 64;
/// Dynamic shared memory of the kernel for X outputs: u rows + W slice.
template <class T>
inline std::size_t smem_bytes(int X) {
  return sizeof(float) * kMaxRows * kChannels + static_cast<std::size_t>(X) * kWStride<T>;
}

template <class T>
struct Params {
  int batch = 0, d_inner = 0, width = 0, X = 0;
  int rows = 1, splits = 1;  ///< batch rows per block, channel splits
  T const* x = nullptr;      std::int64_t ld_x = 0;
  float const* conv_w = nullptr;  ///< (d_inner, width)
  float const* conv_b = nullptr;
  float* conv_state = nullptr;    ///< (batch, width - 1, d_inner)
  T* u = nullptr;            std::int64_t ld_u = 0;
  T const* W = nullptr;           ///< (X, d_inner) row-major
  T* out = nullptr;          std::int64_t ld_out = 0;
  float* partial = nullptr;       ///< (groups, splits, rows, X)
  unsigned* counter = nullptr;    ///< (groups)
  bool vec = false;               ///< W rows read as 16-byte vectors (aligned, d_inner a multiple of 16 / sizeof(T))
};

/// Batch rows per block: enough row groups that groups x splits reaches kTargetBlocks.
inline int rows_per_block(int batch, int d_inner) {
  int const splits = (d_inner + kChannels - 1) / kChannels;
  long const want = static_cast<long>(batch) * splits / kTargetBlocks;
  return static_cast<int>(std::clamp<long>(want, 1, kMaxRows));
}

namespace kernel {

/// kW: the conv width at compile time (1..4: the window in registers, every load of a thread
/// issued before the first use), 0: any width (a loop). kR: the most batch rows per block (1 or
/// kMaxRows; p.rows <= kR). Dynamic shared memory: smem_bytes(X).
template <class T, int kW, int kR>
MAMBABYTE_KERNEL void __launch_bounds__(kThreads) conv_xproj_step(Params<T> const p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float(*const us)[kChannels] = reinterpret_cast<float(*)[kChannels]>(smem);
  unsigned char* const ws = smem + sizeof(float) * kMaxRows * kChannels;  // W rows, stride kWStride<T>
  __shared__ bool last;
  constexpr int E = kChunk<T>;
  int const tid = static_cast<int>(threadIdx.x);
  int const split = static_cast<int>(blockIdx.x), grp = static_cast<int>(blockIdx.y);
  int const c0 = split * kChannels, cn = min(kChannels, p.d_inner - c0);
  int const b0 = grp * p.rows, bn = min(p.rows, p.batch - b0);
  int const K = kW > 0 ? kW : p.width, di = p.d_inner, X = p.X;
  bool const vec = p.vec && cn == kChannels;  // full split, aligned rows: 16-byte copies

  // ---- the block's W slice (X rows of cn channels) into shared memory, in flight during the conv
  if (vec) {
    for (int i = tid; i < X * (kChannels / E); i += kThreads) {
      int const j = i / (kChannels / E), ch = i - j * (kChannels / E);
      decode_detail::cp_async16(ws + j * kWStride<T> + 16 * ch, p.W + static_cast<std::int64_t>(j) * di + c0 + E * ch);
    }
  } else {
    for (int i = tid; i < X * cn; i += kThreads) {
      int const j = i / cn, c = i - j * cn;
      reinterpret_cast<T*>(ws + j * kWStride<T>)[c] = p.W[static_cast<std::int64_t>(j) * di + c0 + c];
    }
  }

  // ---- conv + SiLU of (row r, channel c0 + i), item it = r kChannels + i: every load first,
  // then layers_detail::kernel::conv1d_forward's arithmetic in its order
  constexpr int kItems = (kR * kChannels + kThreads - 1) / kThreads;
  constexpr int H = kW > 1 ? kW - 1 : 1;  // window entries held (kW > 0)
  float xt[kItems], win[kItems][H];
#pragma unroll
  for (int v = 0; v < kItems; ++v) {
    int const it = tid + v * kThreads, r = it / kChannels, i = it - r * kChannels;
    xt[v] = 0.f;
    if (r < bn && i < cn) {
      int const b = b0 + r, c = c0 + i;
      xt[v] = scan_detail::load_f(p.x + static_cast<std::int64_t>(b) * p.ld_x + c);
      if constexpr (kW > 1) {
        float const* st = p.conv_state + static_cast<std::int64_t>(b) * (kW - 1) * di + c;
#pragma unroll
        for (int k = 0; k < kW - 1; ++k) win[v][k] = st[static_cast<std::int64_t>(k) * di];
      }
    }
  }
#pragma unroll
  for (int v = 0; v < kItems; ++v) {
    int const it = tid + v * kThreads, r = it / kChannels, i = it - r * kChannels;
    if (r >= kR) continue;
    float uv = 0.f;
    if (r < bn && i < cn) {
      int const b = b0 + r, c = c0 + i;
      float const* w = p.conv_w + static_cast<std::int64_t>(c) * K;
      float* st = p.conv_state + static_cast<std::int64_t>(b) * (K - 1) * di + c;
      float acc = p.conv_b ? p.conv_b[c] : 0.f;
      if constexpr (kW > 0) {
#pragma unroll
        for (int k = 0; k < kW - 1; ++k) acc += w[k] * win[v][k];
        acc += w[kW - 1] * xt[v];
#pragma unroll
        for (int k = 0; k + 1 < kW - 1; ++k) st[static_cast<std::int64_t>(k) * di] = win[v][k + 1];
        if constexpr (kW > 1) st[static_cast<std::int64_t>(kW - 2) * di] = xt[v];
      } else {
        for (int k = 0; k < K - 1; ++k) {  // entry k read, then moved to k - 1
          float const sv = st[static_cast<std::int64_t>(k) * di];
          acc += w[k] * sv;
          if (k > 0) st[static_cast<std::int64_t>(k - 1) * di] = sv;
        }
        acc += w[K - 1] * xt[v];
        if (K > 1) st[static_cast<std::int64_t>(K - 2) * di] = xt[v];
      }
      T const ut = scan_detail::from_f<T>(layers_detail::kernel::silu_f(acc));
      p.u[static_cast<std::int64_t>(b) * p.ld_u + c] = ut;
      uv = scan_detail::to_f(ut);
    }
    us[r][i] = uv;
  }
  decode_detail::cp_async_wait_all();
  __syncthreads();

  // ---- partial x_proj of the block's rows for output j over its channels: 4 lanes per output
  // column (every row of the block at once: each W chunk read once for all of them); lane k sums
  // the E-channel chunks k, k + 4, k + 8, ... (E = 16 bytes of T) in order, each chunk's channels
  // in order, with fmaf; two shuffles add the lanes as (0 + 1) + (2 + 3)
  float* const part = p.partial + (static_cast<std::int64_t>(grp) * p.splits + split) * p.rows * X;
  int const k = tid & 3;
  for (int w0 = 0; w0 < 4 * X; w0 += kThreads) {  // uniform trip count: shuffles below
    int const j = (w0 + tid) >> 2;
    bool const act = j < X;
    unsigned char const* wr = ws + (act ? j : 0) * kWStride<T>;
    float s[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) s[r] = 0.f;
    if (act) {
      if (vec) {
#pragma unroll
        for (int ch = k; ch < kChannels / E; ch += 4) {
          uint4 const w4 = *reinterpret_cast<uint4 const*>(wr + 16 * ch);
          T const* w = reinterpret_cast<T const*>(&w4);
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            if (r < bn) {
#pragma unroll
              for (int e = 0; e < E; e += 4) {
                float4 const u4 = *reinterpret_cast<float4 const*>(&us[r][E * ch + e]);
                s[r] = fmaf(scan_detail::to_f(w[e]), u4.x, s[r]);
                s[r] = fmaf(scan_detail::to_f(w[e + 1]), u4.y, s[r]);
                s[r] = fmaf(scan_detail::to_f(w[e + 2]), u4.z, s[r]);
                s[r] = fmaf(scan_detail::to_f(w[e + 3]), u4.w, s[r]);
              }
            }
          }
        }
      } else {
        T const* w = reinterpret_cast<T const*>(wr);
        for (int ch = k; ch * E < cn; ch += 4)
          for (int c = E * ch; c < min(cn, E * ch + E); ++c) {
            float const wv = scan_detail::to_f(w[c]);
#pragma unroll
            for (int r = 0; r < kR; ++r)
              if (r < bn) s[r] = fmaf(wv, us[r][c], s[r]);
          }
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r < bn) {  // block-uniform
        float t = s[r];
        t += __shfl_xor_sync(0xffffffffu, t, 1);
        t += __shfl_xor_sync(0xffffffffu, t, 2);
        if (act && k == 0) part[r * X + j] = t;
      }
    }
  }

  // ---- the group's last block adds the splits' partials in order (the barrier, then thread 0's
  // fence before its atomic: every thread's partials are visible before the count, the fence
  // being cumulative, as in a cooperative grid barrier)
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(p.counter + grp, 1u) + 1u == static_cast<unsigned>(p.splits);
    __threadfence();  // acquire: the other blocks' partials before this block's reads (after the barrier)
  }
  __syncthreads();
  if (!last) return;
  float const* const gp = p.partial + static_cast<std::int64_t>(grp) * p.splits * p.rows * X;
  std::int64_t const stride = static_cast<std::int64_t>(p.rows) * X;
  for (int o = tid; o < bn * X; o += kThreads) {
    int const r = o / X, j = o - r * X;
    float t = 0.f;
    for (int q0 = 0; q0 < p.splits; q0 += kSumAhead) {  // kSumAhead loads in flight, then added in order
      float v[kSumAhead];
#pragma unroll
      for (int i = 0; i < kSumAhead; ++i) v[i] = q0 + i < p.splits ? __ldcg(gp + (q0 + i) * stride + o) : 0.f;
#pragma unroll
      for (int i = 0; i < kSumAhead; ++i)
        if (q0 + i < p.splits) t += v[i];
    }
    p.out[static_cast<std::int64_t>(b0 + r) * p.ld_out + j] = scan_detail::from_f<T>(t);
  }
  if (tid == 0) p.counter[grp] = 0u;  // for the next launch (kernel boundaries order it)
}

}  // namespace kernel
}  // namespace conv_xproj_detail

/// Floats of the partial sums conv_xproj_step needs at (batch, d_inner, X).
inline std::size_t conv_xproj_partial_floats(int batch, int d_inner, int X) {
  using namespace conv_xproj_detail;
  if (batch <= 0 || d_inner <= 0 || X <= 0) return 0;
  int const rows = rows_per_block(batch, d_inner);
  std::size_t const groups = static_cast<std::size_t>((batch + rows - 1) / rows);
  std::size_t const splits = static_cast<std::size_t>((d_inner + kChannels - 1) / kChannels);
  return groups * splits * rows * static_cast<std::size_t>(X);
}

/// Counters conv_xproj_step needs at (batch, d_inner): one per row group.
inline std::size_t conv_xproj_counters(int batch, int d_inner) {
  if (batch <= 0 || d_inner <= 0) return 0;
  int const rows = conv_xproj_detail::rows_per_block(batch, d_inner);
  return static_cast<std::size_t>((batch + rows - 1) / rows);
}

/// Zeroes the counters (on be.stream): once after allocating them.
inline void conv_xproj_reset(Cuda const& be, unsigned* counters, std::size_t n) {
  ScopedDevice guard(be.device);
  if (n) MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(counters, 0, n * sizeof(unsigned), be.stream));
}

/// The device's per-block shared-memory limit with opt-in (bytes).
inline std::size_t device_smem_optin(int device) {
  int optin = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<std::size_t>(optin);
}

/// Whether conv_xproj_step runs an x_proj of width X with storage T on `device` (its W slice
/// fits the shared memory it may use).
template <class T>
bool conv_xproj_supported(int X, int device) {
  using namespace conv_xproj_detail;
  return X >= 1 && smem_bytes<T>(X) <= std::min<std::size_t>(kMaxSmem, device_smem_optin(device));
}

/// Raises the kernels' dynamic shared-memory limit to kMaxSmem, or the device's limit if lower
/// (x_proj widths whose W slice needs more than 48 KB: fp32 at the 353M shape); once per device
/// and T. Call it before capturing a graph that holds conv_xproj_step (outside a capture
/// conv_xproj_step calls it itself).
template <class T>
void conv_xproj_setup(Cuda const& be) {
  using namespace conv_xproj_detail;
  static std::atomic<std::uint64_t> done{0};  // devices (id < 64) already raised, per T
  std::uint64_t const bit = be.device >= 0 && be.device < 64 ? std::uint64_t{1} << be.device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return;
  ScopedDevice guard(be.device);
  int const limit = static_cast<int>(std::min<std::size_t>(kMaxSmem, device_smem_optin(be.device)));
  auto raise = [limit](auto kernel) {
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  };
  auto both = [&]<int kW>() {
    raise(conv_xproj_detail::kernel::conv_xproj_step<T, kW, 1>);
    raise(conv_xproj_detail::kernel::conv_xproj_step<T, kW, kMaxRows>);
  };
  both.template operator()<0>();
  both.template operator()<1>();
  both.template operator()<2>();
  both.template operator()<3>();
  both.template operator()<4>();
  done.fetch_or(bit, std::memory_order_acq_rel);
}

/// One step of the causal conv (+ SiLU) and x_proj for every sequence (see the file comment).
/// x: (batch, >= d_inner) rows at ld_x (in_proj's x part); conv_w (d_inner, width) and conv_b
/// (nullable) float; conv_state (batch, width - 1, d_inner) float, updated in place; u (batch,
/// >= d_inner) rows at ld_u written; W (X, d_inner) row-major; out (batch, >= X) rows at ld_out
/// written. partial / counters: the workspace above (counters zeroed before the first call).
template <class T>
void conv_xproj_step(Cuda const& be, int batch, int d_inner, int width, T const* x, std::int64_t ld_x,
                     float const* conv_w, float const* conv_b, float* conv_state, T* u, std::int64_t ld_u,
                     T const* W, int X, T* out, std::int64_t ld_out, float* partial, unsigned* counters) {
  static_assert(is_scan_storage_v<T>, "conv_xproj_step: T is float or __nv_bfloat16");
  using namespace conv_xproj_detail;
  require(batch >= 0 && d_inner > 0 && X > 0 && width >= 1 && width <= layers_detail::kMaxConvWidth,
          "conv_xproj_step (CUDA): bad shape batch=", batch, " d_inner=", d_inner, " X=", X, " width=", width);
  if (batch == 0) return;
  require(x && conv_w && u && W && out && partial && counters && (width == 1 || conv_state),
          "conv_xproj_step (CUDA): null input, output or workspace");
  require(batch == 1 || (ld_x >= d_inner && ld_u >= d_inner && ld_out >= X),
          "conv_xproj_step (CUDA): leading dimension smaller than the row");
  Params<T> p;
  p.batch = batch; p.d_inner = d_inner; p.width = width; p.X = X;
  p.rows = rows_per_block(batch, d_inner);
  p.splits = (d_inner + kChannels - 1) / kChannels;
  int const groups = (batch + p.rows - 1) / p.rows;
  require(groups <= 65535, "conv_xproj_step (CUDA): batch ", batch, " too large");
  p.x = x; p.ld_x = ld_x;
  p.conv_w = conv_w; p.conv_b = conv_b; p.conv_state = conv_state;
  p.u = u; p.ld_u = ld_u;
  p.W = W;
  p.out = out; p.ld_out = ld_out;
  p.partial = partial; p.counter = counters;
  p.vec = d_inner % kChunk<T> == 0 && reinterpret_cast<std::uintptr_t>(W) % 16 == 0;
  std::size_t const smem = smem_bytes<T>(X);
  require(smem <= kMaxSmem, "conv_xproj_step (CUDA): x_proj width ", X, " needs ", smem,
          " bytes of shared memory (at most ", kMaxSmem, "; conv_xproj_supported says which widths run)");
  ScopedDevice guard(be.device);
  if (smem > 48 * 1024) {  // outside a capture the limit is raised here; a capture needs conv_xproj_setup first
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    MAMBABYTE_CUDA_CHECK(cudaStreamIsCapturing(be.stream, &cs));
    if (cs == cudaStreamCaptureStatusNone) conv_xproj_setup<T>(be);
  }
  dim3 const grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(groups));
  auto go = [&]<int kW>() {
    if (p.rows == 1) conv_xproj_detail::kernel::conv_xproj_step<T, kW, 1><<<grid, kThreads, smem, be.stream>>>(p);
    else conv_xproj_detail::kernel::conv_xproj_step<T, kW, kMaxRows><<<grid, kThreads, smem, be.stream>>>(p);
  };
  switch (width) {
    case 1: go.template operator()<1>(); break;
    case 2: go.template operator()<2>(); break;
    case 3: go.template operator()<3>(); break;
    case 4: go.template operator()<4>(); break;
    default: go.template operator()<0>(); break;
  }
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mambabyte::backend::cuda
