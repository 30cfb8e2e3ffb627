/*! \file
 *  \brief CUDA specialisations of ssm::SelectiveScanBackward for float (fp32 storage, state and
 *         math; device pointers): scan::Sequential, scan::Chunked<L> and scan::Auto.
 *
 *  Math and argument semantics: ssm/selective_scan_backward.hpp (activation gradients written,
 *  dA / dD / ddelta_bias accumulated, ddelta w.r.t. the raw delta before bias and softplus).
 *
 *  One thread per (batch, channel), kBwdThreads = 32 channels of one batch per block (one warp),
 *  the d_state states, the adjoint carry and the dA partial sums in registers. Launches on
 *  be.stream:
 *   0. time-parallel runs only (Chunked<L>, Auto on few channel blocks): time is cut into
 *      segments; kernel::bwd_seg_local scans every segment but the last forward from a zero
 *      state and every segment but the first backward with the adjoint recurrence from a zero
 *      carry (needs only dy, C and the decays), with its sum of deltas; kernel::bwd_seg_carry
 *      carries both across segments (decay of a segment = exp(A sum delta)), giving each
 *      segment its entering state and its adjoint carry from the end.
 *   1. kernel::bwd_checkpoints (per segment): the forward recurrence from the segment's state,
 *      storing the state entering every chunk of kBwdChunk = 8 steps (channel-innermost).
 *   2. kernel::bwd_scan (per segment): chunks last to first; per chunk the inputs are loaded
 *      into registers (u, delta, dout, z) and shared memory (B_t, C_t rows) at once, the states
 *      h_{t0-1..t1-1} are recomputed from the checkpoint into shared memory (per-thread columns),
 *      then the chunk is swept backwards with g_t = C_t dy_t + a_{t+1} g_{t+1}, writing du,
 *      ddelta, dz (and out when asked) and accumulating dA, dD, ddelta_bias per thread.
 *      dB_t / dC_t (sums over channels) are reduced deterministically: a warp reduce-scatter
 *      (31 shuffles for 32 values) into per-channel-block partial rows of the workspace.
 *   3. kernel::bwd_reduce_bc: dB / dC rows = the channel blocks' partials summed in block order.
 *   4. kernel::bwd_reduce_params: dA, dD, ddelta_bias += the per-(batch, segment) partials, in order.
 *  No atomics: results are bitwise deterministic for a given device, shape and policy.
 *  Exponentials per state-step: 3 with one segment, 5 with segments.
 *
 *  Workspace (floats; S = segments): batch x ceil(L/8) x d_state x d_inner (checkpoints)
 *    + ceil(d_inner/32) x batch x L x 2 kN (dB / dC partials; kN = 16 for d_state <= 16, else 32)
 *    + batch x S x d_inner x (d_state + 2) (parameter partials)
 *    + (S > 1) batch x S x d_inner x (2 d_state + 1) (segment states, carries, delta sums).
 *  About 1.6 GB at (8, 2048, 8192, 16). d_state <= 32 (16: exact fast path); more: kUnsupported.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/ssm/selective_scan_backward.hpp"

namespace mambabyte::backend::cuda::scan_bwd_detail {

using scan_detail::ex2_approx;
using scan_detail::softplus_dev;

inline constexpr int kBwdThreads = 32;   ///< channels per block (one thread each): one warp
inline constexpr int kBwdChunk = 8;      ///< checkpoint interval = recompute chunk (steps)
inline constexpr int kBwdMaxState = 32;  ///< largest d_state supported
inline constexpr int kWarps = kBwdThreads / 32;

struct BwdParams {
  ssm::SelectiveScanBackwardArguments<float> a;
  int n_chunks = 0;
  int blocks_d = 0;
  float* ck = nullptr;     ///< [batch][n_chunks][d_state][d_inner]
  float* bc = nullptr;     ///< [blocks_d][batch][length][2 kN]
  float* par = nullptr;    ///< [batch][n_seg][d_inner][d_state + 2]: dA, dD, dbias partials
  int n_seg = 1;           ///< time segments (time-parallel runs: > 1)
  int seg_chunks = 0;      ///< chunks per segment
  float* Hs = nullptr;     ///< [batch][n_seg][d_state][d_inner]: state entering each segment
  float* Qs = nullptr;     ///< [batch][n_seg][d_state][d_inner]: adjoint carry entering from its end
  float* dsum = nullptr;   ///< [batch][n_seg][d_inner]: sum of deltas per segment
};

inline int state_cap(int d_state) { return d_state <= 16 ? 16 : 32; }

template <int kN>
struct alignas(16) BwdSmem {
  float hs[kBwdChunk + 1][kN][kBwdThreads];       ///< per-thread columns of chunk states
  float red[kWarps][kBwdChunk][2 * kN];            ///< per-warp dB / dC sums of the chunk
  float bc[kBwdChunk][2 * kN];                     ///< B_t then C_t rows of the chunk
};

namespace kernel {

/// Pass 1: forward recurrence, the state entering chunk c stored in ck[b][c][n][d].
template <int kN, bool kExact>
MAMBABYTE_KERNEL void __launch_bounds__(kBwdThreads) bwd_checkpoints(BwdParams const p) {
  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;
  int const d = blockIdx.x * kBwdThreads + threadIdx.x;
  int const b = blockIdx.z;
  if (d >= a.d_inner) return;
  constexpr float kLog2e = 1.4426950408889634f;
  float A2[kN], h[kN];
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = n < N ? a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e : 0.f;
    if (p.n_seg > 1)
      h[n] = n < N ? p.Hs[(static_cast<std::int64_t>(b) * p.n_seg + blockIdx.y) * sN + static_cast<std::int64_t>(n) * a.d_inner + d] : 0.f;
    else
      h[n] = (n < N && a.initial_state) ? a.initial_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
  }
  float const bias = a.delta_bias ? a.delta_bias[d] : 0.f;
  std::int64_t const row0 = static_cast<std::int64_t>(b) * a.length;
  int const c_begin = blockIdx.y * p.seg_chunks;
  int const c_end = min(p.n_chunks, c_begin + p.seg_chunks);
  for (int c = c_begin; c < c_end; ++c) {
    bool const last = c + 1 == c_end;
    int const t0 = c * kBwdChunk;
    // The chunk's inputs first (independent loads, one latency per chunk), then the store.
    float dtv[kBwdChunk], uv[kBwdChunk];
    if (!last) {
#pragma unroll
      for (int k = 0; k < kBwdChunk; ++k) {  // full chunk: only the last one can be partial
        std::int64_t const row = row0 + t0 + k;
        dtv[k] = __ldg(a.delta + row * a.ld_delta + d);
        uv[k] = __ldg(a.u + row * a.ld_u + d);
      }
    }
    float* dst = p.ck + (static_cast<std::int64_t>(b) * p.n_chunks + c) * sN + d;
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) dst[static_cast<std::int64_t>(n) * a.d_inner] = h[n];
    if (last) break;
#pragma unroll
    for (int k = 0; k < kBwdChunk; ++k) {
      std::int64_t const row = row0 + t0 + k;
      float dt = dtv[k] + bias;
      if (a.delta_softplus) dt = softplus_dev(dt);
      float const du = dt * uv[k];
      float const* Bt = a.B + row * a.ld_B;
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) h[n] = fmaf(ex2_approx(dt * A2[n]), h[n], du * __ldg(Bt + n));
    }
  }
}

/// One level of the reduce-scatter: lanes with bit S set keep the upper S values.
template <int S>
__device__ __forceinline__ void reduce_level(float (&v)[32], int lane) {
  bool const upper = (lane & S) != 0;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    float const send = upper ? v[i] : v[i + S];
    float const keep = upper ? v[i + S] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, S);
  }
}

/// Sums v[0..32) over the warp; lane l returns the sum of element l (reduce-scatter, 31 shuffles).
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[32], int lane) {
  reduce_level<16>(v, lane);
  reduce_level<8>(v, lane);
  reduce_level<4>(v, lane);
  reduce_level<2>(v, lane);
  reduce_level<1>(v, lane);
  return v[0];
}

/// Pass 2: per (batch, channel block), chunks last to first: recompute, reverse sweep.
template <int kN, bool kExact>
MAMBABYTE_KERNEL void __launch_bounds__(kBwdThreads) bwd_scan(BwdParams const p) {
  constexpr int K = kBwdChunk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<BwdSmem<kN>*>(smem_raw);
  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;
  int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int const d = blockIdx.x * kBwdThreads + tid;
  int const b = blockIdx.z;
  bool const active = d < a.d_inner;
  int const dc = active ? d : a.d_inner - 1;
  int const L = a.length;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
  std::int64_t const row0 = static_cast<std::int64_t>(b) * L;

  float A2[kN], G[kN], dA[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = n < N ? a.A[static_cast<std::int64_t>(dc) * N + n] * kLog2e : 0.f;
    if (p.n_seg > 1)
      G[n] = (active && n < N) ? p.Qs[(static_cast<std::int64_t>(b) * p.n_seg + blockIdx.y) * sN + static_cast<std::int64_t>(n) * a.d_inner + d] : 0.f;
    else
      G[n] = (active && n < N && a.dfinal_state) ? a.dfinal_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
    dA[n] = 0.f;
  }
  float const bias = a.delta_bias ? a.delta_bias[dc] : 0.f;
  float const Dd = a.D ? a.D[dc] : 0.f;
  bool const has_z = a.z != nullptr;
  float dD = 0.f, dbias = 0.f;

  int const c_begin = blockIdx.y * p.seg_chunks;
  int const c_end = min(p.n_chunks, c_begin + p.seg_chunks);
  for (int c = c_end - 1; c >= c_begin; --c) {
    int const t0 = c * K;
    int const len = min(K, L - t0);
    // The chunk's inputs: per-thread columns into registers, B / C rows into shared memory.
    float vv[K], uu[K], go[K], zv[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      vv[k] = uu[k] = go[k] = zv[k] = 0.f;
      if (k < len && active) {
        std::int64_t const row = row0 + t0 + k;
        vv[k] = __ldg(a.delta + row * a.ld_delta + d) + bias;
        uu[k] = __ldg(a.u + row * a.ld_u + d);
        go[k] = __ldg(a.dout + row * a.ld_dout + d);
        if (has_z) zv[k] = __ldg(a.z + row * a.ld_z + d);
      }
    }
    for (int i = tid; i < len * 2 * kN; i += kBwdThreads) {
      int const k = i / (2 * kN), j = i - k * (2 * kN);
      std::int64_t const row = row0 + t0 + k;
      float x = 0.f;
      if (j < kN) { if (j < N) x = __ldg(a.B + row * a.ld_B + j); }
      else if (j - kN < N) x = __ldg(a.C + row * a.ld_C + (j - kN));
      sm.bc[k][j] = x;
    }
    __syncthreads();
    // Recompute h_{t0-1} .. h_{t0+len-1} into hs[0..len].
    {
      float h[kN];
      float const* src = p.ck + (static_cast<std::int64_t>(b) * p.n_chunks + c) * sN + dc;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        h[n] = (active && n < N) ? src[static_cast<std::int64_t>(n) * a.d_inner] : 0.f;
        sm.hs[0][n][tid] = h[n];
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (k < len) {
          float const dt = a.delta_softplus ? softplus_dev(vv[k]) : vv[k];
          float const du = dt * uu[k];
#pragma unroll
          for (int n = 0; n < kN; ++n) {
            if (n < N) h[n] = fmaf(ex2_approx(dt * A2[n]), h[n], du * sm.bc[k][n]);
            sm.hs[k + 1][n][tid] = h[n];
          }
        }
      }
    }
    // Reverse sweep over the chunk.
#pragma unroll
    for (int k = K - 1; k >= 0; --k) {
      if (k < len) {
        std::int64_t const row = row0 + t0 + k;
        float const v = vv[k], u = uu[k], dout = go[k], zz = zv[k];
        float const dt = a.delta_softplus ? softplus_dev(v) : v;
        float const* Bt = sm.bc[k];
        float const* Ct = sm.bc[k] + kN;
        float y0 = 0.f, y1 = 0.f;
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          if (n < N) {
            if (n & 1) y1 = fmaf(sm.hs[k + 1][n][tid], Ct[n], y1);
            else y0 = fmaf(sm.hs[k + 1][n][tid], Ct[n], y0);
          }
        }
        float const y = fmaf(Dd, u, y0 + y1);
        float dy = dout;
        if (has_z) {
          float const sig = 1.f / (1.f + __expf(-zz));
          float const silu = zz * sig;
          dy = dout * silu;
          if (active) {
            a.dz[row * a.ld_dz + d] = dout * y * sig * (1.f + zz * (1.f - sig));
            if (a.out) a.out[row * a.ld_out + d] = y * silu;
          }
        } else if (active && a.out) {
          a.out[row * a.ld_out + d] = y;
        }
        float const dtu = dt * u;
        float gB = 0.f, gAh = 0.f;
        float vals[2 * kN];  // dB then dC contributions of this channel
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          if (n < N) {
            float const g = fmaf(Ct[n], dy, G[n]);
            float const at = ex2_approx(dt * A2[n]);
            float const ah = at * sm.hs[k][n][tid];
            gB = fmaf(g, Bt[n], gB);
            float const gah = g * ah;
            gAh = fmaf(gah, A2[n], gAh);
            dA[n] = fmaf(gah, dt, dA[n]);
            vals[n] = g * dtu;
            vals[kN + n] = dy * sm.hs[k + 1][n][tid];
            G[n] = at * g;
          } else {
            vals[n] = 0.f;
            vals[kN + n] = 0.f;
          }
        }
        float dd = fmaf(u, gB, gAh * kLn2);
        if (a.delta_softplus && v <= 20.f) dd = __fdividef(dd, 1.f + __expf(-v));
        if (active) {
          a.du[row * a.ld_du + d] = fmaf(dt, gB, Dd * dy);
          a.ddelta[row * a.ld_ddelta + d] = dd;
        }
        dD = fmaf(dy, u, dD);
        dbias += dd;
#pragma unroll
        for (int gi = 0; gi < 2 * kN / 32; ++gi) {
          float w[32];
#pragma unroll
          for (int i = 0; i < 32; ++i) w[i] = vals[gi * 32 + i];
          sm.red[warp][k][gi * 32 + lane] = warp_reduce_scatter(w, lane);
        }
      }
    }
    __syncthreads();
    // Block partial rows of dB / dC for this chunk.
    float* dst = p.bc + ((static_cast<std::int64_t>(blockIdx.x) * a.batch + b) * L + t0) * (2 * kN);
    for (int i = tid; i < len * 2 * kN; i += kBwdThreads) {
      int const k = i / (2 * kN), j = i - k * (2 * kN);
      float s = sm.red[0][k][j];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) s += sm.red[w][k][j];
      dst[i] = s;
    }
    __syncthreads();
  }
  if (!active) return;
  if (a.dinitial_state && blockIdx.y == 0) {
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) a.dinitial_state[b * sN + static_cast<std::int64_t>(d) * N + n] = G[n];
  }
  float* par = p.par + ((static_cast<std::int64_t>(b) * p.n_seg + blockIdx.y) * a.d_inner + d) * (N + 2);
#pragma unroll
  for (int n = 0; n < kN; ++n)
    if (n < N) par[n] = dA[n];
  par[N] = dD;
  par[N + 1] = dbias;
}

/// Pass 3: dB / dC rows = sum of the channel blocks' partials (block order). A thread per
/// (row, j), j < 2N.
template <int kN>
MAMBABYTE_KERNEL void bwd_reduce_bc(BwdParams const p) {
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
    if (j < N) a.dB[r * a.ld_dB + j] = s;
    else a.dC[r * a.ld_dC + (j - N)] = s;
  }
}

/// Pass 4: dA, dD, ddelta_bias += per-batch partials (batch order). A thread per (d, j).
template <int = 0>
MAMBABYTE_KERNEL void bwd_reduce_params(BwdParams const p) {
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

/// Time-parallel runs, pass 0 (a thread per (batch, channel, segment)): the segment's forward
/// scan from a zero state (end state into Hs, all segments but the last) and its adjoint
/// recurrence from a zero carry (a_{t0} g_{t0} into Qs, all segments but the first; it needs
/// only dy, C and the decays, no states), with the segment's sum of deltas.
template <int kN, bool kExact>
MAMBABYTE_KERNEL void __launch_bounds__(kBwdThreads) bwd_seg_local(BwdParams const p) {
  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;
  int const d = blockIdx.x * kBwdThreads + threadIdx.x;
  int const sg = blockIdx.y, b = blockIdx.z;
  if (d >= a.d_inner) return;
  constexpr float kLog2e = 1.4426950408889634f;
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
  int const t0 = sg * p.seg_chunks * kBwdChunk;
  int const t1 = min(a.length, t0 + p.seg_chunks * kBwdChunk);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * a.length;
  float A2[kN], h[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = n < N ? a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e : 0.f;
    h[n] = 0.f;
  }
  float const bias = a.delta_bias ? a.delta_bias[d] : 0.f;
  float* slot_h = p.Hs + (static_cast<std::int64_t>(b) * p.n_seg + sg) * sN + d;
  float* slot_q = p.Qs + (static_cast<std::int64_t>(b) * p.n_seg + sg) * sN + d;
  float dsum = 0.f;
  if (sg + 1 < p.n_seg) {  // full segment (only the last can be partial): t1 - t0 multiple of 8
    for (int t = t0; t < t1; t += kBwdChunk) {
      float dtv[kBwdChunk], uv[kBwdChunk];
#pragma unroll
      for (int k = 0; k < kBwdChunk; ++k) {
        std::int64_t const row = row0 + t + k;
        dtv[k] = __ldg(a.delta + row * a.ld_delta + d) + bias;
        uv[k] = __ldg(a.u + row * a.ld_u + d);
      }
#pragma unroll
      for (int k = 0; k < kBwdChunk; ++k) {
        float const dt = a.delta_softplus ? softplus_dev(dtv[k]) : dtv[k];
        dsum += dt;
        float const du = dt * uv[k];
        float const* Bt = a.B + (row0 + t + k) * a.ld_B;
#pragma unroll
        for (int n = 0; n < kN; ++n)
          if (n < N) h[n] = fmaf(ex2_approx(dt * A2[n]), h[n], du * __ldg(Bt + n));
      }
    }
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) slot_h[static_cast<std::int64_t>(n) * a.d_inner] = h[n];
  }
  if (sg > 0) {
    bool const has_z = a.z != nullptr;
    float dsum2 = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n) h[n] = 0.f;  // now the adjoint carry
    for (int t = t1 - 1; t >= t0; --t) {
      std::int64_t const row = row0 + t;
      float const v = __ldg(a.delta + row * a.ld_delta + d) + bias;
      float const dt = a.delta_softplus ? softplus_dev(v) : v;
      dsum2 += dt;
      float dy = __ldg(a.dout + row * a.ld_dout + d);
      if (has_z) {
        float const zz = __ldg(a.z + row * a.ld_z + d);
        dy *= __fdividef(zz, 1.f + __expf(-zz));
      }
      float const* Ct = a.C + row * a.ld_C;
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) h[n] = ex2_approx(dt * A2[n]) * fmaf(__ldg(Ct + n), dy, h[n]);
    }
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) slot_q[static_cast<std::int64_t>(n) * a.d_inner] = h[n];
    dsum = dsum2;
  }
  p.dsum[(static_cast<std::int64_t>(b) * p.n_seg + sg) * a.d_inner + d] = dsum;
}

/// Time-parallel runs, pass 0b (a thread per (batch, channel)): carries across segments.
/// On exit Hs[s] = state entering segment s, Qs[s] = adjoint carry entering it from its end.
template <int kN>
MAMBABYTE_KERNEL void __launch_bounds__(kBwdThreads) bwd_seg_carry(BwdParams const p) {
  auto const& a = p.a;
  int const N = a.d_state;
  int const d = blockIdx.x * kBwdThreads + threadIdx.x;
  int const b = blockIdx.z;
  if (d >= a.d_inner) return;
  constexpr float kLog2e = 1.4426950408889634f;
  std::int64_t const sN = static_cast<std::int64_t>(a.d_inner) * N;
  float A2[kN], run[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = n < N ? a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e : 0.f;
    run[n] = (n < N && a.initial_state) ? a.initial_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
  }
  auto slot = [&](float* base, int sg, int n) -> float& {
    return base[(static_cast<std::int64_t>(b) * p.n_seg + sg) * sN + static_cast<std::int64_t>(n) * a.d_inner + d];
  };
  for (int sg = 0; sg < p.n_seg; ++sg) {
    float const ds = p.dsum[(static_cast<std::int64_t>(b) * p.n_seg + sg) * a.d_inner + d];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      if (n < N) {
        float& sl = slot(p.Hs, sg, n);
        float const local = sg + 1 < p.n_seg ? sl : 0.f;
        sl = run[n];
        run[n] = fmaf(ex2_approx(ds * A2[n]), run[n], local);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kN; ++n)
    run[n] = (n < N && a.dfinal_state) ? a.dfinal_state[b * sN + static_cast<std::int64_t>(d) * N + n] : 0.f;
  for (int sg = p.n_seg - 1; sg >= 0; --sg) {
    float const ds = p.dsum[(static_cast<std::int64_t>(b) * p.n_seg + sg) * a.d_inner + d];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      if (n < N) {
        float& sl = slot(p.Qs, sg, n);
        float const local = sg > 0 ? sl : 0.f;
        sl = run[n];
        run[n] = fmaf(ex2_approx(ds * A2[n]), run[n], local);
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
  std::size_t ck = 0, bc = 0, par = 0, seg = 0;  // float counts
  std::size_t bytes() const { return (ck + bc + par + seg) * sizeof(float); }
};

/// seg_chunks: chunks of kBwdChunk steps per time segment (0: one segment).
inline int segment_count(int length, int seg_chunks) {
  int const nc = (length + kBwdChunk - 1) / kBwdChunk;
  return seg_chunks <= 0 ? 1 : (nc + seg_chunks - 1) / seg_chunks;
}

inline WorkspaceLayout layout(ssm::SelectiveScanBackwardArguments<float> const& a, int seg_chunks) {
  WorkspaceLayout w;
  if (a.batch <= 0 || a.length <= 0) return w;
  std::size_t const nc = (static_cast<std::size_t>(a.length) + kBwdChunk - 1) / kBwdChunk;
  std::size_t const blocks_d = (static_cast<std::size_t>(a.d_inner) + kBwdThreads - 1) / kBwdThreads;
  w.ck = static_cast<std::size_t>(a.batch) * nc * a.d_state * a.d_inner;
  w.bc = blocks_d * a.batch * static_cast<std::size_t>(a.length) * 2 * state_cap(a.d_state);
  std::size_t const ns = static_cast<std::size_t>(segment_count(a.length, seg_chunks));
  w.par = static_cast<std::size_t>(a.batch) * ns * a.d_inner * (a.d_state + 2);
  if (ns > 1) w.seg = static_cast<std::size_t>(a.batch) * ns * a.d_inner * (2 * a.d_state + 1);
  return w;
}

template <int kN, bool kExact>
void run_impl(BwdParams& p, cudaStream_t stream) {
  auto const& a = p.a;
  if (p.n_seg > 1) {
    kernel::bwd_seg_local<kN, kExact><<<dim3(p.blocks_d, p.n_seg, a.batch), kBwdThreads, 0, stream>>>(p);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    kernel::bwd_seg_carry<kN><<<dim3(p.blocks_d, 1, a.batch), kBwdThreads, 0, stream>>>(p);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  }
  dim3 const grid(p.blocks_d, p.n_seg, a.batch);
  kernel::bwd_checkpoints<kN, kExact><<<grid, kBwdThreads, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  constexpr std::size_t smem = sizeof(BwdSmem<kN>);
  auto* fn = &kernel::bwd_scan<kN, kExact>;
  if constexpr (smem > 48 * 1024)
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  fn<<<grid, kBwdThreads, smem, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  std::int64_t const total = static_cast<std::int64_t>(a.batch) * a.length * 2 * a.d_state;
  unsigned const blocks = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 65535L * 16));
  kernel::bwd_reduce_bc<kN><<<blocks, 256, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  std::int64_t const np = static_cast<std::int64_t>(a.d_inner) * (a.d_state + 2);
  kernel::bwd_reduce_params<><<<static_cast<unsigned>((np + 255) / 256), 256, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

inline void run(ssm::SelectiveScanBackwardArguments<float> const& a, int seg_chunks, void* ws, Cuda const& be) {
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
  WorkspaceLayout const w = layout(a, seg_chunks);
  BwdParams p;
  p.a = a;
  p.n_chunks = (a.length + kBwdChunk - 1) / kBwdChunk;
  p.blocks_d = (a.d_inner + kBwdThreads - 1) / kBwdThreads;
  p.ck = static_cast<float*>(ws);
  p.bc = p.ck + w.ck;
  p.par = p.bc + w.bc;
  p.n_seg = segment_count(a.length, seg_chunks);
  p.seg_chunks = p.n_seg > 1 ? seg_chunks : p.n_chunks;
  require(p.n_seg <= 65535, "selective scan backward (CUDA): too many time segments");
  if (p.n_seg > 1) {
    std::size_t const S = static_cast<std::size_t>(a.batch) * p.n_seg * a.d_inner * a.d_state;
    p.Hs = p.par + w.par;
    p.Qs = p.Hs + S;
    p.dsum = p.Qs + S;
  }
  if (a.d_state == 16) run_impl<16, true>(p, be.stream);
  else if (a.d_state < 16) run_impl<16, false>(p, be.stream);
  else run_impl<32, false>(p, be.stream);
}

}  // namespace mambabyte::backend::cuda::scan_bwd_detail

namespace mambabyte::ssm {

/// The rule behind scan::Auto for the CUDA backward: chunks (of kBwdChunk steps) per time
/// segment, 0 for one segment. The single-segment run does 3 exponentials per state-step, the
/// segmented one 5 (a local forward and a local adjoint pass first) but n_seg times the warps.
/// bwd_scan holds at most ~11 one-warp blocks per SM (registers and the chunk's states in shared
/// memory) and every warp is latency-bound, so more warps pay even at batch 16 x 1536 channels.
/// Measured on the H200 (docs/cuda.md): segments of 512 steps were the best of 512 .. 8192 and
/// one segment at all three benchmark shapes (12.9 / 14.2 / 5.3 ms against 21.9 / 171 / 6.2 for
/// one segment). Rule: one segment when batch x channel-blocks (one warp each) reach 16 per SM
/// or the sequence is shorter than 1024 steps; else segments of 512 steps.
inline int resolve_auto_cuda_backward(int batch, int length, int d_inner, int sms) {
  namespace sd = backend::cuda::scan_bwd_detail;
  long const blocks = static_cast<long>(batch) * ((d_inner + sd::kBwdThreads - 1) / sd::kBwdThreads);
  long const nc = (length + sd::kBwdChunk - 1) / sd::kBwdChunk;
  constexpr int kSegChunks = 512 / sd::kBwdChunk;
  if (blocks >= 16L * sms || nc < 2 * kSegChunks) return 0;
  return kSegChunks;
}

/// Common part of the CUDA backward specialisations (float only).
template <class Derived>
struct CudaSelectiveScanBackwardBase {
  using Arguments = SelectiveScanBackwardArguments<float>;
  static Status can_implement(Arguments const& a) {
    Status const st = validate(a);
    if (st != Status::kSuccess) return st;
    if (a.d_state > backend::cuda::scan_bwd_detail::kBwdMaxState) return Status::kUnsupported;
    return Status::kSuccess;
  }
  static void check(Arguments const& a) {
    Status const st = can_implement(a);
    require(st == Status::kSuccess, "selective scan backward (CUDA): cannot run (", to_string(st),
            ") batch=", a.batch, " length=", a.length, " d_inner=", a.d_inner, " d_state=", a.d_state);
  }
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const& be) {
    return backend::cuda::scan_bwd_detail::layout(a, Derived::seg_chunks(a, be)).bytes();
  }
  static void run(Arguments const& a, void* ws, backend::Cuda const& be) {
    check(a);
    backend::cuda::scan_bwd_detail::run(a, Derived::seg_chunks(a, be), ws, be);
  }
  /// Run with an internally allocated workspace (cudaMalloc; synchronises the stream).
  static void run(Arguments const& a, backend::Cuda const& be) {
    check(a);
    backend::cuda::DeviceBuffer<std::byte> ws(workspace_bytes(a, be), be);
    run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
  }
};

/// Sequential: one time segment (checkpointed sweep over the whole length).
template <>
struct SelectiveScanBackward<backend::Cuda, float, scan::Sequential>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, float, scan::Sequential>> {
  static int seg_chunks(Arguments const&, backend::Cuda const&) { return 0; }
};

/// Chunked<L>: time segments of L steps (rounded up to a multiple of 8), time-parallel.
template <int ChunkLen>
struct SelectiveScanBackward<backend::Cuda, float, scan::Chunked<ChunkLen>>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, float, scan::Chunked<ChunkLen>>> {
  using Arguments = SelectiveScanBackwardArguments<float>;
  static int seg_chunks(Arguments const&, backend::Cuda const&) {
    constexpr int K = backend::cuda::scan_bwd_detail::kBwdChunk;
    return (ChunkLen + K - 1) / K;
  }
};

/// Auto: resolve_auto_cuda_backward() picks one segment or a segment length.
template <>
struct SelectiveScanBackward<backend::Cuda, float, scan::Auto>
    : CudaSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cuda, float, scan::Auto>> {
  static int seg_chunks(Arguments const& a, backend::Cuda const& be) {
    if (a.batch <= 0 || a.length <= 0) return 0;
    return resolve_auto_cuda_backward(a.batch, a.length, a.d_inner,
                                      backend::cuda::scan_detail::sm_count(be.device));
  }
};

}  // namespace mambabyte::ssm
