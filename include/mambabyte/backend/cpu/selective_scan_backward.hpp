/*! \file
 *  \brief CPU (Eigen + OpenMP) specialisations of ssm::SelectiveScanBackward for scan::Sequential,
 *         scan::Chunked<N>, scan::Associative and scan::Auto.
 *
 *  None of them stores the (batch, length, d_inner, d_state) states of the forward. They keep
 *  the state only at chunk boundaries (checkpoints, d_inner x d_state per sequence each) and
 *  recompute one chunk at a time into a chunk-sized per-thread buffer, then run the reverse-time
 *  adjoint recurrence over that chunk (see ssm/selective_scan_backward.hpp for the math):
 *      g_t = C_t dy_t + a_{t+1} g_{t+1}         (a_t = exp(delta_t A))
 *  Like the forward, everything works on channel tiles of kTile channels x d_state states, held as
 *  Eigen arrays of shape (d_state, channels).
 *
 *  - Sequential (checkpoint interval K = kSequentialCheckpoint = 64):
 *      1. forward sweep per (batch, tile) in parallel, storing the state entering every chunk;
 *      2. for each chunk, last to first: per (batch, tile) in parallel, recompute the chunk's
 *         states and decays from its checkpoint, then sweep it backwards carrying g; the dB / dC
 *         contributions of each tile (they are sums over channels) go to per-tile partials that a
 *         second parallel loop reduces, in tile order, into dB / dC rows of that chunk.
 *      Time is never split; parallelism is batch x tiles. 2 exps per state element per step.
 *  - Chunked<K> (checkpoint interval = chunk = K), time-parallel in both directions:
 *      1. per (batch, tile, chunk) in parallel: the chunk's local forward scan from a zero state
 *         (its end state and its sum of deltas, as in the chunked forward) and its local REVERSE
 *         scan from a zero carry: the adjoint recurrence is linear too, so the carry leaving chunk
 *         c backwards is r_c + exp(A * sum_c delta) * (carry entering it from chunk c+1), where
 *         r_c = a_s g_s computed with a zero carry. This needs no states: only dout, z, C, delta.
 *      2. per (batch, tile): carry the forward prefix (checkpoints) and the reverse suffix
 *         (adjoint carries) across chunks, one combine per chunk each way;
 *      3. per (batch, chunk) in parallel, looping over the tiles inside: recompute the chunk from
 *         its checkpoint and sweep it backwards from its adjoint carry. One thread owns the chunk's
 *         rows, so it accumulates dB / dC there directly (no partials);
 *      4. reduce the per-(batch, chunk) dA / dD / ddelta_bias partials in a fixed order.
 *      3 exps per state element per step (chunk-local forward, chunk-local reverse, recompute)
 *      against Sequential's 2, but every phase is parallel along time.
 *  - Associative: runs the Chunked<kAssociativeChunk = 64> algorithm. A Blelloch tree over the
 *    whole sequence would materialise an (a, b) pair per time step, state and channel, i.e. the
 *    O(batch x length x d_inner x d_state) memory the backward must not use; the chunked
 *    reduce-then-scan is the two-level, memory-bounded evaluation of the same associative
 *    operator, and it is as time-parallel as the tree for any length longer than a few chunks.
 *  - Auto: resolve_auto_cpu() (the forward's rule) picks Sequential or Chunked<kAutoChunk = 64>.
 *
 *  Workspace (workspace_bytes(args, backend), elements of T; BT = batch * ceil(d_inner/kTile),
 *  S = kTile * d_state, nc = ceil(length/K), P = threads of the backend):
 *      Sequential:  BT * S * (nc + 2) + BT * 2 * kTile + BT * K * 2 * d_state + P * chunk buffers
 *      Chunked:     BT * S * 2 * nc + BT * 2 * kTile * nc + P * chunk buffers
 *  with chunk buffers = S * (2K + 1) + kTile * K per thread (states and decays of one chunk).
 *  So roughly (2 * length / K) * batch * d_inner * d_state for the checkpoints plus O(threads * K *
 *  kTile * d_state): linear in length with a small constant, never length * d_state per channel
 *  per step. The workspace depends on the backend's thread count: pass the same backend to
 *  workspace_bytes() and run().
 *
 *  Results are deterministic for a given thread count; all reductions run in a fixed order.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/backend/cpu/parallel.hpp"
#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "mambabyte/ssm/selective_scan_backward.hpp"

namespace mambabyte::backend::cpu::scan_bwd_detail {

using scan_detail::kTile;
using scan_detail::tile_count;
template <class T> using Arr1 = scan_detail::Arr1<T>;
template <class T> using Arr2 = scan_detail::Arr2<T>;
template <class T> using Map1 = scan_detail::Map1<T>;
template <class T> using CMap1 = scan_detail::CMap1<T>;
template <class T> using Map2 = scan_detail::Map2<T>;
template <class T> using CMap2 = scan_detail::CMap2<T>;
template <class T> using VecMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>;

inline constexpr int kSequentialCheckpoint = 64;  ///< checkpoint interval of Sequential
inline constexpr int kAssociativeChunk = 64;      ///< chunk of the algorithm Associative runs
inline constexpr int kAutoChunk = 64;             ///< chunk when Auto picks the chunked algorithm

template <class T> using Args = ssm::SelectiveScanBackwardArguments<T>;

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Per-thread buffers for one chunk of one tile: states h_{s-1..e-1} (K+1 slots), decays a_s..a_{e-1}
/// (K slots), deltas (K x kTile), plus Eigen temporaries.
template <class T>
struct ChunkBuffers {
  T* hs = nullptr;  ///< slot i (i = 0..K): h_{s-1+i}, S = kTile*d_state elements per slot
  T* as = nullptr;  ///< slot i: a_{s+i}
  T* ds = nullptr;  ///< slot i: delta_{s+i} (kTile elements)
  std::size_t slot = 0;
  Arr1<T> v, dy, y, gB, du, dd, dltu, sig, zsil, e;  // e: scratch for transcendentals
  Arr2<T> g, w;

  static std::size_t elements(int K, int N) {
    std::size_t const S = static_cast<std::size_t>(kTile) * N;
    return S * (2 * static_cast<std::size_t>(K) + 1) + static_cast<std::size_t>(kTile) * K;
  }
  void bind(T* base, int K, int N) {
    slot = static_cast<std::size_t>(kTile) * N;
    hs = base;
    as = hs + slot * (static_cast<std::size_t>(K) + 1);
    ds = as + slot * static_cast<std::size_t>(K);
  }
  void resize(int N, int nd) {
    v.resize(nd); dy.resize(nd); y.resize(nd); gB.resize(nd); du.resize(nd); dd.resize(nd);
    dltu.resize(nd); sig.resize(nd); zsil.resize(nd); e.resize(nd);
    g.resize(N, nd); w.resize(N, nd);
  }
};

/// v = raw delta + bias (the softplus argument) for channels [d0, d0+nd) at `row`.
template <class T>
inline void load_v(Args<T> const& a, std::int64_t row, int d0, int nd, Arr1<T>& v) {
  v = CMap1<T>(a.delta + row * a.ld_delta + d0, nd);
  if (a.delta_bias) v += CMap1<T>(a.delta_bias + d0, nd);
}

/// softplus in place (v > 20: v). Like the forward (backend/cpu/selective_scan.hpp), every
/// exp / log1p is evaluated on a stored array so that Eigen vectorises it; `e` is scratch.
template <class T>
inline void softplus_inplace(Args<T> const& a, Arr1<T>& v, Arr1<T>& e) {
  if (!a.delta_softplus) return;
  e = v.min(T(20));
  e = e.exp();
  e = e.log1p();
  v = (v > T(20)).select(v, e);
}

/// dy = dout * silu(z) (or dout) at `row`; also sig = sigmoid(z) and zsil = silu(z) when z is given.
template <class T>
inline void load_dy(Args<T> const& a, std::int64_t row, int d0, int nd, ChunkBuffers<T>& s) {
  CMap1<T> dout(a.dout + row * a.ld_dout + d0, nd);
  if (a.z) {
    CMap1<T> z(a.z + row * a.ld_z + d0, nd);
    s.e = -z;
    s.e = s.e.exp();
    s.sig = T(1) / (T(1) + s.e);
    s.zsil = z * s.sig;
    s.dy = dout * s.zsil;
  } else {
    s.dy = dout;
  }
}

/// State slice (batch b, channels [d0, d0+nd)) of a (batch, d_inner, d_state) tensor.
template <class T>
inline std::int64_t state_offset(Args<T> const& a, int b, int d0) {
  return (static_cast<std::int64_t>(b) * a.d_inner + d0) * a.d_state;
}

/// Forward over [t0, t1) from the state in slot 0 of s.hs, storing every state, decay and delta.
template <class T>
void recompute_chunk(Args<T> const& a, int b, int d0, int nd, int t0, int t1, ChunkBuffers<T>& s) {
  int const N = a.d_state;
  CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
  for (int t = t0; t < t1; ++t) {
    std::size_t const i = static_cast<std::size_t>(t - t0);
    std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
    load_v(a, row, d0, nd, s.v);
    softplus_inplace(a, s.v, s.e);
    Map1<T>(s.ds + i * kTile, nd) = s.v;
    Map2<T> at(s.as + i * s.slot, N, nd);
    s.w = A.rowwise() * s.v.transpose();  // exp in an owned (always aligned) array, then
    s.w = s.w.exp();                      // stored: the result never depends on where the
    at = s.w;                             // workspace happens to be aligned
    s.dltu = s.v * CMap1<T>(a.u + row * a.ld_u + d0, nd);
    CMap1<T> Bt(a.B + row * a.ld_B, N);
    Map2<T>(s.hs + (i + 1) * s.slot, N, nd) =
        at * Map2<T>(s.hs + i * s.slot, N, nd) + (Bt.matrix() * s.dltu.matrix().transpose()).array();
  }
}

/// Where one tile's reverse sweep puts what it produces. dB / dC contributions are ADDED to the
/// rows at dB_rows / dC_rows (row i = time t0 + i); dA / dD / dbias partials are ADDED.
template <class T>
struct ReverseTargets {
  T* dB_rows; std::int64_t ld_dB;
  T* dC_rows; std::int64_t ld_dC;
  T* dA_part;   ///< (N, nd) column-major, accumulated
  T* dD_part;   ///< (nd) accumulated, or null
  T* db_part;   ///< (nd) accumulated, or null
};

/// Backward sweep over [t1-1 .. t0] of one tile, using the states / decays / deltas that
/// recompute_chunk stored. q (N x nd) holds the adjoint carry entering the chunk from its end
/// (a_{t1} g_{t1}, or dfinal_state) and leaves holding a_{t0} g_{t0}.
template <class T>
void reverse_chunk(Args<T> const& a, int b, int d0, int nd, int t0, int t1, ChunkBuffers<T>& s, Map2<T> q,
                   ReverseTargets<T> const& out) {
  int const N = a.d_state;
  CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
  Map2<T> dA(out.dA_part, N, nd);
  for (int t = t1 - 1; t >= t0; --t) {
    std::size_t const i = static_cast<std::size_t>(t - t0);
    std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
    CMap2<T> h(s.hs + (i + 1) * s.slot, N, nd), hp(s.hs + i * s.slot, N, nd), at(s.as + i * s.slot, N, nd);
    CMap1<T> dlt(s.ds + i * kTile, nd);
    CMap1<T> u(a.u + row * a.ld_u + d0, nd);
    CMap1<T> Bt(a.B + row * a.ld_B, N), Ct(a.C + row * a.ld_C, N);
    load_dy(a, row, d0, nd, s);
    if (a.z || a.out) {  // y_t (ungated), needed for dz and for the recomputed output
      s.y = (Ct.matrix().transpose() * h.matrix()).transpose().array();
      if (a.D) s.y += CMap1<T>(a.D + d0, nd) * u;
      if (a.out) {
        Map1<T> o(a.out + row * a.ld_out + d0, nd);
        if (a.z) o = s.y * s.zsil; else o = s.y;
      }
      if (a.z) {
        CMap1<T> dout(a.dout + row * a.ld_dout + d0, nd);
        CMap1<T> z(a.z + row * a.ld_z + d0, nd);
        Map1<T>(a.dz + row * a.ld_dz + d0, nd) = dout * s.y * s.sig * (T(1) + z * (T(1) - s.sig));
      }
    }
    // g_t = q + C_t dy_t^T
    s.g = q + (Ct.matrix() * s.dy.matrix().transpose()).array();
    VecMap<T>(out.dC_rows + static_cast<std::int64_t>(i) * out.ld_dC, N).noalias() += h.matrix() * s.dy.matrix();
    s.gB = (Bt.matrix().transpose() * s.g.matrix()).transpose().array();
    s.dltu = dlt * u;
    VecMap<T>(out.dB_rows + static_cast<std::int64_t>(i) * out.ld_dB, N).noalias() += s.g.matrix() * s.dltu.matrix();
    s.du = dlt * s.gB;
    if (a.D) s.du += CMap1<T>(a.D + d0, nd) * s.dy;
    Map1<T>(a.du + row * a.ld_du + d0, nd) = s.du;
    s.w = s.g * hp * at;
    s.dd = u * s.gB + (s.w * A).colwise().sum().transpose();
    dA += s.w.rowwise() * dlt.transpose();
    if (out.dD_part) Map1<T>(out.dD_part, nd) += s.dy * u;
    if (a.delta_softplus) {  // d softplus(v)/dv = sigmoid(v); the threshold branch has slope 1
      load_v(a, row, d0, nd, s.v);
      s.e = -s.v;
      s.e = s.e.exp();
      s.dd = (s.v > T(20)).select(s.dd, s.dd / (T(1) + s.e));
    }
    Map1<T>(a.ddelta + row * a.ld_ddelta + d0, nd) = s.dd;
    if (out.db_part) Map1<T>(out.db_part, nd) += s.dd;
    q = at * s.g;  // carry to t-1
  }
}

/// Chunk-local reverse reduction from a zero carry: q = a_{t0} g_{t0}; also dsum = sum of deltas
/// when dsum is not null.
template <class T>
void reverse_local(Args<T> const& a, int b, int d0, int nd, int t0, int t1, ChunkBuffers<T>& s, Map2<T> q,
                   T* dsum) {
  int const N = a.d_state;
  CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
  q.setZero();
  if (dsum) std::fill(dsum, dsum + nd, T(0));
  for (int t = t1 - 1; t >= t0; --t) {
    std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
    load_dy(a, row, d0, nd, s);
    load_v(a, row, d0, nd, s.v);
    softplus_inplace(a, s.v, s.e);
    if (dsum) Map1<T>(dsum, nd) += s.v;
    CMap1<T> Ct(a.C + row * a.ld_C, N);
    s.w = A.rowwise() * s.v.transpose();
    s.w = s.w.exp();
    q = s.w * (q + (Ct.matrix() * s.dy.matrix().transpose()).array());
  }
}

/// Chunk-local forward reduction from a zero state: h = end state, dsum = sum of deltas.
template <class T>
void forward_local(Args<T> const& a, int b, int d0, int nd, int t0, int t1, ChunkBuffers<T>& s, Map2<T> h,
                   T* dsum) {
  int const N = a.d_state;
  CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
  h.setZero();
  Map1<T> ds(dsum, nd);
  ds.setZero();
  for (int t = t0; t < t1; ++t) {
    std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
    load_v(a, row, d0, nd, s.v);
    softplus_inplace(a, s.v, s.e);
    ds += s.v;
    s.dltu = s.v * CMap1<T>(a.u + row * a.ld_u + d0, nd);
    CMap1<T> Bt(a.B + row * a.ld_B, N);
    s.w = A.rowwise() * s.v.transpose();
    s.w = s.w.exp();
    h = s.w * h + (Bt.matrix() * s.dltu.matrix().transpose()).array();
  }
}

template <class T>
inline void load_state_or_zero(T const* src, Args<T> const& a, int b, int d0, int nd, T* dst) {
  std::size_t const n = static_cast<std::size_t>(nd) * a.d_state;
  if (src) std::memcpy(dst, src + state_offset(a, b, d0), n * sizeof(T));
  else std::fill(dst, dst + n, T(0));
}

/// Length 0: the final state is the initial state, so dinitial_state = dfinal_state.
template <class T>
void run_empty(Args<T> const& a) {
  if (!a.dinitial_state || a.batch == 0) return;
  std::size_t const n = static_cast<std::size_t>(a.batch) * a.d_inner * a.d_state;
  if (a.dfinal_state) std::memcpy(a.dinitial_state, a.dfinal_state, n * sizeof(T));
  else std::fill(a.dinitial_state, a.dinitial_state + n, T(0));
}

// ---------------------------------------------------------------------------------------------
// Sequential: per-(batch, tile) sweeps with checkpoints every K steps.

template <class T>
std::size_t sequential_workspace_elems(Args<T> const& a, int K, int threads) {
  std::size_t const BT = static_cast<std::size_t>(a.batch) * tile_count(a.d_inner);
  std::size_t const S = static_cast<std::size_t>(kTile) * a.d_state;
  std::size_t const nc = (static_cast<std::size_t>(a.length) + K - 1) / K;
  return BT * S * (nc + 2) + BT * 2 * kTile + BT * static_cast<std::size_t>(K) * 2 * a.d_state +
         static_cast<std::size_t>(threads) * ChunkBuffers<T>::elements(K, a.d_state);
}

template <class T>
void run_sequential(Args<T> const& a, int K, int threads, void* ws) {
  int const N = a.d_state, L = a.length, tiles = tile_count(a.d_inner);
  int const nc = (L + K - 1) / K;
  long const BT = static_cast<long>(a.batch) * tiles;
  std::size_t const S = static_cast<std::size_t>(kTile) * N;
  T* const ck = static_cast<T*>(ws);                                   // [BT][nc][S]
  T* const carry = ck + static_cast<std::size_t>(BT) * nc * S;         // [BT][S]
  T* const dApart = carry + static_cast<std::size_t>(BT) * S;          // [BT][S]
  T* const vpart = dApart + static_cast<std::size_t>(BT) * S;          // [BT][2*kTile]: dD, dbias
  T* const bcpart = vpart + static_cast<std::size_t>(BT) * 2 * kTile;  // [BT][K][2N]
  T* const tbuf = bcpart + static_cast<std::size_t>(BT) * K * 2 * N;   // [threads][chunk buffers]
  ssm::SelectiveScanArguments<T> const fwd = a.forward(nullptr, 0);
#pragma omp parallel num_threads(threads)
  {
    ChunkBuffers<T> s;
    s.bind(tbuf + static_cast<std::size_t>(thread_id()) * ChunkBuffers<T>::elements(K, N), K, N);
    scan_detail::TileScratch<T> fs;
    // 1. forward sweep, storing the state entering each chunk; zero the partials, seed the carry.
#pragma omp for schedule(static)
    for (long w = 0; w < BT; ++w) {
      int const b = static_cast<int>(w / tiles), tile = static_cast<int>(w % tiles);
      int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
      fs.resize(N, nd);
      T* const slots = ck + static_cast<std::size_t>(w) * nc * S;
      load_state_or_zero(a.initial_state, a, b, d0, nd, slots);
      for (int c = 0; c + 1 < nc; ++c) {
        T* next = slots + static_cast<std::size_t>(c + 1) * S;
        std::memcpy(next, slots + static_cast<std::size_t>(c) * S, static_cast<std::size_t>(nd) * N * sizeof(T));
        scan_detail::scan_tile<false>(fwd, b, d0, nd, c * K, (c + 1) * K, Map2<T>(next, N, nd), fs,
                                      static_cast<T*>(nullptr));
      }
      load_state_or_zero(a.dfinal_state, a, b, d0, nd, carry + static_cast<std::size_t>(w) * S);
      std::fill(dApart + static_cast<std::size_t>(w) * S, dApart + static_cast<std::size_t>(w + 1) * S, T(0));
      std::fill(vpart + static_cast<std::size_t>(w) * 2 * kTile, vpart + static_cast<std::size_t>(w + 1) * 2 * kTile, T(0));
    }
    // 2. chunks in reverse: recompute + backward sweep per (batch, tile), then reduce dB / dC.
    for (int c = nc - 1; c >= 0; --c) {
      int const t0 = c * K, t1 = std::min(L, t0 + K), len = t1 - t0;
#pragma omp for schedule(static)
      for (long w = 0; w < BT; ++w) {
        int const b = static_cast<int>(w / tiles), tile = static_cast<int>(w % tiles);
        int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
        s.resize(N, nd);
        std::memcpy(s.hs, ck + (static_cast<std::size_t>(w) * nc + c) * S, static_cast<std::size_t>(nd) * N * sizeof(T));
        recompute_chunk(a, b, d0, nd, t0, t1, s);
        T* const part = bcpart + static_cast<std::size_t>(w) * K * 2 * N;
        std::fill(part, part + static_cast<std::size_t>(len) * 2 * N, T(0));
        T* const vp = vpart + static_cast<std::size_t>(w) * 2 * kTile;
        ReverseTargets<T> tg{part, 2 * N, part + N, 2 * N, dApart + static_cast<std::size_t>(w) * S,
                             a.dD ? vp : nullptr, a.ddelta_bias ? vp + kTile : nullptr};
        Map2<T> q(carry + static_cast<std::size_t>(w) * S, N, nd);
        reverse_chunk(a, b, d0, nd, t0, t1, s, q, tg);
        if (c == 0 && a.dinitial_state)
          std::memcpy(a.dinitial_state + state_offset(a, b, d0), q.data(), static_cast<std::size_t>(nd) * N * sizeof(T));
      }
      long const rows = static_cast<long>(a.batch) * len;
#pragma omp for schedule(static)
      for (long r = 0; r < rows; ++r) {
        int const b = static_cast<int>(r / len), i = static_cast<int>(r % len);
        std::int64_t const row = static_cast<std::int64_t>(b) * L + t0 + i;
        VecMap<T> dB(a.dB + row * a.ld_dB, N), dC(a.dC + row * a.ld_dC, N);
        dB.setZero();
        dC.setZero();
        for (int tile = 0; tile < tiles; ++tile) {
          T const* p = bcpart + ((static_cast<std::size_t>(b) * tiles + tile) * K + i) * 2 * N;
          dB += Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1> const>(p, N);
          dC += Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1> const>(p + N, N);
        }
      }
    }
    // 3. parameter gradients: sum the per-(batch, tile) partials over batch, in order.
#pragma omp for schedule(static)
    for (int tile = 0; tile < tiles; ++tile) {
      int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
      Map2<T> dA(a.dA + static_cast<std::int64_t>(d0) * N, N, nd);
      for (int b = 0; b < a.batch; ++b) {
        std::size_t const w = static_cast<std::size_t>(b) * tiles + tile;
        dA += Map2<T>(dApart + w * S, N, nd);
        if (a.dD) Map1<T>(a.dD + d0, nd) += Map1<T>(vpart + w * 2 * kTile, nd);
        if (a.ddelta_bias) Map1<T>(a.ddelta_bias + d0, nd) += Map1<T>(vpart + w * 2 * kTile + kTile, nd);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Chunked: reduce-then-scan along time in both directions.

template <class T>
std::size_t chunked_workspace_elems(Args<T> const& a, int K, int threads) {
  std::size_t const nc = (static_cast<std::size_t>(a.length) + K - 1) / K;
  if (nc <= 1) return sequential_workspace_elems(a, K, threads);
  std::size_t const BT = static_cast<std::size_t>(a.batch) * tile_count(a.d_inner);
  std::size_t const S = static_cast<std::size_t>(kTile) * a.d_state;
  return BT * nc * (2 * S + 2 * kTile) + static_cast<std::size_t>(threads) * ChunkBuffers<T>::elements(K, a.d_state);
}

template <class T>
void run_chunked(Args<T> const& a, int K, int threads, void* ws) {
  int const L = a.length;
  int const nc = (L + K - 1) / K;
  if (nc <= 1) return run_sequential(a, K, threads, ws);
  int const N = a.d_state, tiles = tile_count(a.d_inner);
  long const BT = static_cast<long>(a.batch) * tiles;
  std::size_t const S = static_cast<std::size_t>(kTile) * N, V = 2 * kTile;
  T* const H = static_cast<T*>(ws);                             // [BT][nc][S]: checkpoints, then dA partials
  T* const Q = H + static_cast<std::size_t>(BT) * nc * S;       // [BT][nc][S]: adjoint carries
  T* const Sv = Q + static_cast<std::size_t>(BT) * nc * S;      // [BT][nc][2 kTile]: dsum, then dD / dbias
  T* const tbuf = Sv + static_cast<std::size_t>(BT) * nc * V;   // [threads][chunk buffers]
  auto H_at = [&](long w, int c) { return H + (static_cast<std::size_t>(w) * nc + c) * S; };
  auto Q_at = [&](long w, int c) { return Q + (static_cast<std::size_t>(w) * nc + c) * S; };
  auto S_at = [&](long w, int c) { return Sv + (static_cast<std::size_t>(w) * nc + c) * V; };
  long const work1 = BT * nc, work3 = static_cast<long>(a.batch) * nc;
#pragma omp parallel num_threads(threads)
  {
    ChunkBuffers<T> s;
    s.bind(tbuf + static_cast<std::size_t>(thread_id()) * ChunkBuffers<T>::elements(K, N), K, N);
    // 1. chunk-local reductions: forward end state (all chunks but the last) and reverse carry
    //    (all chunks but the first), each with the chunk's delta sum.
#pragma omp for schedule(static)
    for (long w1 = 0; w1 < work1; ++w1) {
      long const w = w1 / nc;
      int const c = static_cast<int>(w1 % nc);
      int const b = static_cast<int>(w / tiles), d0 = static_cast<int>(w % tiles) * kTile;
      int const nd = std::min(kTile, a.d_inner - d0);
      int const t0 = c * K, t1 = std::min(L, t0 + K);
      s.resize(N, nd);
      if (c + 1 < nc) forward_local(a, b, d0, nd, t0, t1, s, Map2<T>(H_at(w, c), N, nd), S_at(w, c));
      if (c > 0)
        reverse_local(a, b, d0, nd, t0, t1, s, Map2<T>(Q_at(w, c), N, nd), c + 1 < nc ? nullptr : S_at(w, c));
    }
    // 2. carries across chunks: H[c] := state entering chunk c; Q[c] := adjoint carry entering
    //    chunk c from its end (dfinal_state for the last chunk).
#pragma omp for schedule(static)
    for (long w = 0; w < BT; ++w) {
      int const b = static_cast<int>(w / tiles), d0 = static_cast<int>(w % tiles) * kTile;
      int const nd = std::min(kTile, a.d_inner - d0);
      CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
      Arr2<T> run(N, nd), local(N, nd);
      load_state_or_zero(a.initial_state, a, b, d0, nd, run.data());
      for (int c = 0; c < nc; ++c) {
        Map2<T> slot(H_at(w, c), N, nd);
        if (c + 1 < nc) {
          local = slot;
          slot = run;
          run = (A.rowwise() * CMap1<T>(S_at(w, c), nd).transpose()).exp() * run + local;
        } else {
          slot = run;
        }
      }
      load_state_or_zero(a.dfinal_state, a, b, d0, nd, run.data());
      for (int c = nc - 1; c >= 0; --c) {
        Map2<T> slot(Q_at(w, c), N, nd);
        if (c > 0) {
          local = slot;
          slot = run;
          run = (A.rowwise() * CMap1<T>(S_at(w, c), nd).transpose()).exp() * run + local;
        } else {
          slot = run;
        }
      }
    }
    // 3. per (batch, chunk), all tiles: recompute, reverse sweep, gradients. The thread owns the
    //    chunk's dB / dC rows; dA partials overwrite the consumed checkpoint, dD / dbias the dsum.
#pragma omp for schedule(static)
    for (long w3 = 0; w3 < work3; ++w3) {
      int const b = static_cast<int>(w3 / nc), c = static_cast<int>(w3 % nc);
      int const t0 = c * K, t1 = std::min(L, t0 + K);
      for (int t = t0; t < t1; ++t) {
        std::int64_t const row = static_cast<std::int64_t>(b) * L + t;
        std::fill(a.dB + row * a.ld_dB, a.dB + row * a.ld_dB + N, T(0));
        std::fill(a.dC + row * a.ld_dC, a.dC + row * a.ld_dC + N, T(0));
      }
      for (int tile = 0; tile < tiles; ++tile) {
        long const w = static_cast<long>(b) * tiles + tile;
        int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
        s.resize(N, nd);
        std::memcpy(s.hs, H_at(w, c), static_cast<std::size_t>(nd) * N * sizeof(T));
        recompute_chunk(a, b, d0, nd, t0, t1, s);
        T* const dAp = H_at(w, c);
        std::fill(dAp, dAp + static_cast<std::size_t>(nd) * N, T(0));
        T* const vp = S_at(w, c);
        std::fill(vp, vp + V, T(0));
        std::int64_t const row0 = static_cast<std::int64_t>(b) * L + t0;
        ReverseTargets<T> tg{a.dB + row0 * a.ld_dB, a.ld_dB, a.dC + row0 * a.ld_dC, a.ld_dC, dAp,
                             a.dD ? vp : nullptr, a.ddelta_bias ? vp + kTile : nullptr};
        Map2<T> q(Q_at(w, c), N, nd);
        reverse_chunk(a, b, d0, nd, t0, t1, s, q, tg);
        if (c == 0 && a.dinitial_state)
          std::memcpy(a.dinitial_state + state_offset(a, b, d0), q.data(), static_cast<std::size_t>(nd) * N * sizeof(T));
      }
    }
    // 4. parameter gradients: partials summed over (batch, chunk) in order.
#pragma omp for schedule(static)
    for (int tile = 0; tile < tiles; ++tile) {
      int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
      Map2<T> dA(a.dA + static_cast<std::int64_t>(d0) * N, N, nd);
      for (int b = 0; b < a.batch; ++b)
        for (int c = 0; c < nc; ++c) {
          long const w = static_cast<long>(b) * tiles + tile;
          dA += Map2<T>(H_at(w, c), N, nd);
          if (a.dD) Map1<T>(a.dD + d0, nd) += Map1<T>(S_at(w, c), nd);
          if (a.ddelta_bias) Map1<T>(a.ddelta_bias + d0, nd) += Map1<T>(S_at(w, c) + kTile, nd);
        }
    }
  }
}

}  // namespace mambabyte::backend::cpu::scan_bwd_detail

namespace mambabyte::ssm {

/// Which algorithm and checkpoint interval a CPU backward runs.
struct CpuBackwardPlan {
  bool chunked;
  int interval;
};

/// Common part of the CPU specialisations: checks, the allocate-for-me overload and the
/// dispatch on a checkpoint interval chosen per call by Derived::plan().
template <class Derived, class T>
struct CpuSelectiveScanBackwardBase {
  using Arguments = SelectiveScanBackwardArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }

  /// Bytes of workspace run() needs for these arguments on this backend (same threads!).
  static std::size_t workspace_bytes(Arguments const& a, backend::Cpu const& be) {
    if (a.batch == 0 || a.length == 0) return 0;
    namespace d = backend::cpu::scan_bwd_detail;
    int const threads = backend::cpu::thread_count(be);
    auto const [chunked, K] = Derived::plan(a, be);
    return (chunked ? d::chunked_workspace_elems(a, K, threads) : d::sequential_workspace_elems(a, K, threads)) *
           sizeof(T);
  }

  static void check(Arguments const& a) {
    Status const st = validate(a);
    require(st == Status::kSuccess, "selective scan backward: invalid arguments (", to_string(st),
            ") batch=", a.batch, " length=", a.length, " d_inner=", a.d_inner, " d_state=", a.d_state);
  }

  static void run(Arguments const& a, void* ws, backend::Cpu const& be) {
    check(a);
    namespace d = backend::cpu::scan_bwd_detail;
    if (a.batch == 0) return;
    if (a.length == 0) return d::run_empty(a);
    require(ws != nullptr, "selective scan backward: a workspace of ", workspace_bytes(a, be), " bytes is required");
    int const threads = backend::cpu::thread_count(be);
    auto const [chunked, K] = Derived::plan(a, be);
    if (chunked) d::run_chunked(a, K, threads, ws);
    else d::run_sequential(a, K, threads, ws);
  }

  /// Run with an internally allocated workspace.
  static void run(Arguments const& a, backend::Cpu const& be) {
    check(a);  // before sizing a workspace from possibly nonsensical shapes
    aligned_vector<std::byte> ws(workspace_bytes(a, be));
    run(a, ws.empty() ? nullptr : ws.data(), be);
  }
};

template <class T>
struct SelectiveScanBackward<backend::Cpu, T, scan::Sequential>
    : CpuSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cpu, T, scan::Sequential>, T> {
  static CpuBackwardPlan plan(SelectiveScanBackwardArguments<T> const&, backend::Cpu const&) {
    return {false, backend::cpu::scan_bwd_detail::kSequentialCheckpoint};
  }
};

template <class T, int ChunkLen>
struct SelectiveScanBackward<backend::Cpu, T, scan::Chunked<ChunkLen>>
    : CpuSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cpu, T, scan::Chunked<ChunkLen>>, T> {
  static CpuBackwardPlan plan(SelectiveScanBackwardArguments<T> const&, backend::Cpu const&) {
    return {true, ChunkLen};
  }
};

/// Associative runs the chunked algorithm (see the file comment for why).
template <class T>
struct SelectiveScanBackward<backend::Cpu, T, scan::Associative>
    : CpuSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cpu, T, scan::Associative>, T> {
  static CpuBackwardPlan plan(SelectiveScanBackwardArguments<T> const&, backend::Cpu const&) {
    return {true, backend::cpu::scan_bwd_detail::kAssociativeChunk};
  }
};

/// Auto: the forward's host rule (resolve_auto_cpu) picks Sequential or Chunked<kAutoChunk>.
template <class T>
struct SelectiveScanBackward<backend::Cpu, T, scan::Auto>
    : CpuSelectiveScanBackwardBase<SelectiveScanBackward<backend::Cpu, T, scan::Auto>, T> {
  static CpuBackwardPlan plan(SelectiveScanBackwardArguments<T> const& a, backend::Cpu const& be) {
    namespace d = backend::cpu::scan_bwd_detail;
    bool const chunked = resolve_auto_cpu(a.batch, a.length, a.d_inner, backend::cpu::thread_count(be), d::kTile) ==
                         CpuScanAlgo::kChunked;
    return {chunked, chunked ? d::kAutoChunk : d::kSequentialCheckpoint};
  }
};

}  // namespace mambabyte::ssm
