// CUDA selective scan (float) against the fp64 oracle reference::selective_scan, per policy, on
// random and odd shapes; Chunked against Sequential; argument checks. Needs a GPU to do more
// than compile: without one every test case is skipped with a message (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer (memcheck, racecheck).
#include <mambabyte/cuda.hpp>
#include <mambabyte/reference/reference.hpp>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
using mambabyte::backend::cuda::device_fill;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;

using mbtest::have_gpu;

/// One problem: shapes, which optional inputs exist, and the layouts.
struct Case {
  int batch = 1, length = 1, d_inner = 1, d_state = 16;
  bool bias = true, softplus = true, D = true, z = true, init = true, final_state = true;
  bool xproj_layout = true;  ///< B, C inside x_proj rows: ld = dt_rank + 2N, offsets dt_rank, dt_rank+N
  int dt_rank = 8;
  int pad = 0;               ///< extra leading-dimension padding for u, delta, z, out
  std::string name() const {
    return "B=" + std::to_string(batch) + " L=" + std::to_string(length) + " D=" +
           std::to_string(d_inner) + " N=" + std::to_string(d_state) + (bias ? " bias" : "") +
           (softplus ? " softplus" : "") + (D ? " D" : "") + (z ? " z" : "") +
           (init ? " h0" : "") + (final_state ? " hT" : "") + (xproj_layout ? " xproj" : "") +
           " pad=" + std::to_string(pad);
  }
};

/// Host data of a case (float) and everything needed to run it on the device and the oracle.
struct Problem {
  Case c;
  std::int64_t ld_x = 0, ld_bc = 0;
  std::vector<float> u, delta, bias, A, BC, D, z, h0;  // BC: B and C storage (x_proj rows or two arrays)
  std::int64_t off_B = 0, off_C = 0;

  explicit Problem(Case const& cs, std::uint64_t seed) : c(cs) {
    std::mt19937_64 rng(seed);
    auto uni = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); };
    std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
    int const N = c.d_state, Di = c.d_inner;
    ld_x = Di + c.pad;
    u.assign(rows * ld_x, std::numeric_limits<float>::quiet_NaN());  // padding never read
    delta = u;
    z = u;
    for (std::size_t r = 0; r < rows; ++r)
      for (int d = 0; d < Di; ++d) {
        u[r * ld_x + d] = static_cast<float>(uni(-1, 1));
        // With softplus: raw dt + bias spans softplus's curved part and the > 20 branch rarely;
        // without: a positive step size directly.
        delta[r * ld_x + d] = static_cast<float>(c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2));
        z[r * ld_x + d] = static_cast<float>(uni(-3, 3));
      }
    if (c.softplus && rows > 0 && Di > 0) delta[0] = 25.f;  // the v > 20 branch once
    bias.resize(Di);
    for (auto& x : bias) x = static_cast<float>(c.softplus ? uni(-2, 0) : uni(0, 0.05));
    A.resize(static_cast<std::size_t>(Di) * N);
    for (int d = 0; d < Di; ++d)
      for (int n = 0; n < N; ++n)
        A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
    if (c.xproj_layout) {
      ld_bc = c.dt_rank + 2 * N;
      off_B = c.dt_rank;
      off_C = c.dt_rank + N;
      BC.resize(rows * ld_bc);
    } else {
      ld_bc = N;
      off_B = 0;
      off_C = static_cast<std::int64_t>(rows) * N;
      BC.resize(2 * rows * N);
    }
    for (auto& x : BC) x = static_cast<float>(uni(-1, 1));
    D.resize(Di);
    for (auto& x : D) x = static_cast<float>(1.0 + uni(-0.1, 0.1));
    h0.resize(static_cast<std::size_t>(c.batch) * Di * N);
    for (auto& x : h0) x = static_cast<float>(uni(-1, 1));
  }

  std::size_t out_size() const { return static_cast<std::size_t>(c.batch) * c.length * ld_x; }
  std::size_t state_size() const { return static_cast<std::size_t>(c.batch) * c.d_inner * c.d_state; }

  /// The oracle: outputs (padding left 0) and the final state, in double.
  void reference(std::vector<double>& out, std::vector<double>& hT) const {
    auto dbl = [](std::vector<float> const& v) { return std::vector<double>(v.begin(), v.end()); };
    auto const du = dbl(u), ddt = dbl(delta), db = dbl(bias), dA = dbl(A), dBC = dbl(BC), dD = dbl(D),
               dz = dbl(z), dh0 = dbl(h0);
    out.assign(out_size(), 0.0);
    hT.assign(state_size(), 0.0);
    ssm::SelectiveScanArguments<double> a;
    a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
    a.u = du.data(); a.ld_u = ld_x;
    a.delta = ddt.data(); a.ld_delta = ld_x;
    a.delta_bias = c.bias ? db.data() : nullptr;
    a.delta_softplus = c.softplus;
    a.A = dA.data();
    a.B = dBC.data() + off_B; a.ld_B = ld_bc;
    a.C = dBC.data() + off_C; a.ld_C = ld_bc;
    a.D = c.D ? dD.data() : nullptr;
    a.z = c.z ? dz.data() : nullptr; a.ld_z = ld_x;
    a.out = out.data(); a.ld_out = ld_x;
    a.initial_state = c.init ? dh0.data() : nullptr;
    a.final_state = hT.data();
    mambabyte::reference::selective_scan(a);
  }
};

