/*! \file
 *  \brief CPU (Eigen + OpenMP) specialisations of the layer operators.
 *
 *  GEMMs: Eigen's blocked GEMM/GEMV on row-major maps. We split the work across threads
 *  ourselves (rows when there are many, output features otherwise) so that backend::Cpu::threads
 *  is honoured exactly and batch-1 decoding GEMVs, which Eigen never parallelises, use every
 *  thread; inside our parallel region Eigen runs single-threaded.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/backend/cpu/parallel.hpp"
#include "mambabyte/layers/layers.hpp"

namespace mambabyte::layers {

namespace cpu_detail {
template <class T> using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T> using CStrided = Eigen::Map<RowMat<T> const, 0, Eigen::OuterStride<>>;
template <class T> using Strided = Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>>;
template <class T> using CRowVec = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic> const>;
template <class T> using Arr1 = Eigen::Array<T, Eigen::Dynamic, 1>;
template <class T> using CMapA = Eigen::Map<Arr1<T> const>;
template <class T> using MapA = Eigen::Map<Arr1<T>>;

/// [begin, end) of part `i` of `n` equal parts of `total`, rounded to multiples of `align`.
inline void split_range(long total, int n, int i, long align, long& begin, long& end) {
  long const units = (total + align - 1) / align;
  begin = std::min(total, units * i / n * align);
  end = std::min(total, units * (i + 1) / n * align);
}
}  // namespace cpu_detail

template <class T>
struct Linear<backend::Cpu, T> {
  using Arguments = LinearArguments<T>;
  static constexpr int kGemvRows = 8;  ///< up to this many rows: blocked GEMVs, no packing (see run)
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "linear");
    if (a.rows == 0) return;
    int const threads = backend::cpu::thread_count(be);
    bool const split_rows = a.rows >= 64L * threads;
    long const total = split_rows ? a.rows : a.out_features;
    int const parts = static_cast<int>(std::min<long>(threads, std::max<long>(1, total / 8)));
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
#if defined(_OPENMP)
      int const i = omp_get_thread_num(), n = omp_get_num_threads();
#else
      int const i = 0, n = 1;
#endif
      long b, e;
      split_range(total, n, i, split_rows ? 1 : 16, b, e);
      if (e > b) {
        if (split_rows) {
          CStrided<T> X(a.x + b * a.ld_x, e - b, a.in_features, Eigen::OuterStride<>(a.ld_x));
          Eigen::Map<RowMat<T> const> W(a.weight, a.out_features, a.in_features);
          Strided<T> Y(a.y + b * a.ld_y, e - b, a.out_features, Eigen::OuterStride<>(a.ld_y));
          Y.noalias() = X * W.transpose();
          if (a.bias) Y.rowwise() += CRowVec<T>(a.bias, a.out_features);
        } else if (a.rows <= kGemvRows) {
          // Few rows (decoding): a GEMM repacks the weights on every call, and packing this
          // row-major matrix as Eigen's left-hand side costs more than streaming it (54 % of a
          // batch-8 decode step, perf). Instead: weights in blocks that stay in L2, one GEMV per
          // row over each block, so the weights come from memory once and the inputs from cache.
          // (A column-major Z = X * W^T that packs W as a streamed right-hand side was measured
          // too: better at 16 rows, worse at 8.)
          long const blk = std::max<long>(16, (long(1) << 17) / std::max(1, a.in_features));  // ~512 KiB of floats
          for (long j0 = b; j0 < e; j0 += blk) {
            long const nj = std::min(blk, e - j0);
            Eigen::Map<RowMat<T> const> W(a.weight + j0 * a.in_features, nj, a.in_features);
            for (int r = 0; r < a.rows; ++r) {
              Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1> const> x(a.x + r * a.ld_x, a.in_features);
              Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> y(a.y + r * a.ld_y + j0, nj);
              y.noalias() = W * x;
              if (a.bias) y += Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1> const>(a.bias + j0, nj);
            }
          }
        } else {
          CStrided<T> X(a.x, a.rows, a.in_features, Eigen::OuterStride<>(a.ld_x));
          Eigen::Map<RowMat<T> const> W(a.weight + b * a.in_features, e - b, a.in_features);
          Strided<T> Y(a.y + b, a.rows, e - b, Eigen::OuterStride<>(a.ld_y));
          Y.noalias() = X * W.transpose();
          if (a.bias) Y.rowwise() += CRowVec<T>(a.bias + b, e - b);
        }
      }
    }
  }
};

template <class T>
struct AddNorm<backend::Cpu, T> {
  using Arguments = AddNormArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "add+norm");
    int const D = a.dim;
    T const eps = static_cast<T>(a.eps);
#pragma omp parallel for schedule(static) num_threads(backend::cpu::thread_count(be)) if (a.rows > 16)
    for (int r = 0; r < a.rows; ++r) {
      MapA<T> res(a.residual + static_cast<std::int64_t>(r) * D, D);
      if (a.hidden) res += CMapA<T>(a.hidden + static_cast<std::int64_t>(r) * D, D);
      MapA<T> out(a.out + static_cast<std::int64_t>(r) * D, D);
      CMapA<T> w(a.weight, D);
      if (a.rms) {
        T const inv = T(1) / std::sqrt(res.square().mean() + eps);
        out = res * inv * w;
      } else {
        T const mean = res.mean();
        T const var = (res - mean).square().mean();
        T const inv = T(1) / std::sqrt(var + eps);
        if (a.bias) out = (res - mean) * inv * w + CMapA<T>(a.bias, D);
        else out = (res - mean) * inv * w;
      }
    }
  }
};

template <class T>
struct CausalConv1d<backend::Cpu, T> {
  using Arguments = CausalConv1dArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& be = {}) {
    using namespace cpu_detail;
    check(a, "causal conv1d");
    if (a.batch == 0 || a.length == 0) return;
    int const C = a.channels, K = a.width, L = a.length;
    // Taps transposed to (K, C) so that each tap is a contiguous channel vector.
    aligned_vector<T> wt(static_cast<std::size_t>(K) * C);
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < K; ++k) wt[static_cast<std::size_t>(k) * C + c] = a.weight[static_cast<std::size_t>(c) * K + k];
    int const cblock = 256;
    int const nblocks = (C + cblock - 1) / cblock;
    long const work = static_cast<long>(a.batch) * nblocks;
#pragma omp parallel for schedule(static) num_threads(backend::cpu::thread_count(be)) if (static_cast<long>(L) * C > 4096)
    for (long w = 0; w < work; ++w) {
      int const b = static_cast<int>(w / nblocks), c0 = static_cast<int>(w % nblocks) * cblock;
      int const nc = std::min(cblock, C - c0);
      T* st = a.state ? a.state + (static_cast<std::int64_t>(b) * (K - 1)) * C : nullptr;
      auto input = [&](int s) -> T const* {  // time s in [-(K-1), L): channel block c0
        if (s >= 0) return a.x + (static_cast<std::int64_t>(b) * L + s) * a.ld_x + c0;
        return st ? st + static_cast<std::int64_t>(K - 1 + s) * C + c0 : nullptr;
      };
      Arr1<T> acc(nc), e(nc);
      for (int t = 0; t < L; ++t) {
        if (a.bias) acc = CMapA<T>(a.bias + c0, nc); else acc.setZero();
        for (int k = 0; k < K; ++k) {
          T const* in = input(t - (K - 1) + k);
          if (in) acc += CMapA<T>(wt.data() + static_cast<std::size_t>(k) * C + c0, nc) * CMapA<T>(in, nc);
        }
        MapA<T> out(a.out + (static_cast<std::int64_t>(b) * L + t) * a.ld_out + c0, nc);
        if (a.silu) {
          e = -acc;
          e = e.exp();  // on a stored array: vectorised (see backend/cpu/selective_scan.hpp)
          out = acc / (T(1) + e);
        } else {
          out = acc;
        }
      }
      if (st && K > 1) {  // new state: the last K-1 inputs of [state ; x], oldest first
        aligned_vector<T> keep(static_cast<std::size_t>(K - 1) * nc);
        for (int j = 0; j < K - 1; ++j) {
          T const* in = input(L - (K - 1) + j);
          std::copy(in, in + nc, keep.begin() + static_cast<std::ptrdiff_t>(j) * nc);
        }
        for (int j = 0; j < K - 1; ++j)
          std::copy(keep.begin() + static_cast<std::ptrdiff_t>(j) * nc, keep.begin() + static_cast<std::ptrdiff_t>(j + 1) * nc,
                    st + static_cast<std::int64_t>(j) * C + c0);
      }
    }
  }
};

template <class T>
struct Embedding<backend::Cpu, T> {
  using Arguments = EmbeddingArguments<T>;
  static Status can_implement(Arguments const& a) { return validate(a); }
  static std::size_t workspace_bytes(Arguments const&, backend::Cpu const&) { return 0; }
  static void run(Arguments const& a, void* = nullptr, backend::Cpu const& = {}) {
    check(a, "embedding");
    for (int r = 0; r < a.rows; ++r)
      std::memcpy(a.out + static_cast<std::int64_t>(r) * a.dim,
                  a.table + static_cast<std::int64_t>(a.tokens[r]) * a.dim, sizeof(T) * a.dim);
  }
};

}  // namespace mambabyte::layers
