// CUDA selective-scan backward (float) against the CPU backward in double
// (SelectiveScanBackward<backend::Cpu, double, scan::Sequential>): every output (du, ddelta, dz,
// dB, dC, dinitial_state, out, dA, dD, ddelta_bias) to relative L2 error <= 1e-4. Odd shapes,
// every optional input on/off, strided B/C, padded leading dimensions (poison kept).
// Needs a GPU to do more than compile: without one every case is skipped (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/backend/cpu/selective_scan_backward.hpp>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;
namespace backend = mambabyte::backend;

using mbtest::have_gpu;

struct Case {
  int batch = 1, length = 1, d_inner = 1, d_state = 16;
  bool bias = true, softplus = true, D = true, z = true, init = true, dfinal = true, dinit = true,
       out = true, xproj = true;
  int pad = 0;
  std::string name() const {
    return "B=" + std::to_string(batch) + " L=" + std::to_string(length) + " D=" + std::to_string(d_inner) +
           " N=" + std::to_string(d_state) + (bias ? " bias" : "") + (softplus ? " softplus" : "") +
           (D ? " D" : "") + (z ? " z" : "") + (init ? " h0" : "") + (dfinal ? " dhT" : "") +
           (dinit ? " dh0" : "") + (out ? " out" : "") + (xproj ? " xproj" : "") + " pad=" + std::to_string(pad);
  }
};

/// All buffers of one problem as flat float vectors (inputs random; outputs sized).
struct Host {
  Case c;
  std::int64_t ldx = 0, ldbc = 0, offB = 0, offC = 0;
  std::vector<float> u, delta, bias, A, BC, D, z, h0, dout, dhT;
  std::vector<float> du, ddelta, dBC, dz, dh0, out, dA, dD, dbias;  // outputs

  Host(Case const& cs, std::uint64_t seed) : c(cs) {
    std::mt19937_64 rng(seed);
    auto uni = [&](double lo, double hi) { return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)); };
    std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
    int const N = c.d_state, Di = c.d_inner;
    ldx = Di + c.pad;
    float const nan = std::numeric_limits<float>::quiet_NaN();
    u.assign(rows * ldx, nan);
    delta = u; z = u; dout = u;
    for (std::size_t r = 0; r < rows; ++r)
      for (int d = 0; d < Di; ++d) {
        u[r * ldx + d] = uni(-1, 1);
        delta[r * ldx + d] = c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2);
        z[r * ldx + d] = uni(-3, 3);
        dout[r * ldx + d] = uni(-1, 1);
      }
    if (c.softplus && rows > 1 && Di > 0) delta[ldx] = 25.f;  // the v > 20 branch once
    bias.resize(Di);
    for (auto& x : bias) x = c.softplus ? uni(-2, 0) : uni(0, 0.05);
    A.resize(static_cast<std::size_t>(Di) * N);
    for (int d = 0; d < Di; ++d)
      for (int n = 0; n < N; ++n)
        A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
    if (c.xproj) { ldbc = 8 + 2 * N; offB = 8; offC = 8 + N; BC.resize(rows * ldbc); }
    else { ldbc = N; offB = 0; offC = static_cast<std::int64_t>(rows) * N; BC.resize(2 * rows * N); }
    for (auto& x : BC) x = uni(-1, 1);
    D.resize(Di);
    for (auto& x : D) x = 1.f + uni(-0.1, 0.1);
    std::size_t const S = static_cast<std::size_t>(c.batch) * Di * N;
    h0.resize(S); dhT.resize(S);
    for (auto& x : h0) x = uni(-1, 1);
    for (auto& x : dhT) x = uni(-1, 1);
    dA.resize(static_cast<std::size_t>(Di) * N);
    for (auto& x : dA) x = uni(-1, 1);  // accumulated into
    dD.resize(Di); dbias.resize(Di);
    for (auto& x : dD) x = uni(-1, 1);
    for (auto& x : dbias) x = uni(-1, 1);
  }
};