/// Device copies of a problem plus its outputs (poisoned with NaN before every run).
struct DeviceProblem {
  Problem const& p;
  Cuda be{};
  DeviceBuffer<float> u, delta, bias, A, BC, D, z, h0, out, hT;

  explicit DeviceProblem(Problem const& pr)
      : p(pr), u(pr.u.size()), delta(pr.delta.size()), bias(pr.bias.size()), A(pr.A.size()),
        BC(pr.BC.size()), D(pr.D.size()), z(pr.z.size()), h0(pr.h0.size()), out(pr.out_size()),
        hT(pr.state_size()) {
    u.copy_from_host(pr.u.data(), pr.u.size());
    delta.copy_from_host(pr.delta.data(), pr.delta.size());
    bias.copy_from_host(pr.bias.data(), pr.bias.size());
    A.copy_from_host(pr.A.data(), pr.A.size());
    BC.copy_from_host(pr.BC.data(), pr.BC.size());
    D.copy_from_host(pr.D.data(), pr.D.size());
    z.copy_from_host(pr.z.data(), pr.z.size());
    h0.copy_from_host(pr.h0.data(), pr.h0.size());
  }

  ssm::SelectiveScanArguments<float> args() {
    auto const& c = p.c;
    ssm::SelectiveScanArguments<float> a;
    a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
    a.u = u.data(); a.ld_u = p.ld_x;
    a.delta = delta.data(); a.ld_delta = p.ld_x;
    a.delta_bias = c.bias ? bias.data() : nullptr;
    a.delta_softplus = c.softplus;
    a.A = A.data();
    a.B = BC.data() + p.off_B; a.ld_B = p.ld_bc;
    a.C = BC.data() + p.off_C; a.ld_C = p.ld_bc;
    a.D = c.D ? D.data() : nullptr;
    a.z = c.z ? z.data() : nullptr; a.ld_z = p.ld_x;
    a.out = out.data(); a.ld_out = p.ld_x;
    a.initial_state = c.init ? h0.data() : nullptr;
    a.final_state = c.final_state ? hT.data() : nullptr;
    return a;
  }

