/*! \file
 *  \brief CPU (Eigen + OpenMP) specialisations of ssm::SelectiveScan for the three scan
 *         policies and scan::Auto.
 *
 *  All three work on channel tiles: kTile channels x d_state states, held as an Eigen array of
 *  shape (d_state, kTile) so that every per-step operation (the exp of delta*A, the update,
 *  the C contraction) is one vectorised expression over kTile*d_state lanes.
 *
 *  - Sequential: the recurrence in time order; threads take (batch, tile) pairs.
 *  - Chunked<L>: reduce-then-scan along time. Phase 1 scans every chunk but the last from a
 *    zero state (in parallel over batch x tile x chunk) and keeps its end state and the sum
 *    of its deltas (the chunk's decay is exp(A * sum delta)); phase 2 carries the prefix
 *    across chunks (one combine per chunk); phase 3 rescans every chunk from its carried-in
 *    state and writes the outputs (in parallel again). Twice the exps of Sequential, but
 *    parallel along time.
 *  - Associative: Blelloch's work-efficient scan over time on materialised (a, b) pairs:
 *    up-sweep, down-sweep (exclusive prefixes), then each step applies its prefix to the
 *    initial state and its own pair. Every tree level is split across threads.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/backend/cpu/parallel.hpp"
#include "mambabyte/ssm/scan_op.hpp"
#include "mambabyte/ssm/selective_scan.hpp"

namespace mambabyte::backend::cpu::scan_detail {

inline constexpr int kTile = 16;  ///< channels per tile

template <class T> using Arr2 = Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic>;  // (N, channels)
template <class T> using Arr1 = Eigen::Array<T, Eigen::Dynamic, 1>;
template <class T> using CMap2 = Eigen::Map<Arr2<T> const>;
template <class T> using Map2 = Eigen::Map<Arr2<T>>;
template <class T> using CMap1 = Eigen::Map<Arr1<T> const>;
template <class T> using Map1 = Eigen::Map<Arr1<T>>;

/// Per-thread scratch for one tile.
///
/// Transcendentals are always evaluated from a stored array (`x = x.exp()`), never inside a
/// larger expression: Eigen vectorises exp/log1p over a plain array operand, while nested in
/// an expression (a select, a product) they fell back to scalar calls, 4-6x slower.
template <class T>
struct TileScratch {
  Arr1<T> dlt, du, y, e;
  Arr2<T> dA;
  void resize(int n, int nd) {
    dlt.resize(nd); du.resize(nd); y.resize(nd); e.resize(nd);
    dA.resize(n, nd);
  }
};

/// delta_t for channels [d0, d0+nd) at row `row` (softplus(dt + bias)) into s.dlt; uses s.e.
template <class T>
inline void load_delta(ssm::SelectiveScanArguments<T> const& a, std::int64_t row, int d0, int nd,
                       TileScratch<T>& s) {
  s.dlt = CMap1<T>(a.delta + row * a.ld_delta + d0, nd);
  if (a.delta_bias) s.dlt += CMap1<T>(a.delta_bias + d0, nd);
  if (a.delta_softplus) {
    s.e = s.dlt.min(T(20));
    s.e = s.e.exp();
    s.e = s.e.log1p();
    s.dlt = (s.dlt > T(20)).select(s.dlt, s.e);
  }
}

/// Scan steps [t0, t1) of batch b for channels [d0, d0+nd) starting from state h (N x nd,
/// column j = channel d0+j), updating h in place. With kWriteOut, writes out rows; otherwise
/// accumulates sum(delta) per channel into dsum (when non-null).
template <bool kWriteOut, class T>
void scan_tile(ssm::SelectiveScanArguments<T> const& a, int b, int d0, int nd, int t0, int t1,
               Map2<T> h, TileScratch<T>& s, T* dsum) {
  int const N = a.d_state;
  CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
  for (int t = t0; t < t1; ++t) {
    std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
    load_delta(a, row, d0, nd, s);
    CMap1<T> u(a.u + row * a.ld_u + d0, nd);
    s.du = s.dlt * u;
    CMap1<T> Bt(a.B + row * a.ld_B, N);
    s.dA = A.rowwise() * s.dlt.transpose();
    s.dA = s.dA.exp();
    for (int j = 0; j < nd; ++j) h.col(j) = s.dA.col(j) * h.col(j) + Bt * s.du(j);
    if constexpr (kWriteOut) {
      CMap1<T> Ct(a.C + row * a.ld_C, N);
      for (int j = 0; j < nd; ++j) s.y(j) = (h.col(j) * Ct).sum();
      if (a.D) s.y += CMap1<T>(a.D + d0, nd) * u;
      Map1<T> out(a.out + row * a.ld_out + d0, nd);
      if (a.z) {
        CMap1<T> z(a.z + row * a.ld_z + d0, nd);
        s.e = -z;
        s.e = s.e.exp();
        out = s.y * z / (T(1) + s.e);
      } else {
        out = s.y;
      }
    } else {
      if (dsum) Map1<T>(dsum, nd) += s.dlt;
    }
  }
}

template <class T>
inline void load_initial(ssm::SelectiveScanArguments<T> const& a, int b, int d0, int nd, T* h) {
  std::size_t const n = static_cast<std::size_t>(nd) * a.d_state;
  if (a.initial_state) {
    std::memcpy(h, a.initial_state + (static_cast<std::int64_t>(b) * a.d_inner + d0) * a.d_state,
                n * sizeof(T));
  } else {
    std::fill(h, h + n, T(0));
  }
}

template <class T>
inline void store_final(ssm::SelectiveScanArguments<T> const& a, int b, int d0, int nd, T const* h) {
  if (!a.final_state) return;
  std::memcpy(a.final_state + (static_cast<std::int64_t>(b) * a.d_inner + d0) * a.d_state, h,
              static_cast<std::size_t>(nd) * a.d_state * sizeof(T));
}

inline int tile_count(int d_inner) { return (d_inner + kTile - 1) / kTile; }

template <class T>
void run_sequential(ssm::SelectiveScanArguments<T> const& a, int threads) {
  int const tiles = tile_count(a.d_inner);
  long const work = static_cast<long>(a.batch) * tiles;
#pragma omp parallel num_threads(threads)
  {
    TileScratch<T> s;
    aligned_vector<T> hbuf(static_cast<std::size_t>(kTile) * a.d_state);
#pragma omp for schedule(static)
    for (long w = 0; w < work; ++w) {
      int const b = static_cast<int>(w / tiles), d0 = static_cast<int>(w % tiles) * kTile;
      int const nd = std::min(kTile, a.d_inner - d0);
      s.resize(a.d_state, nd);
      load_initial(a, b, d0, nd, hbuf.data());
      Map2<T> h(hbuf.data(), a.d_state, nd);
      scan_tile<true>(a, b, d0, nd, 0, a.length, h, s, static_cast<T*>(nullptr));
      store_final(a, b, d0, nd, hbuf.data());
    }
  }
}

/// Workspace of the chunked scan: per (batch, channel tile, chunk) a slot of kTile end
/// states (d_state each) and kTile delta sums (the last tile's slot is only partly used).
template <class T>
std::size_t chunked_workspace_bytes(ssm::SelectiveScanArguments<T> const& a, int chunk_len) {
  std::size_t const chunks = (static_cast<std::size_t>(a.length) + chunk_len - 1) / chunk_len;
  std::size_t const tiles = static_cast<std::size_t>(tile_count(a.d_inner));
  return static_cast<std::size_t>(a.batch) * tiles * chunks * kTile * (a.d_state + 1) * sizeof(T);
}

template <class T>
void run_chunked(ssm::SelectiveScanArguments<T> const& a, int chunk_len, int threads, void* ws) {
  int const n_chunks = (a.length + chunk_len - 1) / chunk_len;
  if (n_chunks <= 1) return run_sequential(a, threads);
  int const tiles = tile_count(a.d_inner), N = a.d_state;
  // Workspace layout: states[b][tile][chunk][nd*N] then dsum[b][tile][chunk][nd], each tile
  // slot sized for kTile channels (the last tile may use fewer).
  std::size_t const slot_h = static_cast<std::size_t>(kTile) * N, slot_d = kTile;
  T* states = static_cast<T*>(ws);
  T* dsums = states + static_cast<std::size_t>(a.batch) * tiles * n_chunks * slot_h;
  auto h_at = [&](int b, int tile, int c) {
    return states + ((static_cast<std::size_t>(b) * tiles + tile) * n_chunks + c) * slot_h;
  };
  auto d_at = [&](int b, int tile, int c) {
    return dsums + ((static_cast<std::size_t>(b) * tiles + tile) * n_chunks + c) * slot_d;
  };
  long const work1 = static_cast<long>(a.batch) * tiles * (n_chunks - 1);
  long const work2 = static_cast<long>(a.batch) * tiles;
  long const work3 = static_cast<long>(a.batch) * tiles * n_chunks;
#pragma omp parallel num_threads(threads)
  {
    TileScratch<T> s;
    // Phase 1: chunk-local reductions from a zero state (all chunks but the last).
#pragma omp for schedule(static)
    for (long w = 0; w < work1; ++w) {
      int const c = static_cast<int>(w % (n_chunks - 1));
      int const tile = static_cast<int>((w / (n_chunks - 1)) % tiles);
      int const b = static_cast<int>(w / (static_cast<long>(n_chunks - 1) * tiles));
      int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
      s.resize(N, nd);
      T* hp = h_at(b, tile, c);
      T* dp = d_at(b, tile, c);
      std::fill(hp, hp + static_cast<std::size_t>(nd) * N, T(0));
      std::fill(dp, dp + nd, T(0));
      scan_tile<false>(a, b, d0, nd, c * chunk_len, (c + 1) * chunk_len, Map2<T>(hp, N, nd), s, dp);
    }
    // Phase 2: carry the prefix across chunks; slot c becomes chunk c's carried-in state.
#pragma omp for schedule(static)
    for (long w = 0; w < work2; ++w) {
      int const tile = static_cast<int>(w % tiles), b = static_cast<int>(w / tiles);
      int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
      Arr2<T> carry(N, nd), local(N, nd);
      load_initial(a, b, d0, nd, carry.data());
      CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
      for (int c = 0; c < n_chunks; ++c) {
        Map2<T> slot(h_at(b, tile, c), N, nd);
        if (c + 1 < n_chunks) {
          local = slot;
          slot = carry;
          CMap1<T> dsum(d_at(b, tile, c), nd);
          Arr2<T> decay = A.rowwise() * dsum.transpose();
          decay = decay.exp();
          carry = decay * carry + local;
        } else {
          slot = carry;
        }
      }
    }
    // Phase 3: rescan every chunk from its carried-in state, writing outputs.
#pragma omp for schedule(static)
    for (long w = 0; w < work3; ++w) {
      int const c = static_cast<int>(w % n_chunks);
      int const tile = static_cast<int>((w / n_chunks) % tiles);
      int const b = static_cast<int>(w / (static_cast<long>(n_chunks) * tiles));
      int const d0 = tile * kTile, nd = std::min(kTile, a.d_inner - d0);
      s.resize(N, nd);
      T* hp = h_at(b, tile, c);
      scan_tile<true>(a, b, d0, nd, c * chunk_len, std::min(a.length, (c + 1) * chunk_len),
                      Map2<T>(hp, N, nd), s, static_cast<T*>(nullptr));
      if (c == n_chunks - 1) store_final(a, b, d0, nd, hp);
    }
  }
}

inline int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

/// Channels per Blelloch tile: as many as fit a scratch budget of pairs for the whole length.
template <class T>
int associative_tile(ssm::SelectiveScanArguments<T> const& a) {
  std::size_t const budget = std::size_t(32) << 20;  // 32 MiB of (a, b) pairs
  std::size_t const per_channel = static_cast<std::size_t>(next_pow2(a.length)) * a.d_state * 2 * sizeof(T);
  return static_cast<int>(std::clamp<std::size_t>(budget / per_channel, 1, static_cast<std::size_t>(std::min(a.d_inner, 64))));
}

template <class T>
std::size_t associative_workspace_bytes(ssm::SelectiveScanArguments<T> const& a) {
  return static_cast<std::size_t>(next_pow2(a.length)) * associative_tile(a) * a.d_state * 2 * sizeof(T);
}

template <class T>
void run_associative(ssm::SelectiveScanArguments<T> const& a, int threads, void* ws) {
  int const N = a.d_state, P = next_pow2(a.length), L = a.length;
  int const nd_max = associative_tile(a);
  std::size_t const lanes_max = static_cast<std::size_t>(nd_max) * N;
  T* const pa = static_cast<T*>(ws);               // a parts: P x lanes
  T* const pb = pa + static_cast<std::size_t>(P) * lanes_max;  // b parts: P x lanes
  for (int b = 0; b < a.batch; ++b) {
    for (int d0 = 0; d0 < a.d_inner; d0 += nd_max) {
      int const nd = std::min(nd_max, a.d_inner - d0);
      std::size_t const lanes = static_cast<std::size_t>(nd) * N;
      auto A_at = [&](int t) { return Map2<T>(pa + t * lanes, N, nd); };
      auto B_at = [&](int t) { return Map2<T>(pb + t * lanes, N, nd); };
      CMap2<T> A(a.A + static_cast<std::int64_t>(d0) * N, N, nd);
      aligned_vector<T> h0(lanes);
      load_initial(a, b, d0, nd, h0.data());
#pragma omp parallel num_threads(threads)
      {
        TileScratch<T> s;
        s.resize(N, nd);
        Arr2<T> tmp_a(N, nd), tmp_b(N, nd);
        // Leaves: element t = (exp(delta_t A), delta_t u_t B_t); padding = identity.
#pragma omp for schedule(static)
        for (int t = 0; t < P; ++t) {
          if (t < L) {
            std::int64_t const row = static_cast<std::int64_t>(b) * L + t;
            load_delta(a, row, d0, nd, s);
            s.du = s.dlt * CMap1<T>(a.u + row * a.ld_u + d0, nd);
            s.dA = A.rowwise() * s.dlt.transpose();
            s.dA = s.dA.exp();  // in owned, aligned scratch: independent of the slot's alignment
            A_at(t) = s.dA;
            B_at(t) = (CMap1<T>(a.B + row * a.ld_B, N).matrix() * s.du.matrix().transpose()).array();
          } else {
            A_at(t).setOnes();
            B_at(t).setZero();
          }
        }
        // Up-sweep: node i (right end of a 2s block) becomes left block then right block.
        for (int st = 1; st < P; st <<= 1) {
#pragma omp for schedule(static)
          for (int i = 2 * st - 1; i < P; i += 2 * st) {
            int const j = i - st;
            B_at(i) = A_at(i) * B_at(j) + B_at(i);
            A_at(i) = A_at(i) * A_at(j);
          }
        }
        // Down-sweep to exclusive prefixes.
#pragma omp single
        {
          A_at(P - 1).setOnes();
          B_at(P - 1).setZero();
        }
        for (int st = P / 2; st >= 1; st >>= 1) {
#pragma omp for schedule(static)
          for (int i = 2 * st - 1; i < P; i += 2 * st) {
            int const j = i - st;
            tmp_a = A_at(j);  // left block's total
            tmp_b = B_at(j);
            A_at(j) = A_at(i);  // left child inherits the parent's prefix
            B_at(j) = B_at(i);
            B_at(i) = tmp_a * B_at(i) + tmp_b;  // prefix, then the left block
            A_at(i) = tmp_a * A_at(i);
          }
        }
        // Outputs: h_{t-1} = prefix_t(h0); h_t = a_t h_{t-1} + b_t (pair recomputed).
        CMap2<T> H0(h0.data(), N, nd);
#pragma omp for schedule(static)
        for (int t = 0; t < L; ++t) {
          Map2<T> h(pb + t * lanes, N, nd);
          h = A_at(t) * H0 + h;  // h_{t-1}, stored over the b part
          scan_tile<true>(a, b, d0, nd, t, t + 1, h, s, static_cast<T*>(nullptr));
        }
      }
      store_final(a, b, d0, nd, pb + static_cast<std::size_t>(L - 1) * lanes);
    }
  }
}

}  // namespace mambabyte::backend::cpu::scan_detail

namespace mambabyte::ssm {

/// Common part of the CPU specialisations: checks and the allocate-for-me overload.
template <class Derived, class T>
struct CpuSelectiveScanBase {
  using Arguments = SelectiveScanArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  /// Run with an internally allocated workspace.
  static void run(Arguments const& a, backend::Cpu const& be) {
    aligned_vector<std::byte> ws(Derived::workspace_bytes(a, be));
    Derived::run(a, ws.data(), be);
  }
  static void check(Arguments const& a) {
    Status const st = validate(a);
    require(st == Status::kSuccess, "selective scan: invalid arguments (", to_string(st),
            ") batch=", a.batch, " length=", a.length, " d_inner=", a.d_inner,
            " d_state=", a.d_state);
  }
};

template <class T>
struct SelectiveScan<backend::Cpu, T, scan::Sequential>
    : CpuSelectiveScanBase<SelectiveScan<backend::Cpu, T, scan::Sequential>, T> {
  using Base = CpuSelectiveScanBase<SelectiveScan, T>;
  using Base::run;
  static std::size_t workspace_bytes(SelectiveScanArguments<T> const&, backend::Cpu const&) { return 0; }
  static void run(SelectiveScanArguments<T> const& a, void*, backend::Cpu const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cpu::scan_detail::run_sequential(a, backend::cpu::thread_count(be));
  }
};

template <class T, int ChunkLen>
struct SelectiveScan<backend::Cpu, T, scan::Chunked<ChunkLen>>
    : CpuSelectiveScanBase<SelectiveScan<backend::Cpu, T, scan::Chunked<ChunkLen>>, T> {
  using Base = CpuSelectiveScanBase<SelectiveScan, T>;
  using Base::run;
  static std::size_t workspace_bytes(SelectiveScanArguments<T> const& a, backend::Cpu const&) {
    return backend::cpu::scan_detail::chunked_workspace_bytes(a, ChunkLen);
  }
  static void run(SelectiveScanArguments<T> const& a, void* ws, backend::Cpu const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cpu::scan_detail::run_chunked(a, ChunkLen, backend::cpu::thread_count(be), ws);
  }
};

template <class T>
struct SelectiveScan<backend::Cpu, T, scan::Associative>
    : CpuSelectiveScanBase<SelectiveScan<backend::Cpu, T, scan::Associative>, T> {
  using Base = CpuSelectiveScanBase<SelectiveScan, T>;
  using Base::run;
  static std::size_t workspace_bytes(SelectiveScanArguments<T> const& a, backend::Cpu const&) {
    if (a.batch == 0 || a.length == 0) return 0;
    return backend::cpu::scan_detail::associative_workspace_bytes(a);
  }
  static void run(SelectiveScanArguments<T> const& a, void* ws, backend::Cpu const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cpu::scan_detail::run_associative(a, backend::cpu::thread_count(be), ws);
  }
};

/// scan::Auto: resolve_auto_cpu() picks Sequential or Chunked<kAutoChunk> on the host.
template <class T>
struct SelectiveScan<backend::Cpu, T, scan::Auto>
    : CpuSelectiveScanBase<SelectiveScan<backend::Cpu, T, scan::Auto>, T> {
  using Base = CpuSelectiveScanBase<SelectiveScan, T>;
  using Base::run;
  static constexpr int kAutoChunk = 256;
  static CpuScanAlgo choose(SelectiveScanArguments<T> const& a, backend::Cpu const& be) {
    return resolve_auto_cpu(a.batch, a.length, a.d_inner, backend::cpu::thread_count(be),
                            backend::cpu::scan_detail::kTile);
  }
  static std::size_t workspace_bytes(SelectiveScanArguments<T> const& a, backend::Cpu const& be) {
    return choose(a, be) == CpuScanAlgo::kChunked
               ? backend::cpu::scan_detail::chunked_workspace_bytes(a, kAutoChunk)
               : 0;
  }
  static void run(SelectiveScanArguments<T> const& a, void* ws, backend::Cpu const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    int const threads = backend::cpu::thread_count(be);
    if (choose(a, be) == CpuScanAlgo::kChunked)
      backend::cpu::scan_detail::run_chunked(a, kAutoChunk, threads, ws);
    else
      backend::cpu::scan_detail::run_sequential(a, threads);
  }
};

}  // namespace mambabyte::ssm
