// Backward passes of the layers and of the selective scan, in double against central finite
// differences of the forward operators (and the scan against the fp64 reference scan), on small
// odd shapes; every scan policy against Sequential; float against double; accumulate / overwrite
// conventions; workspace size; bad arguments.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include "mambabyte/backend/cpu/layers.hpp"
#include "mambabyte/backend/cpu/layers_backward.hpp"
#include "mambabyte/backend/cpu/selective_scan_backward.hpp"
#include "mambabyte/reference/reference.hpp"
#include "cpu_scan_runner.hpp"
#include "scan_cases.hpp"
#include "test_util.hpp"

using namespace mambabyte;

namespace {

constexpr double kH = 1e-6;        // central-difference step
constexpr double kFdTol = 1e-6;    // relative error (vector norm over the checked entries)

/// Central difference of f w.r.t. x[i] for the given indices (all when empty), returned in order.
std::vector<double> fd_grad(std::function<double()> const& f, std::vector<double>& x, std::vector<std::size_t> const& idx) {
  std::vector<double> g;
  g.reserve(idx.size());
  for (std::size_t i : idx) {
    double const keep = x[i];
    x[i] = keep + kH;
    double const fp = f();
    x[i] = keep - kH;
    double const fm = f();
    x[i] = keep;
    g.push_back((fp - fm) / (2 * kH));
  }
  return g;
}

std::vector<std::size_t> all_indices(std::size_t n) {
  std::vector<std::size_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

/// Indices of the "real" entries of a strided (rows, cols) buffer with leading dimension ld.
std::vector<std::size_t> strided_indices(std::size_t rows, std::size_t cols, std::size_t ld, std::size_t offset = 0) {
  std::vector<std::size_t> v;
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) v.push_back(offset + r * ld + c);
  return v;
}

std::vector<std::size_t> sample(std::vector<std::size_t> const& idx, std::size_t k, std::mt19937_64& rng) {
  if (idx.size() <= k) return idx;
  std::vector<std::size_t> v = idx;
  std::shuffle(v.begin(), v.end(), rng);
  v.resize(k);
  return v;
}

std::vector<double> gather(std::vector<double> const& g, std::vector<std::size_t> const& idx) {
  std::vector<double> v;
  for (auto i : idx) v.push_back(g[i]);
  return v;
}

double dot(std::vector<double> const& a, std::vector<double> const& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

double worst_fd = 0;  // largest FD relative error seen (reported at the end)

void check_fd(char const* what, std::vector<double> const& analytic, std::vector<double> const& numeric) {
  double const e = mbtest::rel_err(analytic, numeric);
  worst_fd = std::max(worst_fd, e);
  INFO(what << ": rel err " << e);
  CHECK(e < kFdTol);
}

}  // namespace

// =============================================================================================
// (a) layers

TEST_CASE("linear backward matches finite differences", "[backward][linear]") {
  std::mt19937_64 rng(1);
  struct S { int rows, in, out, ldx, ldy; bool bias; };
  for (S s : {S{7, 5, 3, 6, 4, true}, S{1, 1, 1, 1, 1, false}, S{4, 9, 13, 11, 13, true}}) {
    auto x = mbtest::random_vector<double>(static_cast<std::size_t>(s.rows) * s.ldx, rng);
    auto W = mbtest::random_vector<double>(static_cast<std::size_t>(s.out) * s.in, rng);
    auto bias = mbtest::random_vector<double>(s.out, rng);
    auto wy = mbtest::random_vector<double>(static_cast<std::size_t>(s.rows) * s.ldy, rng);
    std::vector<double> y(wy.size());
    auto f = [&] {
      layers::Linear<backend::Cpu, double>::run({s.rows, s.in, s.out, x.data(), s.ldx, W.data(), s.bias ? bias.data() : nullptr,
                                                 y.data(), s.ldy}, nullptr, backend::Cpu{1});
      double l = 0;
      for (int r = 0; r < s.rows; ++r)
        for (int o = 0; o < s.out; ++o) l += wy[r * s.ldy + o] * y[r * s.ldy + o];
      return l;
    };
    std::vector<double> dx(x.size(), 0.0), dW(W.size(), 0.5), db(bias.size(), -0.25);
    auto const dW0 = dW;
    auto const db0 = db;
    layers::LinearBackward<backend::Cpu, double>::run({s.rows, s.in, s.out, x.data(), s.ldx, W.data(), wy.data(), s.ldy,
                                                       dx.data(), s.ldx, false, dW.data(), s.bias ? db.data() : nullptr},
                                                      nullptr, backend::Cpu{2});
    for (std::size_t i = 0; i < dW.size(); ++i) dW[i] -= dW0[i];  // accumulated into a non-zero buffer
    for (std::size_t i = 0; i < db.size(); ++i) db[i] -= db0[i];
    auto ix = strided_indices(s.rows, s.in, s.ldx);
    check_fd("linear dx", gather(dx, ix), fd_grad(f, x, ix));
    check_fd("linear dW", dW, fd_grad(f, W, all_indices(W.size())));
    if (s.bias) check_fd("linear db", db, fd_grad(f, bias, all_indices(bias.size())));
    // padding columns of dx are untouched
    for (int r = 0; r < s.rows; ++r)
      for (int c = s.in; c < s.ldx; ++c) REQUIRE(dx[r * s.ldx + c] == 0.0);
  }
}

TEST_CASE("linear backward: every thread split equals a plain loop", "[backward][linear]") {
  std::mt19937_64 rng(2);
  struct S { int rows, in, out; };
  // many rows (dx by rows), few rows (dx by columns), out > in and out < in (dweight splits)
  for (S s : {S{300, 24, 70}, S{5, 40, 33}, S{260, 70, 9}, S{3, 17, 200}}) {
    for (bool acc : {false, true}) {
      auto x = mbtest::random_vector<double>(static_cast<std::size_t>(s.rows) * s.in, rng);
      auto W = mbtest::random_vector<double>(static_cast<std::size_t>(s.out) * s.in, rng);
      auto dy = mbtest::random_vector<double>(static_cast<std::size_t>(s.rows) * s.out, rng);
      auto dx = mbtest::random_vector<double>(x.size(), rng);
      std::vector<double> dW(W.size(), 0.0), db(s.out, 0.0);
      auto wdx = dx, wdW = dW, wdb = db;
      for (int r = 0; r < s.rows; ++r)
        for (int i = 0; i < s.in; ++i) {
          double v = 0;
          for (int o = 0; o < s.out; ++o) v += dy[r * s.out + o] * W[o * s.in + i];
          wdx[r * s.in + i] = acc ? wdx[r * s.in + i] + v : v;
        }
      for (int o = 0; o < s.out; ++o) {
        for (int i = 0; i < s.in; ++i)
          for (int r = 0; r < s.rows; ++r) wdW[o * s.in + i] += dy[r * s.out + o] * x[r * s.in + i];
        for (int r = 0; r < s.rows; ++r) wdb[o] += dy[r * s.out + o];
      }
      for (int threads : {1, 2, 3}) {
        auto gx = dx, gW = dW, gb = db;
        layers::LinearBackward<backend::Cpu, double>::run({s.rows, s.in, s.out, x.data(), s.in, W.data(), dy.data(), s.out,
                                                           gx.data(), s.in, acc, gW.data(), gb.data()},
                                                          nullptr, backend::Cpu{threads});
        INFO("rows " << s.rows << " in " << s.in << " out " << s.out << " threads " << threads);
        CHECK(mbtest::rel_err(gx, wdx) < 1e-13);
        CHECK(mbtest::rel_err(gW, wdW) < 1e-13);
        CHECK(mbtest::rel_err(gb, wdb) < 1e-13);
      }
    }
  }
}

TEST_CASE("add+norm backward matches finite differences (LayerNorm, RMSNorm)", "[backward][norm]") {
  std::mt19937_64 rng(3);
  struct S { int rows, dim; bool rms, bias, hidden; };
  for (S s : {S{5, 7, false, true, true}, S{3, 1, false, true, true}, S{4, 6, false, false, false}, S{6, 9, true, false, true},
              S{40, 5, true, false, true}, S{37, 12, false, true, true}}) {
    std::size_t const n = static_cast<std::size_t>(s.rows) * s.dim;
    auto res0 = mbtest::random_vector<double>(n, rng, -2, 2);
    auto hid = mbtest::random_vector<double>(n, rng);
    auto w = mbtest::random_vector<double>(s.dim, rng, 0.5, 1.5);
    auto b = mbtest::random_vector<double>(s.dim, rng);
    auto wo = mbtest::random_vector<double>(n, rng), wr = mbtest::random_vector<double>(n, rng);
    std::vector<double> res(n), out(n);
    // loss = <wo, Norm(res0 + hid)> + <wr, res0 + hid>  (the residual stream also flows onward)
    auto f = [&] {
      res = res0;
      layers::AddNorm<backend::Cpu, double>::run({s.rows, s.dim, res.data(), s.hidden ? hid.data() : nullptr, w.data(),
                                                  s.bias ? b.data() : nullptr, out.data(), 1e-5, s.rms}, nullptr, backend::Cpu{1});
      return dot(wo, out) + dot(wr, res);
    };
    f();  // res = the norm input
    std::vector<double> dres = wr, dw(s.dim, 0.0), db(s.dim, 0.0);
    layers::AddNormBackward<backend::Cpu, double>::run({s.rows, s.dim, res.data(), w.data(), wo.data(), dres.data(), dw.data(),
                                                        s.bias ? db.data() : nullptr, 1e-5, s.rms}, nullptr, backend::Cpu{2});
    INFO("rows " << s.rows << " dim " << s.dim << " rms " << s.rms);
    check_fd("norm dresidual", dres, fd_grad(f, res0, all_indices(n)));
    if (s.hidden) check_fd("norm dhidden", dres, fd_grad(f, hid, all_indices(n)));
    check_fd("norm dweight", dw, fd_grad(f, w, all_indices(w.size())));
    if (s.bias) check_fd("norm dbias", db, fd_grad(f, b, all_indices(b.size())));
  }
}

TEST_CASE("causal conv1d backward matches finite differences", "[backward][conv]") {
  std::mt19937_64 rng(4);
  struct S { int batch, length, channels, width; bool silu, bias, state; int ldx, threads; };
  for (S s : {S{2, 6, 5, 3, true, true, false, 7, 1}, S{1, 1, 3, 4, true, true, true, 3, 1}, S{2, 2, 4, 4, true, false, true, 5, 2},
              S{1, 5, 2, 1, false, true, false, 2, 1}, S{3, 9, 40, 4, true, true, true, 41, 2}, S{1, 7, 33, 2, false, false, true, 33, 3}}) {
    int const B = s.batch, L = s.length, C = s.channels, K = s.width;
    std::size_t const rows = static_cast<std::size_t>(B) * L;
    auto x = mbtest::random_vector<double>(rows * s.ldx, rng);
    auto w = mbtest::random_vector<double>(static_cast<std::size_t>(C) * K, rng);
    auto b = mbtest::random_vector<double>(C, rng);
    auto st0 = mbtest::random_vector<double>(static_cast<std::size_t>(B) * (K - 1) * C, rng);
    auto wo = mbtest::random_vector<double>(rows * C, rng);
    std::vector<double> out(rows * C), st;
    auto f = [&] {
      st = st0;
      layers::CausalConv1d<backend::Cpu, double>::run({B, L, C, K, x.data(), s.ldx, w.data(), s.bias ? b.data() : nullptr,
                                                       out.data(), C, s.state ? st.data() : nullptr, s.silu}, nullptr, backend::Cpu{1});
      return dot(wo, out);
    };
    std::vector<double> dx(x.size(), 0.0), dw(w.size(), 0.0), db(C, 0.0), dst(st0.size(), 0.0);
    layers::CausalConv1dBackwardArguments<double> a;
    a.batch = B; a.length = L; a.channels = C; a.width = K;
    a.x = x.data(); a.ld_x = s.ldx; a.weight = w.data(); a.bias = s.bias ? b.data() : nullptr;
    a.state = s.state ? st0.data() : nullptr; a.silu = s.silu;
    a.dout = wo.data(); a.ld_dout = C;
    a.dx = dx.data(); a.ld_dx = s.ldx;
    a.dweight = dw.data(); a.dbias = s.bias ? db.data() : nullptr; a.dstate = s.state ? dst.data() : nullptr;
    REQUIRE(layers::CausalConv1dBackward<backend::Cpu, double>::can_implement(a) == Status::kSuccess);
    layers::CausalConv1dBackward<backend::Cpu, double>::run(a, nullptr, backend::Cpu{s.threads});
    INFO("B " << B << " L " << L << " C " << C << " K " << K << " silu " << s.silu);
    auto ix = strided_indices(rows, C, s.ldx);
    check_fd("conv dx", gather(dx, ix), fd_grad(f, x, ix));
    check_fd("conv dweight", dw, fd_grad(f, w, all_indices(w.size())));
    if (s.bias) check_fd("conv dbias", db, fd_grad(f, b, all_indices(b.size())));
    if (s.state && K > 1) check_fd("conv dstate", dst, fd_grad(f, st0, all_indices(st0.size())));
    // accumulate_dx adds
    auto dx2 = dx;
    a.dx = dx2.data(); a.accumulate_dx = true; a.dweight = nullptr; a.dbias = nullptr; a.dstate = nullptr;
    layers::CausalConv1dBackward<backend::Cpu, double>::run(a, nullptr, backend::Cpu{s.threads});
    for (std::size_t i : ix) REQUIRE(dx2[i] == Approx(2 * dx[i]).epsilon(1e-14).margin(1e-300));
  }
}

TEST_CASE("embedding backward scatter-adds (repeated tokens)", "[backward][embedding]") {
  std::mt19937_64 rng(5);
  int const rows = 11, dim = 37, vocab = 6;
  std::vector<std::int32_t> tok = {0, 3, 3, 5, 1, 3, 0, 2, 5, 5, 3};
  auto table = mbtest::random_vector<double>(static_cast<std::size_t>(vocab) * dim, rng);
  auto wo = mbtest::random_vector<double>(static_cast<std::size_t>(rows) * dim, rng);
  std::vector<double> out(wo.size());
  auto f = [&] {
    layers::Embedding<backend::Cpu, double>::run({rows, dim, vocab, tok.data(), table.data(), out.data()}, nullptr, backend::Cpu{1});
    return dot(wo, out);
  };
  for (int threads : {1, 3}) {
    std::vector<double> dt(table.size(), 1.0);
    layers::EmbeddingBackward<backend::Cpu, double>::run({rows, dim, vocab, tok.data(), wo.data(), dt.data()}, nullptr,
                                                         backend::Cpu{threads});
    for (auto& v : dt) v -= 1.0;
    check_fd("embedding dtable", dt, fd_grad(f, table, all_indices(table.size())));
  }
}

TEST_CASE("cross entropy over the first 256 logits of a padded vocabulary", "[backward][loss]") {
  std::mt19937_64 rng(6);
  int const rows = 6, classes = 7, ld = 10;
  auto logits = mbtest::random_vector<double>(static_cast<std::size_t>(rows) * ld, rng, -3, 3);
  std::vector<std::int32_t> tgt = {0, 6, 3, -1, 2, 6};  // one ignored row
  auto f = [&] {
    return layers::CrossEntropy<backend::Cpu, double>::run({rows, classes, logits.data(), ld, tgt.data(), nullptr, 0}, nullptr,
                                                           backend::Cpu{1});
  };
  // loss by hand
  double want = 0;
  int counted = 0;
  for (int r = 0; r < rows; ++r) {
    if (tgt[r] < 0) continue;
    double s = 0;
    for (int c = 0; c < classes; ++c) s += std::exp(logits[r * ld + c]);
    want += std::log(s) - logits[r * ld + tgt[r]];
    ++counted;
  }
  want /= counted;
  CHECK(f() == Approx(want).epsilon(1e-14));
  std::vector<double> d(logits.size(), 7.0);
  double const loss = layers::CrossEntropy<backend::Cpu, double>::run({rows, classes, logits.data(), ld, tgt.data(), d.data(), ld},
                                                                      nullptr, backend::Cpu{2});
  CHECK(loss == Approx(want).epsilon(1e-14));
  auto ix = strided_indices(rows, classes, ld);
  check_fd("cross entropy dlogits", gather(d, ix), fd_grad(f, logits, ix));
  for (int r = 0; r < rows; ++r)
    for (int c = classes; c < ld; ++c) REQUIRE(d[r * ld + c] == 0.0);  // padding zeroed
  // in place, with a gradient scale
  auto inplace = logits;
  double const l2 = layers::CrossEntropy<backend::Cpu, double>::run(
      {rows, classes, inplace.data(), ld, tgt.data(), inplace.data(), ld, 0.5}, nullptr, backend::Cpu{1});
  CHECK(l2 == Approx(want).epsilon(1e-14));
  for (std::size_t i : ix) REQUIRE(inplace[i] == Approx(0.5 * d[i]).epsilon(1e-14).margin(1e-300));
}

// =============================================================================================
// (b) selective scan

// The problems (shapes, options, strided layouts: rows of u / delta / z / dout padded by 3, B and
// C in one row of 2N + 5 with a gap) and the case lists are the shared ones of
// tests/common/scan_cases.hpp; the policy and float bodies below (check_backward) are the ones
// the CUDA backward tests run too. The finite-difference checks are CPU-only: they establish
// the oracle (the CPU double Sequential backward) that every backend is compared with.

namespace {

using mbtest::CpuScanRunner;
using mbtest::ScanCase;
using mbtest::ScanProblem;

/// loss = <dout, out> + <dfinal, h_final> (the latter when dfinal is on), reference scan.
double scan_loss(ScanProblem const& p) {
  auto const r = mbtest::reference_forward(p);
  double l = 0;
  for (std::size_t row = 0; row < p.rows(); ++row)
    for (int d = 0; d < p.c.d_inner; ++d) l += p.dout[row * p.ldx + d] * r.out[row * p.ldx + d];
  if (p.c.dfinal) l += dot(p.dhT, r.hT);
  return l;
}

template <class Policy>
void check_scan_fd(ScanCase const& sc, std::uint64_t seed, std::size_t max_entries) {
  ScanProblem p(sc, seed);
  auto const g = CpuScanRunner<double>{2}.backward<Policy>(p);
  std::mt19937_64 rng(seed);
  auto const& s = p.c;
  std::function<double()> f = [&] { return scan_loss(p); };
  INFO("policy " << mbtest::policy_name<Policy>() << " " << s.name());
  auto ix = sample(strided_indices(p.rows(), s.d_inner, p.ldx), max_entries, rng);
  check_fd("scan du", gather(g.du, ix), fd_grad(f, p.u, ix));
  check_fd("scan ddelta", gather(g.ddelta, ix), fd_grad(f, p.delta, ix));
  if (s.z) check_fd("scan dz", gather(g.dz, ix), fd_grad(f, p.z, ix));
  auto ib = sample(strided_indices(p.rows(), s.d_state, p.ldbc, p.offB), max_entries, rng);
  check_fd("scan dB", gather(g.dBC, ib), fd_grad(f, p.BC, ib));
  auto ic = sample(strided_indices(p.rows(), s.d_state, p.ldbc, p.offC), max_entries, rng);
  check_fd("scan dC", gather(g.dBC, ic), fd_grad(f, p.BC, ic));
  auto ia = sample(all_indices(p.A.size()), max_entries, rng);
  check_fd("scan dA", gather(g.dA, ia), fd_grad(f, p.A, ia));
  if (s.D) check_fd("scan dD", g.dD, fd_grad(f, p.D, all_indices(p.D.size())));
  if (s.bias) check_fd("scan ddelta_bias", g.dbias, fd_grad(f, p.bias, all_indices(p.bias.size())));
  auto ih = sample(all_indices(p.h0.size()), max_entries, rng);
  if (s.init) check_fd("scan dinitial_state", gather(g.dh0, ih), fd_grad(f, p.h0, ih));
  // the recomputed output equals the reference forward
  auto const ref = mbtest::reference_forward(p);
  CHECK(mbtest::rel_err(gather(g.out, strided_indices(p.rows(), s.d_inner, p.ldx)),
                        gather(ref.out, strided_indices(p.rows(), s.d_inner, p.ldx))) < 1e-13);
  // strided padding of every written gradient is untouched (it started as NaN)
  for (std::size_t r = 0; r < p.rows(); ++r)
    for (std::int64_t d = s.d_inner; d < p.ldx; ++d)
      REQUIRE((std::isnan(g.du[r * p.ldx + d]) && std::isnan(g.ddelta[r * p.ldx + d])));
  std::vector<char> real(g.dBC.size(), 0);
  for (std::size_t r = 0; r < p.rows(); ++r)
    for (int n = 0; n < s.d_state; ++n) real[p.b_index(r, n)] = real[p.c_index(r, n)] = 1;
  for (std::size_t i = 0; i < g.dBC.size(); ++i)
    if (!real[i]) REQUIRE(std::isnan(g.dBC[i]));  // the gap between B and C, the row tail
}

}  // namespace

TEMPLATE_TEST_CASE("scan backward matches finite differences of the reference scan", "[backward][scan]", scan::Sequential,
                   scan::Chunked<4>, scan::Chunked<16>, scan::Associative, scan::Auto) {
  std::uint64_t seed = 10;
  for (auto const& sc : mbtest::classic_backward_cases()) check_scan_fd<TestType>(sc, seed++, 1000);
  // several Sequential checkpoints (64) and Associative / Auto chunks, a ragged tail, 3 tiles
  ScanCase big;
  big.batch = 2; big.length = 150; big.d_inner = 40; big.d_state = 3;
  check_scan_fd<TestType>(mbtest::cpu_layout(big), 99, 30);
}

TEMPLATE_TEST_CASE("scan backward: every policy equals Sequential", "[backward][scan]", scan::Chunked<1>, scan::Chunked<4>,
                   scan::Chunked<7>, scan::Chunked<64>, scan::Associative, scan::Auto) {
  std::uint64_t seed = 200;
  for (auto const& sc : mbtest::classic_backward_cases())
    for (int threads : {1, 2, 3}) mbtest::check_backward<TestType>(CpuScanRunner<double>{threads}, sc, seed++);
  seed = 300;
  for (auto const& sc : mbtest::random_backward_cases(5, 6)) mbtest::check_backward<TestType>(CpuScanRunner<double>{2}, sc, seed++);
  // the lists the CUDA backward tests run: every option on / off, both B / C layouts, d_state 1..32
  for (auto const& list : {mbtest::backward_mask_cases({1, 7, 8, 9, 33}), mbtest::backward_d_state_cases()})
    for (auto const& sc : list) mbtest::check_backward<TestType>(CpuScanRunner<double>{2}, sc, seed++);
}

TEST_CASE("scan backward: Sequential is thread-count independent and accumulates parameters", "[backward][scan]") {
  ScanCase sc;
  sc.batch = 3; sc.length = 130; sc.d_inner = 37; sc.d_state = 5;
  ScanProblem p(mbtest::cpu_layout(sc), 17);
  auto const a1 = CpuScanRunner<double>{1}.backward<scan::Sequential>(p);
  auto const a3 = CpuScanRunner<double>{3}.backward<scan::Sequential>(p);
  CHECK(mbtest::same_bits(a1.dBC, a3.dBC));  // tile-ordered reductions: bit-identical
  CHECK(mbtest::same_bits(a1.dA, a3.dA));
  CHECK(mbtest::same_bits(a1.du, a3.du));
  // a second run into the same parameter buffers adds (dA, dD, ddelta_bias += ...)
  mbtest::HostScanBuffers<double> b(p, 0.0);
  auto a = mbtest::backward_args<ssm::SelectiveScanBackwardArguments<double>>(p, b);
  a.dinitial_state = nullptr;
  a.out = nullptr;
  using Bwd = ssm::SelectiveScanBackward<backend::Cpu, double, scan::Chunked<16>>;
  Bwd::run(a, backend::Cpu{2});
  Bwd::run(a, backend::Cpu{2});
  for (std::size_t i = 0; i < b.dA.size(); ++i) REQUIRE(b.dA[i] == Approx(2 * a1.dA[i]).epsilon(1e-12).margin(1e-300));
  for (std::size_t i = 0; i < b.dD.size(); ++i) REQUIRE(b.dD[i] == Approx(2 * a1.dD[i]).epsilon(1e-12).margin(1e-300));
  for (std::size_t i = 0; i < b.dbias.size(); ++i) REQUIRE(b.dbias[i] == Approx(2 * a1.dbias[i]).epsilon(1e-12).margin(1e-300));
  // activation gradients are overwritten
  CHECK(mbtest::rel_err(mbtest::bc_entries(p, b.dBC), mbtest::bc_entries(p, a1.dBC)) < 1e-12);
}

TEMPLATE_TEST_CASE("scan backward in float tracks double", "[backward][scan][float]", scan::Sequential, scan::Chunked<8>,
                   scan::Associative) {
  std::uint64_t seed = 400;
  for (auto const& sc : mbtest::classic_backward_cases()) mbtest::check_backward<TestType>(CpuScanRunner<float>{2}, sc, seed++);
}

TEST_CASE("scan backward workspace: checkpoints, not every state", "[backward][scan][memory]") {
  ssm::SelectiveScanBackwardArguments<float> a;
  a.batch = 2; a.length = 8192; a.d_inner = 1536; a.d_state = 16;
  std::size_t const all_states = std::size_t(2) * 8192 * 1536 * 16 * sizeof(float);
  backend::Cpu be{4};
  std::size_t const seq = ssm::SelectiveScanBackward<backend::Cpu, float, scan::Sequential>::workspace_bytes(a, be);
  std::size_t const chk = ssm::SelectiveScanBackward<backend::Cpu, float, scan::Chunked<64>>::workspace_bytes(a, be);
  std::size_t const aso = ssm::SelectiveScanBackward<backend::Cpu, float, scan::Associative>::workspace_bytes(a, be);
  // Sequential: 1/64 of the states (+2 state slices, partials, thread buffers); Chunked: 2/64.
  CHECK(seq < all_states / 50);
  CHECK(chk < all_states / 25);
  CHECK(aso == chk);
  std::size_t const S = std::size_t(2) * 1536 * 16 * sizeof(float);  // one state per sequence
  CHECK(seq >= 128 * S);  // the checkpoints themselves
  CHECK(chk >= 2 * 128 * S);
  // length 0 / batch 0: nothing, and dinitial_state = dfinal_state
  a.length = 0;
  CHECK(ssm::SelectiveScanBackward<backend::Cpu, float, scan::Chunked<64>>::workspace_bytes(a, be) == 0);
  std::vector<float> A(1536 * 16, -1.0f), dA(A.size(), 0.0f), df(std::size_t(2) * 1536 * 16, 0.5f), di(df.size(), 9.0f);
  a.A = A.data(); a.dA = dA.data(); a.dfinal_state = df.data(); a.dinitial_state = di.data();
  ssm::SelectiveScanBackward<backend::Cpu, float, scan::Sequential>::run(a, nullptr, be);
  CHECK(di == df);
}

// =============================================================================================
// (f) bad arguments

TEST_CASE("scan backward rejects bad arguments", "[backward][scan][errors]") {
  ScanCase sc;  // D, z, bias on; no initial state, dfinal, dinitial_state or out
  sc.batch = 1; sc.length = 5; sc.d_inner = 4; sc.d_state = 2;
  sc.init = false; sc.dfinal = false; sc.dinit = false; sc.out = false;
  ScanProblem p(mbtest::cpu_layout(sc), 1);
  mbtest::HostScanBuffers<double> buffers(p, 0.0);
  auto const good = mbtest::backward_args<ssm::SelectiveScanBackwardArguments<double>>(p, buffers);
  using Bwd = ssm::SelectiveScanBackward<backend::Cpu, double, scan::Chunked<2>>;
  REQUIRE(Bwd::can_implement(good) == Status::kSuccess);
  std::vector<std::function<void(ssm::SelectiveScanBackwardArguments<double>&)>> breakers = {
      [](auto& a) { a.dout = nullptr; },
      [](auto& a) { a.dz = nullptr; },                 // z given, its gradient missing
      [](auto& a) { a.dA = nullptr; },
      [](auto& a) { a.du = nullptr; },
      [](auto& a) { a.dB = nullptr; },
      [](auto& a) { a.ld_dB = 1; },                    // shorter than d_state
      [](auto& a) { a.ld_ddelta = 3; },
      [](auto& a) { a.ld_dout = 0; },
      [](auto& a) { a.D = nullptr; },                  // dD without D
      [](auto& a) { a.delta_bias = nullptr; },         // ddelta_bias without delta_bias
      [](auto& a) { a.d_state = 0; },
      [](auto& a) { a.batch = -1; },
  };
  for (std::size_t i = 0; i < breakers.size(); ++i) {
    auto a = good;
    breakers[i](a);
    INFO("breaker " << i);
    CHECK(Bwd::can_implement(a) == Status::kInvalidArgument);
    CHECK_THROWS_AS(Bwd::run(a, backend::Cpu{1}), Error);
    CHECK_THROWS_AS((ssm::SelectiveScanBackward<backend::Cpu, double, scan::Sequential>::run(a, backend::Cpu{1})), Error);
  }
  // a missing workspace is an error too
  CHECK_THROWS_AS(Bwd::run(good, nullptr, backend::Cpu{1}), Error);
}

TEST_CASE("layer backward operators reject bad arguments", "[backward][errors]") {
  std::vector<double> buf(64, 0.1);
  std::vector<std::int32_t> tok = {0, 1, 7};
  using LB = layers::LinearBackward<backend::Cpu, double>;
  LB::Arguments l{2, 3, 4, buf.data(), 3, buf.data(), buf.data(), 4, buf.data(), 3, false, buf.data(), buf.data()};
  CHECK(LB::can_implement(l) == Status::kSuccess);
  auto l2 = l; l2.ld_dx = 2;
  CHECK_THROWS_AS(LB::run(l2), Error);
  l2 = l; l2.x = nullptr;  // dweight needs x
  CHECK_THROWS_AS(LB::run(l2), Error);
  l2 = l; l2.ld_dy = 3;
  CHECK_THROWS_AS(LB::run(l2), Error);

  using NB = layers::AddNormBackward<backend::Cpu, double>;
  NB::Arguments n{2, 4, buf.data(), buf.data(), buf.data(), buf.data(), buf.data(), buf.data(), 1e-5, true};  // rms + dbias
  CHECK_THROWS_AS(NB::run(n), Error);
  n.dbias = nullptr; n.dresidual = nullptr;
  CHECK_THROWS_AS(NB::run(n), Error);

  using CB = layers::CausalConv1dBackward<backend::Cpu, double>;
  CB::Arguments c;
  c.batch = 1; c.length = 3; c.channels = 2; c.width = 2; c.x = buf.data(); c.ld_x = 2; c.weight = buf.data();
  c.dout = buf.data(); c.ld_dout = 2; c.dx = buf.data(); c.ld_dx = 2; c.dbias = buf.data();  // dbias without bias
  CHECK_THROWS_AS(CB::run(c), Error);
  c.dbias = nullptr; c.ld_dout = 1;
  CHECK_THROWS_AS(CB::run(c), Error);

  using EB = layers::EmbeddingBackward<backend::Cpu, double>;
  CHECK_THROWS_AS(EB::run({3, 2, 5, tok.data(), buf.data(), buf.data()}), Error);  // token 7 >= vocab 5

  using CE = layers::CrossEntropy<backend::Cpu, double>;
  CHECK_THROWS_AS(CE::run({3, 5, buf.data(), 5, tok.data(), nullptr, 0}), Error);  // target 7 >= classes 5
  CHECK_THROWS_AS(CE::run({3, 8, buf.data(), 5, tok.data(), nullptr, 0}), Error);  // ld < classes
  CHECK_THROWS_AS(CE::run({2, 8, buf.data(), 8, tok.data(), buf.data(), 9}), Error);  // in place with another ld
}

TEST_CASE("finite-difference agreement summary", "[backward][zz]") {
  WARN("worst FD relative error (layers + scan, this run): " << worst_fd
       << "; worst scan backward error / tolerance (policies vs Sequential, float vs double): "
       << mbtest::worst_backward_rel_err());
  CHECK(worst_fd < kFdTol);
}