  /// Runs policy P (workspace from workspace_bytes) and copies the results back; padding
  /// columns of `out` are returned as 0 and must still hold the poison on the device.
  template <class P>
  void run(std::vector<float>& host_out, std::vector<float>& host_hT, bool* padding_intact) {
    float const nan = std::numeric_limits<float>::quiet_NaN();
    device_fill(be, out.data(), out.size(), nan);
    if (!hT.empty()) device_fill(be, hT.data(), hT.size(), nan);
    auto const a = args();
    using Op = ssm::SelectiveScan<Cuda, float, P>;
    REQUIRE(Op::can_implement(a) == Status::kSuccess);
    DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be), be);
    Op::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    host_out.resize(out.size());
    out.copy_to_host(host_out.data(), out.size());
    host_hT.resize(hT.size());
    hT.copy_to_host(host_hT.data(), hT.size());
    bool intact = true;
    for (std::size_t r = 0; r < static_cast<std::size_t>(p.c.batch) * p.c.length; ++r)
      for (std::int64_t d = p.c.d_inner; d < p.ld_x; ++d) {
        intact = intact && std::isnan(host_out[r * p.ld_x + d]);
        host_out[r * p.ld_x + d] = 0.f;
      }
    *padding_intact = intact;
  }
};

double rel_err(std::vector<float> const& a, std::vector<double> const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    double const d = static_cast<double>(a[i]) - b[i];
    num += d * d;  // NaN (an unwritten element) propagates and fails the check
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

double rel_err(std::vector<float> const& a, std::vector<float> const& b) {
  return rel_err(a, std::vector<double>(b.begin(), b.end()));
}

constexpr double kTol = 1e-5;

template <class P>
void check_against_reference(Case const& c, std::uint64_t seed) {
  INFO(c.name() << " policy " << P::name);
  Problem const prob(c, seed);
  std::vector<double> ref_out, ref_hT;
  prob.reference(ref_out, ref_hT);
  DeviceProblem dev(prob);
  std::vector<float> out, hT;
  bool pad_ok = false;
  dev.template run<P>(out, hT, &pad_ok);
  CHECK(pad_ok);
  double const e_out = rel_err(out, ref_out);
  INFO("rel err out " << e_out);
  CHECK(e_out <= kTol);
  if (c.final_state) {
    double const e_h = rel_err(hT, ref_hT);
    INFO("rel err final state " << e_h);
    CHECK(e_h <= kTol);
  }
}

template <class... Ps>
void check_all(Case const& c, std::uint64_t seed) {
  (check_against_reference<Ps>(c, seed), ...);
}

// Small chunks so that short test sequences have many chunks (and a ragged last one).
using Seq = scan::Sequential;
using Ch16 = scan::Chunked<16>;
using Ch64 = scan::Chunked<64>;
using Ch256 = scan::Chunked<256>;

}  // namespace

TEST_CASE("CUDA scan matches the fp64 reference on small odd shapes", "[cuda][scan][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (int L : {1, 2, 17, 100}) {
    for (int Di : {1, 37, 130}) {
      Case c;
      c.batch = 2; c.length = L; c.d_inner = Di; c.d_state = 16;
      check_all<Seq, Ch16, Ch64, scan::Auto>(c, seed++);
    }
  }
}

TEST_CASE("CUDA scan: optional inputs off, plain B/C layout, padded rows", "[cuda][scan][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (int mask = 0; mask < 8; ++mask) {
    Case c;
    c.batch = 2; c.length = 45; c.d_inner = 70; c.d_state = 16;
    c.bias = mask & 1; c.D = mask & 2; c.z = mask & 4;
    c.init = !(mask & 1); c.final_state = (mask != 3);
    c.softplus = (mask != 5);
    c.xproj_layout = (mask % 3 != 0);
    c.pad = (mask & 1) ? 3 : 0;
    check_all<Seq, Ch16>(c, seed++);
  }
}

TEST_CASE("CUDA scan: d_state other than 16 (general path)", "[cuda][scan][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 200;
  for (int N : {1, 5, 33, 64}) {
    Case c;
    c.batch = 2; c.length = 40; c.d_inner = 50; c.d_state = N;
    check_all<Seq, Ch16>(c, seed++);
  }
}