/// Pointers of type T into the vectors of `Store` (float on host for the device copy, or double).
template <class T, class V>
ssm::SelectiveScanBackwardArguments<T> make_args(Case const& c, Host const& h, V& v) {
  ssm::SelectiveScanBackwardArguments<T> a;
  a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
  a.u = v.u; a.ld_u = h.ldx;
  a.delta = v.delta; a.ld_delta = h.ldx;
  a.delta_bias = c.bias ? v.bias : nullptr;
  a.delta_softplus = c.softplus;
  a.A = v.A;
  a.B = v.BC + h.offB; a.ld_B = h.ldbc;
  a.C = v.BC + h.offC; a.ld_C = h.ldbc;
  a.D = c.D ? v.D : nullptr;
  a.z = c.z ? v.z : nullptr; a.ld_z = h.ldx;
  a.initial_state = c.init ? v.h0 : nullptr;
  a.dout = v.dout; a.ld_dout = h.ldx;
  a.dfinal_state = c.dfinal ? v.dhT : nullptr;
  a.du = v.du; a.ld_du = h.ldx;
  a.ddelta = v.ddelta; a.ld_ddelta = h.ldx;
  a.dB = v.dBC + h.offB; a.ld_dB = h.ldbc;
  a.dC = v.dBC + h.offC; a.ld_dC = h.ldbc;
  a.dz = c.z ? v.dz : nullptr; a.ld_dz = h.ldx;
  a.dinitial_state = c.dinit ? v.dh0 : nullptr;
  a.out = c.out ? v.out : nullptr; a.ld_out = h.ldx;
  a.dA = v.dA;
  a.dD = c.D ? v.dD : nullptr;
  a.ddelta_bias = c.bias ? v.dbias : nullptr;
  return a;
}

template <class T>
struct Ptrs {
  T *u, *delta, *bias, *A, *BC, *D, *z, *h0, *dout, *dhT, *du, *ddelta, *dBC, *dz, *dh0, *out, *dA, *dD, *dbias;
};

