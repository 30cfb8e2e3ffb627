/*! \file
 *  \brief CUDA specialisations of ssm::SelectiveScan for float (fp32 storage, state and math),
 *         device pointers in the arguments: scan::Sequential, scan::Chunked<L> and scan::Auto.
 *
 *  One kernel does all the scanning (kernel::scan_chunk). A thread owns one (batch, channel)
 *  and keeps that channel's d_state states in registers; a block is kThreads consecutive
 *  channels of one batch and one time chunk. Time runs in tiles of kTileT steps: the block
 *  copies the next tile of u, delta, z (one column per thread: coalesced across channels) and
 *  of B_t, C_t (shared by the block) into shared memory with cp.async while it computes the
 *  current one (two stages), so the loads of HBM overlap the arithmetic.
 *  Per step: delta = softplus(delta + bias), h = exp(delta A) h + delta u B_t (exp2 with A
 *  pre-scaled by log2 e), y = <h, C_t> + D u, out = y silu(z): all fused, one pass.
 *
 *  - Sequential: one chunk per (batch, channel block); the whole length in time order.
 *  - Chunked<L>: reduce-then-scan along time, as the CPU backend. Phase 1 (kReduce) scans every
 *    chunk but the last from a zero state and stores its end state and sum of deltas in the
 *    workspace; phase 2 (kernel::carry_chunks, a thread per (batch, channel)) turns those into
 *    each chunk's carried-in state (decay of a chunk = exp(A sum delta)); phase 3 (kWrite)
 *    rescans every chunk from its carried-in state and writes the outputs. About 1.9x the
 *    exponentials of Sequential, but batch x channels x chunks threads instead of
 *    batch x channels: what a long sequence at small batch needs to fill the GPU.
 *  - Auto: resolve_auto_cuda() below (chunk count from the SM count; Sequential when the
 *    channel blocks alone fill the machine).
 *
 *  d_state up to 64 (an exact 16-state fast path and a general one for d_state <= 64); larger d_state:
 *  can_implement() says kUnsupported. The launch is asynchronous on be.stream; the workspace
 *  (Chunked, Auto) is device memory of workspace_bytes() bytes, owned by the caller.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

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

namespace mambabyte::backend::cuda::scan_detail {

inline constexpr int kThreads = 128;  ///< channels per block (one thread each)
inline constexpr int kTileT = 16;     ///< time steps per shared-memory stage
inline constexpr int kMaxState = 64;  ///< largest d_state supported

/// Where a state array lives: element (b, chunk c, channel d, state n) at
/// p[b*sb + c*sc + d*sd + n*sn]. p == nullptr means "zero" (as input) / "not wanted" (output).
struct StateView {
  float* p = nullptr;
  std::int64_t sb = 0, sc = 0, sd = 0, sn = 0;
};

enum class Mode { kReduce, kWrite };

struct ScanParams {
  ssm::SelectiveScanArguments<float> a;
  int chunk_len = 0;    ///< time steps per chunk (>= length for one chunk)
  int n_chunks = 1;
  StateView h_in;       ///< kWrite: carried-in state per chunk (null: zero)
  StateView h_out;      ///< kReduce: end state of every chunk; kWrite: of the last chunk only
  float* dsum = nullptr;  ///< kReduce: sum of deltas, [(b*n_chunks + c)*d_inner + d]
};

__device__ __forceinline__ float softplus_dev(float v) { return v <= 20.f ? log1pf(expf(v)) : v; }

/// 2^x by the special-function unit (ex2.approx.ftz: about 2 ulp; results below 2^-126 flush
/// to zero, which only ends a decayed state's tail).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// Shared memory of one stage: u, delta, z columns (kTileT x kThreads) and B, C rows.
template <int kN>
struct Stage {
  float u[kTileT][kThreads];
  float dt[kTileT][kThreads];
  float z[kTileT][kThreads];
  float bc[kTileT][2 * kN];  // B_t[0..N) then C_t[0..N)
};

namespace kernel {

/// Scans time chunk blockIdx.y (kWrite) or chunk blockIdx.y of the first n_chunks-1 (kReduce)
/// for channels blockIdx.x*kThreads + threadIdx.x of batch blockIdx.z.
template <int kN, bool kExact, Mode kMode>
MAMBABYTE_KERNEL void __launch_bounds__(kThreads) scan_chunk(ScanParams const p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto* stages = reinterpret_cast<Stage<kN>*>(smem_raw);

  auto const& a = p.a;
  int const N = kExact ? kN : a.d_state;  // kExact: d_state == kN, the guards fold away
  int const tid = threadIdx.x;
  int const d = blockIdx.x * kThreads + tid;
  int const c = blockIdx.y;
  int const b = blockIdx.z;
  bool const active = d < a.d_inner;
  int const t0 = c * p.chunk_len;
  int const t1 = min(a.length, t0 + p.chunk_len);
  std::int64_t const row0 = static_cast<std::int64_t>(b) * a.length;

  constexpr float kLog2e = 1.4426950408889634f;
  float A2[kN], h[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = (active && n < N) ? a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e : 0.f;
    h[n] = 0.f;
  }
  if constexpr (kMode == Mode::kWrite) {
    if (active && p.h_in.p) {
      float const* src = p.h_in.p + b * p.h_in.sb + c * p.h_in.sc + d * p.h_in.sd;
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) h[n] = src[n * p.h_in.sn];
    }
  }
  float const bias = (active && a.delta_bias) ? a.delta_bias[d] : 0.f;
  float const Dd = (active && a.D) ? a.D[d] : 0.f;
  bool const has_z = a.z != nullptr;
  float dsum = 0.f;

  // Issues the cp.async copies of the tile starting at time t into stage s.
  auto issue = [&](int s, int t) {
    int const nt = min(kTileT, t1 - t);
    Stage<kN>& st = stages[s];
    if (active) {
      for (int k = 0; k < nt; ++k) {
        std::int64_t const row = row0 + t + k;
        __pipeline_memcpy_async(&st.u[k][tid], a.u + row * a.ld_u + d, sizeof(float));
        __pipeline_memcpy_async(&st.dt[k][tid], a.delta + row * a.ld_delta + d, sizeof(float));
        if (kMode == Mode::kWrite && has_z)
          __pipeline_memcpy_async(&st.z[k][tid], a.z + row * a.ld_z + d, sizeof(float));
      }
    }
    int const per_row = (kMode == Mode::kWrite) ? 2 * N : N;  // kReduce needs no C
    for (int i = tid; i < nt * per_row; i += kThreads) {
      int const k = i / per_row, j = i - k * per_row;
      std::int64_t const row = row0 + t + k;
      float const* src = j < N ? a.B + row * a.ld_B + j : a.C + row * a.ld_C + (j - N);
      int const col = j < N ? j : kN + (j - N);
      __pipeline_memcpy_async(&st.bc[k][col], src, sizeof(float));
    }
    __pipeline_commit();
  };

  // kExact path, one tile. kGuarded: a partial tile (steps >= nt skipped).
  auto tile_exact = [&](Stage<kN> const& st, int t, auto guarded) {
    constexpr bool kGuarded = decltype(guarded)::value;
    int const nt = min(kTileT, t1 - t);
    float dtv[kTileT], uv[kTileT];
#pragma unroll
    for (int k = 0; k < kTileT; ++k) {
      if (!kGuarded || k < nt) {
        float dt = st.dt[k][tid] + bias;
        if (a.delta_softplus) dt = softplus_dev(dt);
        dtv[k] = dt;
        uv[k] = st.u[k][tid];
      }
    }
    float yv[kTileT];
#pragma unroll
    for (int k = 0; k < kTileT; ++k) {
      if (!kGuarded || k < nt) {
        float const du = dtv[k] * uv[k];
        float y0 = 0.f, y1 = 0.f;
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          h[n] = fmaf(ex2_approx(dtv[k] * A2[n]), h[n], du * st.bc[k][n]);
          if constexpr (kMode == Mode::kWrite) {
            if (n & 1) y1 = fmaf(h[n], st.bc[k][kN + n], y1);
            else y0 = fmaf(h[n], st.bc[k][kN + n], y0);
          }
        }
        yv[k] = y0 + y1;
        if constexpr (kMode == Mode::kReduce) dsum += dtv[k];
      }
    }
    if constexpr (kMode == Mode::kWrite) {
#pragma unroll
      for (int k = 0; k < kTileT; ++k) {
        if (!kGuarded || k < nt) {
          float y = fmaf(Dd, uv[k], yv[k]);
          if (has_z) {
            float const zz = st.z[k][tid];
            y = __fdividef(y * zz, 1.f + __expf(-zz));
          }
          a.out[(row0 + t + k) * a.ld_out + d] = y;
        }
      }
    }
  };

  // General d_state (<= kN, guarded), one tile: the plain step loop.
  auto tile_general = [&](Stage<kN> const& st, int t, int nt) {
#pragma unroll 2
    for (int k = 0; k < nt; ++k) {
      float dt = st.dt[k][tid] + bias;
      if (a.delta_softplus) dt = softplus_dev(dt);
      float const u = st.u[k][tid];
      float const du = dt * u;
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        if (n < N) {
          h[n] = fmaf(ex2_approx(dt * A2[n]), h[n], du * st.bc[k][n]);
          if constexpr (kMode == Mode::kWrite) {
            if (n & 1) y1 = fmaf(h[n], st.bc[k][kN + n], y1);
            else y0 = fmaf(h[n], st.bc[k][kN + n], y0);
          }
        }
      }
      if constexpr (kMode == Mode::kWrite) {
        float y = y0 + y1 + Dd * u;
        if (has_z) {
          float const zz = st.z[k][tid];
          y = __fdividef(y * zz, 1.f + __expf(-zz));
        }
        a.out[(row0 + t + k) * a.ld_out + d] = y;
      } else {
        dsum += dt;
      }
    }
  };

  int s = 0;
  if (t0 < t1) issue(0, t0);
  for (int t = t0; t < t1; t += kTileT) {
    if (t + kTileT < t1) {
      issue(s ^ 1, t + kTileT);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    Stage<kN> const& st = stages[s];
    int const nt = min(kTileT, t1 - t);
    if (active) {
      if constexpr (kExact) {
        // Registers across the whole tile (compile-time indices): first every step's delta
        // (independent of h), then the recurrence, then the outputs, so that the loads and
        // the exponentials of different steps overlap.
        if (nt == kTileT)
          tile_exact(st, t, std::integral_constant<bool, false>{});
        else
          tile_exact(st, t, std::integral_constant<bool, true>{});
      } else {
        tile_general(st, t, nt);
      }
    }
    __syncthreads();  // stage s is refilled by the next iteration's issue()
    s ^= 1;
  }

  if (!active) return;
  if constexpr (kMode == Mode::kReduce) {
    float* dst = p.h_out.p + b * p.h_out.sb + c * p.h_out.sc + d * p.h_out.sd;
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) dst[n * p.h_out.sn] = h[n];
    p.dsum[(static_cast<std::int64_t>(b) * p.n_chunks + c) * a.d_inner + d] = dsum;
  } else {
    if (p.h_out.p && c == p.n_chunks - 1) {
      float* dst = p.h_out.p + b * p.h_out.sb + d * p.h_out.sd;
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) dst[n * p.h_out.sn] = h[n];
    }
  }
}

/// Phase 2 of Chunked: a thread per (batch, channel). On entry slot c (c < n_chunks-1) holds
/// chunk c's end state from zero; on exit every slot c holds chunk c's carried-in state.
template <int kN>
MAMBABYTE_KERNEL void __launch_bounds__(kThreads) carry_chunks(ScanParams const p) {
  auto const& a = p.a;
  int const N = a.d_state;
  int const d = blockIdx.x * kThreads + threadIdx.x;
  int const b = blockIdx.z;
  if (d >= a.d_inner) return;
  constexpr float kLog2e = 1.4426950408889634f;
  float A2[kN], carry[kN];
  StateView const& ws = p.h_out;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A2[n] = n < N ? a.A[static_cast<std::int64_t>(d) * N + n] * kLog2e : 0.f;
    carry[n] = (n < N && a.initial_state)
                   ? a.initial_state[(static_cast<std::int64_t>(b) * a.d_inner + d) * N + n]
                   : 0.f;
  }
  for (int c = 0; c < p.n_chunks; ++c) {
    float* slot = ws.p + b * ws.sb + c * ws.sc + d * ws.sd;
    if (c + 1 < p.n_chunks) {
      float const ds = p.dsum[(static_cast<std::int64_t>(b) * p.n_chunks + c) * a.d_inner + d];
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        if (n < N) {
          float const local = slot[n * ws.sn];
          slot[n * ws.sn] = carry[n];
          carry[n] = fmaf(ex2_approx(ds * A2[n]), carry[n], local);
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) slot[n * ws.sn] = carry[n];
    }
  }
}

}  // namespace kernel

/// Workspace of a chunked run: per (batch, chunk, state, channel) one state, then per
/// (batch, chunk, channel) one delta sum.
inline std::size_t chunked_workspace_bytes(int batch, int length, int d_inner, int d_state,
                                           int chunk_len) {
  if (batch <= 0 || length <= 0) return 0;
  std::size_t const chunks = (static_cast<std::size_t>(length) + chunk_len - 1) / chunk_len;
  if (chunks <= 1) return 0;
  return static_cast<std::size_t>(batch) * chunks * d_inner * (d_state + 1) * sizeof(float);
}

template <int kN, bool kExact, Mode kMode>
void launch_scan(ScanParams const& p, dim3 grid, cudaStream_t stream) {
  constexpr std::size_t smem = 2 * sizeof(Stage<kN>);
  static_assert(smem <= 227 * 1024, "stage too large");
  auto* fn = &kernel::scan_chunk<kN, kExact, kMode>;
  if constexpr (smem > 48 * 1024)
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
  fn<<<grid, kThreads, smem, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

template <int kN, bool kExact>
void run_impl(ssm::SelectiveScanArguments<float> const& a, int chunk_len, void* ws,
              cudaStream_t stream) {
  int const blocks_d = (a.d_inner + kThreads - 1) / kThreads;
  int const n_chunks = (a.length + chunk_len - 1) / chunk_len;
  ScanParams p;
  p.a = a;
  std::int64_t const DN = static_cast<std::int64_t>(a.d_inner) * a.d_state;
  StateView init{const_cast<float*>(a.initial_state), DN, 0, a.d_state, 1};
  StateView fin{a.final_state, DN, 0, a.d_state, 1};
  if (n_chunks <= 1) {
    p.chunk_len = a.length;
    p.n_chunks = 1;
    p.h_in = init;
    p.h_out = fin;
    launch_scan<kN, kExact, Mode::kWrite>(p, dim3(blocks_d, 1, a.batch), stream);
    return;
  }
  require(ws != nullptr, "selective scan (CUDA, chunked): null workspace");
  p.chunk_len = chunk_len;
  p.n_chunks = n_chunks;
  // Workspace states, channel-innermost so that a warp's accesses are coalesced.
  StateView slots{static_cast<float*>(ws), n_chunks * DN, DN, 1, a.d_inner};
  p.dsum = static_cast<float*>(ws) + static_cast<std::size_t>(a.batch) * n_chunks * DN;
  p.h_out = slots;
  launch_scan<kN, kExact, Mode::kReduce>(p, dim3(blocks_d, n_chunks - 1, a.batch), stream);
  kernel::carry_chunks<kN><<<dim3(blocks_d, 1, a.batch), kThreads, 0, stream>>>(p);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  p.h_in = slots;
  p.h_out = fin;
  launch_scan<kN, kExact, Mode::kWrite>(p, dim3(blocks_d, n_chunks, a.batch), stream);
}

inline void run(ssm::SelectiveScanArguments<float> const& a, int chunk_len, void* ws,
                Cuda const& be) {
  ScopedDevice guard(be.device);
  if (a.d_state == 16)
    run_impl<16, true>(a, chunk_len, ws, be.stream);  // the model's d_state
  else
    run_impl<kMaxState, false>(a, chunk_len, ws, be.stream);
}

inline int sm_count(int device) {
  int n = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

}  // namespace mambabyte::backend::cuda::scan_detail

namespace mambabyte::ssm {

/// The rule behind scan::Auto on CUDA: time chunk length, or 0 for Sequential.
/// The sequential scan does the fewest exponentials (one per state per step); the chunked one
/// about 1.9x as many but batch x channel-blocks x chunks blocks instead of batch x
/// channel-blocks. Sequential when the channel blocks alone give every SM at least one block
/// (kThreads channels of one batch); otherwise enough chunks for about two blocks per SM,
/// chunks a multiple of 64 steps and at least 256 long. Measured in docs/cuda.md.
inline int resolve_auto_cuda(int batch, int length, int d_inner, int sms) {
  long const blocks = static_cast<long>(batch) *
                      ((d_inner + backend::cuda::scan_detail::kThreads - 1) /
                       backend::cuda::scan_detail::kThreads);
  if (blocks >= sms || length < 512) return 0;
  long const want_chunks = (2L * sms + blocks - 1) / blocks;
  long chunk = (length + want_chunks - 1) / want_chunks;
  chunk = std::max(256L, (chunk + 63) / 64 * 64);
  return chunk >= length ? 0 : static_cast<int>(chunk);
}

/// Common part of the CUDA specialisations (float only).
template <class Derived>
struct CudaSelectiveScanBase {
  using Arguments = SelectiveScanArguments<float>;
  static Status can_implement(Arguments const& a) {
    Status const st = validate(a);
    if (st != Status::kSuccess) return st;
    if (a.d_state > backend::cuda::scan_detail::kMaxState) return Status::kUnsupported;
    return Status::kSuccess;
  }
  static void check(Arguments const& a) {
    Status const st = can_implement(a);
    require(st == Status::kSuccess, "selective scan (CUDA): cannot run (", to_string(st),
            ") batch=", a.batch, " length=", a.length, " d_inner=", a.d_inner,
            " d_state=", a.d_state);
  }
  /// Run with an internally allocated workspace (cudaMalloc; synchronises the stream).
  static void run(Arguments const& a, backend::Cuda const& be) {
    std::size_t const bytes = Derived::workspace_bytes(a, be);
    backend::cuda::DeviceBuffer<std::byte> ws(bytes, be);
    Derived::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));  // before ws is freed
  }
};

template <>
struct SelectiveScan<backend::Cuda, float, scan::Sequential>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, float, scan::Sequential>> {
  using Base = CudaSelectiveScanBase<SelectiveScan>;
  using Base::run;
  static std::size_t workspace_bytes(Arguments const&, backend::Cuda const&) { return 0; }
  static void run(Arguments const& a, void*, backend::Cuda const& be) {
    check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cuda::scan_detail::run(a, a.length, nullptr, be);
  }
};

template <int ChunkLen>
struct SelectiveScan<backend::Cuda, float, scan::Chunked<ChunkLen>>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, float, scan::Chunked<ChunkLen>>> {
  using Base = CudaSelectiveScanBase<SelectiveScan>;
  using typename Base::Arguments;
  using Base::run;
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const&) {
    return backend::cuda::scan_detail::chunked_workspace_bytes(a.batch, a.length, a.d_inner,
                                                               a.d_state, ChunkLen);
  }
  static void run(Arguments const& a, void* ws, backend::Cuda const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cuda::scan_detail::run(a, ChunkLen, ws, be);
  }
};

/// scan::Auto: resolve_auto_cuda() picks Sequential or a chunk length on the host.
template <>
struct SelectiveScan<backend::Cuda, float, scan::Auto>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, float, scan::Auto>> {
  using Base = CudaSelectiveScanBase<SelectiveScan>;
  using Base::run;
  /// Chunk length Auto uses for these arguments (0: Sequential).
  static int choose(Arguments const& a, backend::Cuda const& be) {
    if (a.batch <= 0 || a.length <= 0) return 0;
    return resolve_auto_cuda(a.batch, a.length, a.d_inner,
                             backend::cuda::scan_detail::sm_count(be.device));
  }
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const& be) {
    int const chunk = choose(a, be);
    return chunk == 0 ? 0
                      : backend::cuda::scan_detail::chunked_workspace_bytes(
                            a.batch, a.length, a.d_inner, a.d_state, chunk);
  }
  static void run(Arguments const& a, void* ws, backend::Cuda const& be) {
    check(a);
    if (a.batch == 0 || a.length == 0) return;
    int const chunk = choose(a, be);
    backend::cuda::scan_detail::run(a, chunk == 0 ? a.length : chunk, ws, be);
  }
};

}  // namespace mambabyte::ssm