TEST_CASE("CUDA scan matches the reference at model-like sizes", "[cuda][scan]") {
  REQUIRE_GPU();
  std::uint64_t seed = 300;
  struct S { int b, L, D; };
  for (S s : {S{3, 1000, 200}, S{1, 3000, 256}, S{4, 513, 300}, S{2, 2048, 129}}) {
    Case c;
    c.batch = s.b; c.length = s.L; c.d_inner = s.D; c.d_state = 16; c.dt_rank = 64;
    check_all<Seq, Ch64, Ch256, scan::Auto>(c, seed++);
  }
}

TEST_CASE("CUDA Chunked agrees with Sequential", "[cuda][scan]") {
  REQUIRE_GPU();
  Case c;
  c.batch = 2; c.length = 4099; c.d_inner = 384; c.d_state = 16; c.dt_rank = 64;
  Problem const prob(c, 400);
  DeviceProblem dev(prob);
  std::vector<float> o_seq, h_seq, o_ch, h_ch;
  bool pad = false;
  dev.run<Seq>(o_seq, h_seq, &pad);
  dev.run<scan::Chunked<128>>(o_ch, h_ch, &pad);
  CHECK(rel_err(o_ch, o_seq) <= kTol);
  CHECK(rel_err(h_ch, h_seq) <= kTol);
  dev.run<scan::Chunked<1000>>(o_ch, h_ch, &pad);
  CHECK(rel_err(o_ch, o_seq) <= kTol);
  CHECK(rel_err(h_ch, h_seq) <= kTol);
}

TEST_CASE("CUDA scan argument checks and the Auto rule", "[cuda][scan][small]") {
  ssm::SelectiveScanArguments<float> a;
  a.batch = 1; a.length = 4; a.d_inner = 8; a.d_state = 65;
  float dummy = 0;
  a.u = a.delta = a.A = a.B = a.C = &dummy;
  a.out = &dummy;
  a.ld_u = a.ld_delta = a.ld_out = 8;
  a.ld_B = a.ld_C = 65;
  using Op = ssm::SelectiveScan<Cuda, float, Seq>;
  CHECK(Op::can_implement(a) == Status::kUnsupported);
  a.d_state = 64;
  a.ld_B = a.ld_C = 64;
  CHECK(Op::can_implement(a) == Status::kSuccess);
  a.ld_u = 7;
  CHECK(Op::can_implement(a) == Status::kInvalidArgument);
  CHECK_THROWS_AS(Op::run(a, nullptr, Cuda{}), mambabyte::Error);
  // Auto (wave = 132 SMs x 3 blocks): one chunk when the channel blocks fill the wave, else
  // floor(wave / blocks) chunks, multiples of 64 steps, at least 256.
  CHECK(ssm::resolve_auto_cuda(64, 2048, 2048, 396) == 0);
  CHECK(ssm::resolve_auto_cuda(8, 8192, 2048, 396) == 2752);    // 3 chunks
  CHECK(ssm::resolve_auto_cuda(16, 2048, 1536, 396) == 1024);   // 2 chunks
  CHECK(ssm::resolve_auto_cuda(1, 100, 2048, 396) == 0);        // too short
  CHECK(ssm::resolve_auto_cuda(1, 1000, 64, 396) == 256);       // chunks at least 256 long
  int const chunk = ssm::resolve_auto_cuda(1, 65536, 2048, 396);
  CHECK(chunk % 64 == 0);
  CHECK(chunk >= 256);
}

TEST_CASE("CUDA scan: empty batch or length is a no-op", "[cuda][scan][small]") {
  REQUIRE_GPU();
  ssm::SelectiveScanArguments<float> a;
  a.batch = 0; a.length = 10; a.d_inner = 8; a.d_state = 16;
  CHECK(ssm::SelectiveScan<Cuda, float, Seq>::can_implement(a) == Status::kSuccess);
  ssm::SelectiveScan<Cuda, float, Seq>::run(a, nullptr, Cuda{});
  ssm::SelectiveScan<Cuda, float, Ch64>::run(a, Cuda{});
  ssm::SelectiveScan<Cuda, float, scan::Auto>::run(a, Cuda{});
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
}