/// Element-wise, with the padding / unused entries compared as 0 vs 0 (NaN poison is
/// checked separately).
double rel_err(std::vector<float> const& a, std::vector<double> const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    double const d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

template <class P>
void check_case(Case const& c, std::uint64_t seed) {
  INFO(c.name() << " policy " << P::name);
  Host h(c, seed);
  std::size_t const X = h.u.size(), S = h.h0.size();
  float const nan = std::numeric_limits<float>::quiet_NaN();
  // --- CPU oracle in double ---
  auto dbl = [](std::vector<float> const& v) { return std::vector<double>(v.begin(), v.end()); };
  std::vector<double> u = dbl(h.u), delta = dbl(h.delta), bias = dbl(h.bias), A = dbl(h.A), BC = dbl(h.BC),
                      D = dbl(h.D), z = dbl(h.z), h0 = dbl(h.h0), dout = dbl(h.dout), dhT = dbl(h.dhT);
  for (auto* v : {&u, &delta, &z, &dout})
    for (auto& x : *v) if (std::isnan(x)) x = 0;
  std::vector<double> du(X, 0), ddelta(X, 0), dBC(h.BC.size(), 0), dz(X, 0), dh0(S, 0), out(X, 0),
      dA = dbl(h.dA), dD = dbl(h.dD), dbias = dbl(h.dbias);
  Ptrs<double> pd{u.data(), delta.data(), bias.data(), A.data(), BC.data(), D.data(), z.data(), h0.data(),
                  dout.data(), dhT.data(), du.data(), ddelta.data(), dBC.data(), dz.data(), dh0.data(),
                  out.data(), dA.data(), dD.data(), dbias.data()};
  auto const ad = make_args<double>(c, h, pd);
  using CpuOp = ssm::SelectiveScanBackward<backend::Cpu, double, scan::Sequential>;
  REQUIRE(CpuOp::can_implement(ad) == Status::kSuccess);
  CpuOp::run(ad, backend::Cpu{1});

  // --- device ---
  Cuda be{};
  std::vector<std::vector<float> const*> in = {&h.u, &h.delta, &h.bias, &h.A, &h.BC, &h.D, &h.z, &h.h0, &h.dout, &h.dhT};
  std::vector<std::size_t> out_sizes = {X, X, h.BC.size(), X, S, X};
  std::vector<DeviceBuffer<float>> bufs;
  for (auto* v : in) {
    bufs.emplace_back(std::max<std::size_t>(v->size(), 1));
    bufs.back().copy_from_host(v->data(), v->size());
  }
  for (std::size_t n : out_sizes) {
    bufs.emplace_back(std::max<std::size_t>(n, 1));
    std::vector<float> poison(n, nan);
    bufs.back().copy_from_host(poison.data(), n);
  }
  for (auto* v : {&h.dA, &h.dD, &h.dbias}) {
    bufs.emplace_back(std::max<std::size_t>(v->size(), 1));
    bufs.back().copy_from_host(v->data(), v->size());
  }
  Ptrs<float> pf{};
  float** slots[] = {&pf.u, &pf.delta, &pf.bias, &pf.A, &pf.BC, &pf.D, &pf.z, &pf.h0, &pf.dout, &pf.dhT,
                     &pf.du, &pf.ddelta, &pf.dBC, &pf.dz, &pf.dh0, &pf.out, &pf.dA, &pf.dD, &pf.dbias};
  for (std::size_t i = 0; i < bufs.size(); ++i) *slots[i] = bufs[i].data();
  auto const af = make_args<float>(c, h, pf);
  using Op = ssm::SelectiveScanBackward<Cuda, float, P>;
  REQUIRE(Op::can_implement(af) == Status::kSuccess);
  DeviceBuffer<std::byte> ws(Op::workspace_bytes(af, be), be);
  Op::run(af, ws.data(), be);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
  auto fetch = [&](int i, std::size_t n) {
    std::vector<float> v(n);
    bufs[i].copy_to_host(v.data(), n);
    return v;
  };
  // Activation-like outputs with (batch, length, ld) layout: padding must keep its poison.
  bool pad_ok = true;
  auto strip = [&](std::vector<float>& v) {
    for (std::size_t r = 0; r < static_cast<std::size_t>(c.batch) * c.length; ++r)
      for (std::int64_t d = c.d_inner; d < h.ldx; ++d) {
        pad_ok = pad_ok && std::isnan(v[r * h.ldx + d]);
        v[r * h.ldx + d] = 0.f;
      }
  };
  constexpr double kTol = 1e-4;
  auto g_du = fetch(10, X), g_dd = fetch(11, X);
  strip(g_du); strip(g_dd);
  CHECK(rel_err(g_du, du) <= kTol);
  CHECK(rel_err(g_dd, ddelta) <= kTol);
  {
    auto g = fetch(12, h.BC.size());
    // x_proj layout: the dt_rank columns are not B / C and keep their poison.
    if (c.xproj)
      for (std::size_t r = 0; r < static_cast<std::size_t>(c.batch) * c.length; ++r)
        for (int j = 0; j < 8; ++j) {
          pad_ok = pad_ok && std::isnan(g[r * h.ldbc + j]);
          g[r * h.ldbc + j] = 0.f;
        }
    // dB and dC separately.
    std::vector<float> gb, gc;
    std::vector<double> rb, rc;
    for (std::size_t r = 0; r < static_cast<std::size_t>(c.batch) * c.length; ++r)
      for (int n = 0; n < c.d_state; ++n) {
        gb.push_back(g[h.offB + r * h.ldbc + n]); rb.push_back(dBC[h.offB + r * h.ldbc + n]);
        gc.push_back(g[h.offC + r * h.ldbc + n]); rc.push_back(dBC[h.offC + r * h.ldbc + n]);
      }
    INFO("dB"); CHECK(rel_err(gb, rb) <= kTol);
    INFO("dC"); CHECK(rel_err(gc, rc) <= kTol);
  }
  if (c.z) { auto g = fetch(13, X); strip(g); INFO("dz"); CHECK(rel_err(g, dz) <= kTol); }
  if (c.dinit) { INFO("dh0"); CHECK(rel_err(fetch(14, S), dh0) <= kTol); }
  if (c.out) {
    auto g = fetch(15, X); strip(g);
    // The CPU writes out when asked as well; compare with the oracle's recomputed output.
    INFO("out"); CHECK(rel_err(g, out) <= kTol);
  }
  { INFO("dA"); CHECK(rel_err(fetch(16, h.dA.size()), dA) <= kTol); }
  if (c.D) { INFO("dD"); CHECK(rel_err(fetch(17, h.dD.size()), dD) <= kTol); }
  if (c.bias) { INFO("dbias"); CHECK(rel_err(fetch(18, h.dbias.size()), dbias) <= kTol); }
  CHECK(pad_ok);
}

}  // namespace

TEST_CASE("cuda scan backward: odd shapes, every option", "[cuda][backward][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (int L : {1, 7, 8, 9, 33}) {
    for (int Di : {1, 37, 130}) {
      for (int mask : {0, 1, 2, 3, 4, 5, 6, 7}) {
        Case c;
        c.batch = (mask & 1) ? 3 : 1;
        c.length = L;
        c.d_inner = Di;
        c.bias = mask & 2;
        c.softplus = !(mask & 4) || (mask & 2);
        c.D = !(mask & 2);
        c.z = mask & 4;
        c.init = mask & 1;
        c.dfinal = !(mask & 1);
        c.dinit = mask & 2;
        c.out = mask & 4;
        c.xproj = mask & 1;
        c.pad = (mask & 2) ? 3 : 0;
        check_case<scan::Sequential>(c, seed++);
        // Time-parallel: segments of 16 steps (2 chunks) and of 24 (Chunked<20> rounds up to 8s).
        if (L > 8) {
          check_case<scan::Chunked<16>>(c, seed++);
          check_case<scan::Chunked<20>>(c, seed++);
        }
      }
    }
  }
}

