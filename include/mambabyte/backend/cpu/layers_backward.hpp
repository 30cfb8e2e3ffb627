/*! \file
 *  \brief CPU (Eigen + OpenMP) specialisations of the layer backward operators and of the
 *         cross-entropy loss (layers/backward.hpp).
 *
 *  As in the forward (backend/cpu/layers.hpp) we split the work across threads ourselves and
 *  let Eigen run its blocked GEMMs single-threaded inside each part, so backend::Cpu::threads is
 *  honoured exactly. Every reduction over rows (weight gradients, norm parameter gradients,
 *  the loss) runs in a fixed order for a given thread count: results are deterministic.
 *
 *  Linear:       dx by rows (or by input columns when rows are few) per thread; dweight by
 *                output rows or input columns, whichever is larger; dbias by output features.
 *                Three independent outputs, so one parallel region without barriers.
 *  AddNorm:      rows per thread; dweight / dbias as per-part partials (parts x dim) reduced in
 *                part order. Mean / rstd are recomputed from the saved norm input.
 *  Conv1d:       channel blocks per thread, batch and time inside; time runs backwards with a ring
 *                of the last K pre-activation gradients, so no (length x channels) scratch.
 *  Embedding:    column slices of the table per thread, rows in order (scatter-add without races).
 *  CrossEntropy: rows per thread; per-row losses summed in row order, in double.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/backend/cpu/layers.hpp"
#include "mambabyte/backend/cpu/parallel.hpp"
#include "mambabyte/layers/backward.hpp"

namespace mambabyte::layers {

namespace cpu_detail {
inline int omp_part() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int omp_parts() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}
}  // namespace cpu_detail

template <class T>
struct LinearBackward<backend::Cpu, T> {
  using Arguments = LinearBackwardArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "linear backward");
    if (a.rows == 0) return;
    int const I = a.in_features, O = a.out_features;
    long const R = a.rows;
    int const threads = backend::cpu::thread_count(be);
    long const work = R * I * static_cast<long>(O);
    int const parts = static_cast<int>(std::clamp<long>(work / 32768, 1, threads));
    bool const dx_rows = R >= 64L * parts;  // split dx by rows, else by input columns
    bool const dw_out = O >= I;             // split dweight by output rows, else by input columns
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
      int const p = omp_part(), n = omp_parts();
      long b, e;
      if (a.dx) {
        if (dx_rows) {
          split_range(R, n, p, 1, b, e);
          if (e > b) {
            CStrided<T> DY(a.dy + b * a.ld_dy, e - b, O, Eigen::OuterStride<>(a.ld_dy));
            Eigen::Map<RowMat<T> const> W(a.weight, O, I);
            Strided<T> DX(a.dx + b * a.ld_dx, e - b, I, Eigen::OuterStride<>(a.ld_dx));
            if (a.accumulate_dx) DX.noalias() += DY * W;
            else DX.noalias() = DY * W;
          }
        } else {
          split_range(I, n, p, 16, b, e);
          if (e > b) {
            CStrided<T> DY(a.dy, R, O, Eigen::OuterStride<>(a.ld_dy));
            CStrided<T> Wc(a.weight + b, O, e - b, Eigen::OuterStride<>(I));
            Strided<T> DX(a.dx + b, R, e - b, Eigen::OuterStride<>(a.ld_dx));
            if (a.accumulate_dx) DX.noalias() += DY * Wc;
            else DX.noalias() = DY * Wc;
          }
        }
      }
      if (a.dweight) {
        if (dw_out) {
          split_range(O, n, p, 1, b, e);
          if (e > b) {
            CStrided<T> DY(a.dy + b, R, e - b, Eigen::OuterStride<>(a.ld_dy));
            CStrided<T> X(a.x, R, I, Eigen::OuterStride<>(a.ld_x));
            Strided<T> DW(a.dweight + b * I, e - b, I, Eigen::OuterStride<>(I));
            DW.noalias() += DY.transpose() * X;
          }
        } else {
          split_range(I, n, p, 16, b, e);
          if (e > b) {
            CStrided<T> DY(a.dy, R, O, Eigen::OuterStride<>(a.ld_dy));
            CStrided<T> X(a.x + b, R, e - b, Eigen::OuterStride<>(a.ld_x));
            Strided<T> DW(a.dweight + b, O, e - b, Eigen::OuterStride<>(I));
            DW.noalias() += DY.transpose() * X;
          }
        }
      }
      if (a.dbias) {
        split_range(O, n, p, 16, b, e);
        if (e > b) {
          CStrided<T> DY(a.dy + b, R, e - b, Eigen::OuterStride<>(a.ld_dy));
          Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(a.dbias + b, e - b) += DY.colwise().sum();
        }
      }
    }
  }
};

template <class T>
struct AddNormBackward<backend::Cpu, T> {
  using Arguments = AddNormBackwardArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "add+norm backward");
    if (a.rows == 0) return;
    int const D = a.dim;
    T const eps = static_cast<T>(a.eps);
    int const parts = static_cast<int>(std::clamp<long>(static_cast<long>(a.rows) / 16, 1, backend::cpu::thread_count(be)));
    bool const want_p = a.dweight || a.dbias;
    aligned_vector<T> partial(want_p ? static_cast<std::size_t>(parts) * 2 * D : 0, T(0));
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
      int const p = omp_part(), n = omp_parts();
      long b, e;
      split_range(a.rows, n, p, 1, b, e);
      Arr1<T> xh(D), g(D);
      T* const pw = want_p ? partial.data() + static_cast<std::size_t>(p) * 2 * D : nullptr;
      CMapA<T> w(a.weight, D);
      for (long r = b; r < e; ++r) {
        CMapA<T> x(a.residual + r * D, D), dout(a.dout + r * D, D);
        MapA<T> dr(a.dresidual + r * D, D);
        g = dout * w;
        if (a.rms) {
          T const rstd = T(1) / std::sqrt(x.square().mean() + eps);
          xh = x * rstd;
          dr += rstd * (g - xh * (g * xh).mean());
        } else {
          T const mean = x.mean();
          T const rstd = T(1) / std::sqrt((x - mean).square().mean() + eps);
          xh = (x - mean) * rstd;
          dr += rstd * (g - g.mean() - xh * (g * xh).mean());
        }
        if (a.dweight) MapA<T>(pw, D) += dout * xh;
        if (a.dbias) MapA<T>(pw + D, D) += dout;
      }
    }
    for (int p = 0; want_p && p < parts; ++p) {
      T const* pw = partial.data() + static_cast<std::size_t>(p) * 2 * D;
      if (a.dweight) MapA<T>(a.dweight, D) += CMapA<T>(pw, D);
      if (a.dbias) MapA<T>(a.dbias, D) += CMapA<T>(pw + D, D);
    }
  }
};

template <class T>
struct CausalConv1dBackward<backend::Cpu, T> {
  using Arguments = CausalConv1dBackwardArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "causal conv1d backward");
    if (a.batch == 0 || a.length == 0) return;
    int const C = a.channels, K = a.width, L = a.length;
    int const threads = backend::cpu::thread_count(be);
    // Channel blocks: about one per thread, multiples of 16, at most 256 channels.
    int const cblock = std::clamp(((C + threads - 1) / threads + 15) & ~15, 16, 256);
    int const nblocks = (C + cblock - 1) / cblock;
    int const team = std::max(1, std::min(threads, nblocks));
    // Taps transposed to (K, C): each tap a contiguous channel vector.
    aligned_vector<T> wt(static_cast<std::size_t>(K) * C);
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < K; ++k) wt[static_cast<std::size_t>(k) * C + c] = a.weight[static_cast<std::size_t>(c) * K + k];
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && static_cast<long>(L) * C * a.batch > 4096)
    for (int blk = 0; blk < nblocks; ++blk) {
      int const c0 = blk * cblock, nc = std::min(cblock, C - c0);
      Arr1<T> pre(nc), sig(nc), db(nc), acc(nc);
      Arr1<T> ring(static_cast<Eigen::Index>(K) * nc);  // dpre of the last K times, slot = time mod K
      Arr1<T> dw(static_cast<Eigen::Index>(K) * nc);    // (K, nc) tap-major
      db.setZero();
      dw.setZero();
      auto tap = [&](int k) { return CMapA<T>(wt.data() + static_cast<std::size_t>(k) * C + c0, nc); };
      auto slot = [&](int t) { return MapA<T>(ring.data() + static_cast<std::ptrdiff_t>(((t % K) + K) % K) * nc, nc); };
      for (int b = 0; b < a.batch; ++b) {
        T const* st = a.state ? a.state + static_cast<std::int64_t>(b) * (K - 1) * C : nullptr;
        auto input = [&](int s) -> T const* {  // forward input at time s in [-(K-1), L), or null (zero)
          if (s >= 0) return a.x + (static_cast<std::int64_t>(b) * L + s) * a.ld_x + c0;
          return st ? st + static_cast<std::int64_t>(K - 1 + s) * C + c0 : nullptr;
        };
        // Times s = L-1 down to -(K-1): first dpre[s] (s >= 0), then d(input s) =
        // sum_k w_k dpre[s+K-1-k] over the outputs that read input s.
        for (int s = L - 1; s >= -(K - 1); --s) {
          if (s >= 0) {
            if (a.bias) pre = CMapA<T>(a.bias + c0, nc); else pre.setZero();
            for (int k = 0; k < K; ++k)
              if (T const* in = input(s - (K - 1) + k)) pre += tap(k) * CMapA<T>(in, nc);
            CMapA<T> dout(a.dout + (static_cast<std::int64_t>(b) * L + s) * a.ld_dout + c0, nc);
            MapA<T> dp = slot(s);
            if (a.silu) {
              sig = -pre;
              sig = sig.exp();  // on a stored array: vectorised
              sig = T(1) / (T(1) + sig);
              dp = dout * sig * (T(1) + pre * (T(1) - sig));
            } else {
              dp = dout;
            }
            db += dp;
            for (int k = 0; k < K; ++k)
              if (T const* in = input(s - (K - 1) + k))
                MapA<T>(dw.data() + static_cast<std::ptrdiff_t>(k) * nc, nc) += dp * CMapA<T>(in, nc);
          }
          acc.setZero();
          for (int k = 0; k < K; ++k) {
            int const t = s + (K - 1) - k;  // output time that multiplies input s by tap k
            if (t >= 0 && t < L) acc += tap(k) * slot(t);
          }
          if (s >= 0) {
            if (a.dx) {
              MapA<T> dx(a.dx + (static_cast<std::int64_t>(b) * L + s) * a.ld_dx + c0, nc);
              if (a.accumulate_dx) dx += acc; else dx = acc;
            }
          } else if (a.dstate) {
            MapA<T>(a.dstate + static_cast<std::int64_t>(b) * (K - 1) * C + static_cast<std::int64_t>(K - 1 + s) * C + c0, nc) = acc;
          }
        }
      }
      if (a.dbias) MapA<T>(a.dbias + c0, nc) += db;
      if (a.dweight)
        for (int j = 0; j < nc; ++j)
          for (int k = 0; k < K; ++k)
            a.dweight[static_cast<std::size_t>(c0 + j) * K + k] += dw[static_cast<Eigen::Index>(k) * nc + j];
    }
  }
};

template <class T>
struct EmbeddingBackward<backend::Cpu, T> {
  using Arguments = EmbeddingBackwardArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "embedding backward");
    if (a.rows == 0) return;
    int const parts = static_cast<int>(std::clamp<long>(static_cast<long>(a.rows) * a.dim / 65536, 1,
                                                        std::min(backend::cpu::thread_count(be), (a.dim + 15) / 16)));
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
      long b, e;
      split_range(a.dim, omp_parts(), omp_part(), 16, b, e);
      if (e > b)
        for (int r = 0; r < a.rows; ++r)
          MapA<T>(a.dtable + static_cast<std::int64_t>(a.tokens[r]) * a.dim + b, e - b) +=
              CMapA<T>(a.dout + static_cast<std::int64_t>(r) * a.dim + b, e - b);
    }
  }
};

template <class T>
struct CrossEntropy<backend::Cpu, T> {
  using Arguments = CrossEntropyArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  /// Returns the mean loss (0 when no row is counted); writes dlogits when given.
  static double run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "cross entropy");
    if (a.rows == 0) return 0.0;
    long counted = 0;
    for (int r = 0; r < a.rows; ++r) counted += a.targets[r] >= 0;
    double const inv_n = counted > 0 ? 1.0 / static_cast<double>(counted) : 0.0;
    T const gscale = static_cast<T>(a.grad_scale * inv_n);
    int const Cn = a.classes;
    std::vector<double> nll(static_cast<std::size_t>(a.rows), 0.0);
    int const parts = static_cast<int>(std::clamp<long>(static_cast<long>(a.rows) * Cn / 16384, 1, backend::cpu::thread_count(be)));
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int r = 0; r < a.rows; ++r) {
      CMapA<T> x(a.logits + static_cast<std::int64_t>(r) * a.ld_logits, Cn);
      int const tgt = a.targets[r];
      T* drow = a.dlogits ? a.dlogits + static_cast<std::int64_t>(r) * a.ld_dlogits : nullptr;
      if (tgt < 0) {
        if (drow) std::fill(drow, drow + (a.zero_padding ? a.ld_dlogits : Cn), T(0));
        continue;
      }
      T const mx = x.maxCoeff();
      T const lse = mx + std::log((x - mx).exp().sum());
      T const xt = x[tgt];  // read before writing: dlogits may alias logits
      nll[static_cast<std::size_t>(r)] = static_cast<double>(lse) - static_cast<double>(xt);
      if (drow) {
        MapA<T> d(drow, Cn);
        d = (x - lse).exp() * gscale;  // coefficient-wise: reads x[i] before writing d[i]
        d[tgt] = std::exp(xt - lse) * gscale - gscale;
        if (a.zero_padding) std::fill(drow + Cn, drow + a.ld_dlogits, T(0));
      }
    }
    double total = 0;
    for (double v : nll) total += v;
    return total * inv_n;
  }
};

}  // namespace mambabyte::layers