TEST_CASE("cuda scan backward: 16-byte rows, channel-block and tile edges", "[cuda][backward][small]") {
  // ld a multiple of 4 floats: the 16-byte cp.async path for u / delta / dout / z (d_inner 68:
  // a second 64-channel block with 4 channels, the rest of its 16-byte groups zero-filled);
  // segments of 8, 12 and 20 steps (1, 1.5 and 2.5 tiles of 8 steps) and Auto.
  REQUIRE_GPU();
  std::uint64_t seed = 500;
  for (int Di : {64, 68, 130}) {
    for (int L : {4, 37, 64}) {
      Case c;
      c.batch = 2; c.length = L; c.d_inner = Di;
      c.pad = (Di % 4 == 0) ? 4 : 2;
      c.xproj = (L != 37);
      check_case<scan::Sequential>(c, seed++);
      check_case<scan::Chunked<8>>(c, seed++);
      check_case<scan::Chunked<12>>(c, seed++);
      check_case<scan::Chunked<20>>(c, seed++);
      check_case<scan::Auto>(c, seed++);
    }
  }
}

TEST_CASE("cuda scan backward: general d_state", "[cuda][backward][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (int N : {1, 5, 17, 32}) {
    Case c;
    c.batch = 2; c.length = 21; c.d_inner = 70; c.d_state = N; c.pad = 1;
    check_case<scan::Sequential>(c, seed++);
    check_case<scan::Chunked<8>>(c, seed++);
  }
}

TEST_CASE("cuda scan backward: model-like sizes, policies", "[cuda][backward]") {
  REQUIRE_GPU();
  Case c;
  c.batch = 2; c.length = 1000; c.d_inner = 200;
  check_case<scan::Sequential>(c, 7);
  check_case<scan::Auto>(c, 8);
  check_case<scan::Chunked<64>>(c, 9);
  check_case<scan::Chunked<256>>(c, 11);
  c.batch = 1; c.length = 3001; c.d_inner = 129; c.xproj = false;
  check_case<scan::Auto>(c, 10);  // 3 channel blocks: Auto picks 11 time segments
  check_case<scan::Chunked<512>>(c, 12);
}

TEST_CASE("cuda scan backward: Auto rule", "[cuda][backward][small]") {
  namespace sd = mambabyte::backend::cuda::scan_bwd_detail;
  // Segments (in chunks of kBwdChunk steps) for 132 SMs x 4 resident blocks (528 blocks a wave).
  auto segs = [](int batch, int length, int d_inner) {
    int const sc = ssm::resolve_auto_cuda_backward(batch, length, d_inner, 132, 4);
    return sd::segment_count(length, sc);
  };
  CHECK(ssm::resolve_auto_cuda_backward(256, 8192, 2048, 132, 4) == 0);  // 8192 blocks: one segment
  CHECK(ssm::resolve_auto_cuda_backward(1, 300, 129, 132, 4) == 0);      // too short to split
  // Few channel blocks: the segments fill at least one wave, each at least 256 steps long.
  for (auto [B, L, D] : {std::tuple{8, 8192, 2048}, {1, 65536, 2048}, {16, 2048, 1536}, {1, 3001, 129}}) {
    INFO("B=" << B << " L=" << L << " D=" << D);
    int const sc = ssm::resolve_auto_cuda_backward(B, L, D, 132, 4);
    CHECK(sc > 0);
    CHECK(sc * sd::kBwdChunk >= 256);
    CHECK(segs(B, L, D) >= 2);
  }
  CHECK(segs(1, 65536, 2048) * 32 >= 528);  // 32 channel blocks fill a wave of 528
}

TEST_CASE("cuda scan backward: argument checks", "[cuda][backward][small]") {
  using Op = ssm::SelectiveScanBackward<Cuda, float, scan::Sequential>;
  ssm::SelectiveScanBackwardArguments<float> a;
  a.batch = 1; a.length = 4; a.d_inner = 4; a.d_state = 16;
  CHECK(Op::can_implement(a) == Status::kInvalidArgument);  // no A / dA / pointers
  float dummy = 0;
  a.A = &dummy; a.dA = &dummy; a.d_state = 33;
  a.batch = 0;
  CHECK(Op::can_implement(a) == Status::kUnsupported);
}
