// CUDA selective scan, scan::Associative (backend/cuda/selective_scan_associative.cuh): the
// block-level associative scan over time with a carried prefix, float and bf16 storage, against
// the fp64 oracle reference::selective_scan (bf16: evaluated on the bf16-rounded inputs) on odd
// shapes - lengths around the chunk of 512 steps and its warps (1, 2, 31, 32, 33, 257, 1000,
// 4099: several chunks, ragged last chunk), d_inner 1, 3, 130 (partial channel blocks of 8),
// batch 1 and 3, d_state 1, 5, 16, 33 (partial state groups of 8) - with the optional inputs
// (bias, softplus, D, z, initial / final state) and the layouts (B/C inside x_proj rows or two
// arrays, padded rows) switched on and off across the sweep; Associative against Sequential;
// the Associative backward against the Chunked<kAssociativeBackwardSegment> backward it runs,
// bitwise. Outputs start as NaN; padding columns must keep it.
// Needs a GPU to do more than compile: without one every GPU case is skipped (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/reference/reference.hpp>

#include <cuda_bf16.h>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
using mambabyte::backend::cuda::MixedScanArguments;
using mambabyte::backend::cuda::MixedScanBackwardArguments;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;
using bf = __nv_bfloat16;
constexpr int kBwdSeg = mambabyte::backend::cuda::scan_assoc_detail::kAssociativeBackwardSegment;

static_assert(std::is_same_v<ssm::SelectiveScan<Cuda, float, scan::Associative>::Arguments,
                             ssm::SelectiveScanArguments<float>>);
static_assert(std::is_same_v<ssm::SelectiveScan<Cuda, bf, scan::Associative>::Arguments, MixedScanArguments<bf>>);
static_assert(std::is_same_v<ssm::SelectiveScanBackward<Cuda, bf, scan::Associative>::Arguments,
                             MixedScanBackwardArguments<bf>>);

using mbtest::have_gpu;

// ---- bf16 on the host (round to nearest even, as __float2bfloat16_rn) ----
float round_bf(float x) { return mambabyte::bf16::to_float(mambabyte::bf16::from_float(x)); }

template <class TS>
DeviceBuffer<TS> upload(std::vector<float> const& v) {
  std::vector<TS> h(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<TS, float>) {
      h[i] = v[i];
    } else {
      std::uint16_t const bits = mambabyte::bf16::from_float(v[i]);
      std::memcpy(static_cast<void*>(&h[i]), &bits, sizeof bits);
    }
  }
  DeviceBuffer<TS> d(std::max<std::size_t>(v.size(), 1));
  d.copy_from_host(h.data(), h.size());
  return d;
}

template <class TS>
std::vector<float> download(DeviceBuffer<TS> const& d, std::size_t n) {
  std::vector<TS> h(n);
  d.copy_to_host(h.data(), n);
  std::vector<float> r(n);
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<TS, float>) {
      r[i] = h[i];
    } else {
      std::uint16_t bits;
      std::memcpy(&bits, static_cast<void const*>(&h[i]), sizeof bits);
      r[i] = mambabyte::bf16::to_float(bits);
    }
  }
  return r;
}

/// Relative L2 error; NaN in `a` (an unwritten element) fails.
double rel_err(std::vector<float> const& a, std::vector<double> const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    double const d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}
double rel_err(std::vector<float> const& a, std::vector<float> const& b) {
  return rel_err(a, std::vector<double>(b.begin(), b.end()));
}

constexpr double kTolF32 = 1e-5;    ///< float storage: outputs and final state
constexpr double kTolBfOut = 1e-2;  ///< bf16 outputs (one rounding, <= 2^-8 relative each)
constexpr double kTolBfState = 2e-4;  ///< bf16 storage, final state (float; fp32 math only)

/// One problem: shapes, which optional inputs exist, and the layouts.
struct Case {
  int batch = 1, length = 1, d_inner = 1, d_state = 16;
  bool bias = true, softplus = true, D = true, z = true, init = true, final_state = true;
  bool xproj = true;  ///< B, C inside x_proj rows: ld = dt_rank + 2N, offsets dt_rank, dt_rank + N
  int dt_rank = 8;
  int pad = 0;        ///< extra leading-dimension padding of u, delta, z, out
  std::string name() const {
    return "B=" + std::to_string(batch) + " L=" + std::to_string(length) + " D=" + std::to_string(d_inner) +
           " N=" + std::to_string(d_state) + (bias ? " bias" : "") + (softplus ? " softplus" : "") +
           (D ? " D" : "") + (z ? " z" : "") + (init ? " h0" : "") + (final_state ? " hT" : "") +
           (xproj ? " xproj" : " plainBC") + " pad=" + std::to_string(pad);
  }
};

/// A case of the sweep: the optional inputs and layouts switched by the case counter m (every
/// combination of each one on and off occurs many times over the sweep).
Case make_case(int batch, int length, int d_inner, int d_state, int m) {
  Case c;
  c.batch = batch; c.length = length; c.d_inner = d_inner; c.d_state = d_state;
  c.bias = m % 2 == 0;
  c.softplus = m % 3 != 1;
  c.D = m % 5 != 2;
  c.z = m % 7 != 3;
  c.init = (m / 2) % 2 == 0;
  c.final_state = m % 11 != 5;
  c.xproj = m % 3 != 2;
  c.pad = (m % 4 == 1) ? 3 : 0;
  return c;
}

/// Host data of a case; with bf16_inputs the activations (u, delta, z, B, C) hold bf16-exact
/// values, so that the fp64 oracle sees what the bf16 kernel reads.
struct Problem {
  Case c;
  std::int64_t ldx = 0, ldbc = 0, offB = 0, offC = 0;
  std::vector<float> u, delta, bias, A, BC, D, z, h0;

  Problem(Case const& cs, std::uint64_t seed, bool bf16_inputs) : c(cs) {
    std::mt19937_64 rng(seed);
    auto uni = [&](double lo, double hi) { return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)); };
    auto act = [&](float x) { return bf16_inputs ? round_bf(x) : x; };
    std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
    int const N = c.d_state, Di = c.d_inner;
    ldx = Di + c.pad;
    float const nan = std::numeric_limits<float>::quiet_NaN();
    u.assign(rows * ldx, nan);  // padding never read
    delta = u;
    z = u;
    for (std::size_t r = 0; r < rows; ++r)
      for (int d = 0; d < Di; ++d) {
        u[r * ldx + d] = act(uni(-1, 1));
        delta[r * ldx + d] = act(c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2));
        z[r * ldx + d] = act(uni(-3, 3));
      }
    if (c.softplus && rows > 0) delta[0] = 25.f;  // the v > 20 branch once
    bias.resize(Di);
    for (auto& x : bias) x = c.softplus ? uni(-2, 0) : uni(0, 0.05);
    A.resize(static_cast<std::size_t>(Di) * N);
    for (int d = 0; d < Di; ++d)
      for (int n = 0; n < N; ++n)
        A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
    if (c.xproj) {
      ldbc = c.dt_rank + 2 * N;
      offB = c.dt_rank;
      offC = c.dt_rank + N;
      BC.assign(rows * ldbc, nan);  // x_proj's dt columns: never read
      for (std::size_t r = 0; r < rows; ++r)
        for (int j = 0; j < 2 * N; ++j) BC[r * ldbc + offB + j] = act(uni(-1, 1));
    } else {
      ldbc = N;
      offB = 0;
      offC = static_cast<std::int64_t>(rows) * N;
      BC.resize(2 * rows * N);
      for (auto& x : BC) x = act(uni(-1, 1));
    }
    D.resize(Di);
    for (auto& x : D) x = 1.f + uni(-0.1, 0.1);
    h0.resize(state_size());
    for (auto& x : h0) x = uni(-1, 1);
  }

  std::size_t rows() const { return static_cast<std::size_t>(c.batch) * c.length; }
  std::size_t out_size() const { return rows() * ldx; }
  std::size_t state_size() const { return static_cast<std::size_t>(c.batch) * c.d_inner * c.d_state; }

  /// The oracle: outputs (padding 0) and the final state, in double (NaN padding read as 0).
  void reference(std::vector<double>& out, std::vector<double>& hT) const {
    auto clean = [](std::vector<float> const& v) {
      std::vector<double> r(v.begin(), v.end());
      for (auto& x : r)
        if (std::isnan(x)) x = 0;
      return r;
    };
    auto const du = clean(u), ddt = clean(delta), db = clean(bias), dA = clean(A), dBC = clean(BC),
               dD = clean(D), dz = clean(z), dh0 = clean(h0);
    out.assign(out_size(), 0.0);
    hT.assign(state_size(), 0.0);
    ssm::SelectiveScanArguments<double> a;
    a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
    a.u = du.data(); a.ld_u = ldx;
    a.delta = ddt.data(); a.ld_delta = ldx;
    a.delta_bias = c.bias ? db.data() : nullptr;
    a.delta_softplus = c.softplus;
    a.A = dA.data();
    a.B = dBC.data() + offB; a.ld_B = ldbc;
    a.C = dBC.data() + offC; a.ld_C = ldbc;
    a.D = c.D ? dD.data() : nullptr;
    a.z = c.z ? dz.data() : nullptr; a.ld_z = ldx;
    a.out = out.data(); a.ld_out = ldx;
    a.initial_state = c.init ? dh0.data() : nullptr;
    a.final_state = hT.data();
    mambabyte::reference::selective_scan(a);
  }
};

/// Runs SelectiveScan<Cuda, TS, P> on a problem (outputs poisoned with NaN first) and returns
/// the output (padding columns checked to still hold NaN, then set to 0) and the final state
/// (NaN-filled when not requested).
template <class TS, class P>
void run_device(Problem const& pr, std::vector<float>& out, std::vector<float>& hT, bool* pad_ok) {
  auto const& c = pr.c;
  Cuda be{};
  float const nan = std::numeric_limits<float>::quiet_NaN();
  auto u = upload<TS>(pr.u), delta = upload<TS>(pr.delta), z = upload<TS>(pr.z), BC = upload<TS>(pr.BC);
  auto bias = upload<float>(pr.bias), A = upload<float>(pr.A), D = upload<float>(pr.D), h0 = upload<float>(pr.h0);
  auto gout = upload<TS>(std::vector<float>(pr.out_size(), nan));
  auto ghT = upload<float>(std::vector<float>(pr.state_size(), nan));

  using Op = ssm::SelectiveScan<Cuda, TS, P>;
  typename Op::Arguments a;
  a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
  a.u = u.data(); a.ld_u = pr.ldx;
  a.delta = delta.data(); a.ld_delta = pr.ldx;
  a.delta_bias = c.bias ? bias.data() : nullptr;
  a.delta_softplus = c.softplus;
  a.A = A.data();
  a.B = BC.data() + pr.offB; a.ld_B = pr.ldbc;
  a.C = BC.data() + pr.offC; a.ld_C = pr.ldbc;
  a.D = c.D ? D.data() : nullptr;
  a.z = c.z ? z.data() : nullptr; a.ld_z = pr.ldx;
  a.out = gout.data(); a.ld_out = pr.ldx;
  a.initial_state = c.init ? h0.data() : nullptr;
  a.final_state = c.final_state ? ghT.data() : nullptr;

  REQUIRE(Op::can_implement(a) == Status::kSuccess);
  DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be), be);
  Op::run(a, ws.data(), be);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());

  out = download(gout, pr.out_size());
  hT = download(ghT, pr.state_size());
  bool intact = true;
  for (std::size_t r = 0; r < pr.rows(); ++r)
    for (std::int64_t d = c.d_inner; d < pr.ldx; ++d) {
      intact = intact && std::isnan(out[r * pr.ldx + d]);
      out[r * pr.ldx + d] = 0.f;
    }
  *pad_ok = intact;
}

/// Associative with storage TS against the fp64 oracle.
template <class TS>
void check_against_reference(Case const& c, std::uint64_t seed) {
  constexpr bool kBf = std::is_same_v<TS, bf>;
  INFO(c.name() << (kBf ? " bf16" : " float"));
  Problem const pr(c, seed, kBf);
  std::vector<double> ref_out, ref_hT;
  pr.reference(ref_out, ref_hT);
  std::vector<float> out, hT;
  bool pad_ok = false;
  run_device<TS, scan::Associative>(pr, out, hT, &pad_ok);
  CHECK(pad_ok);
  double const e_out = rel_err(out, ref_out);
  INFO("rel err out " << e_out);
  CHECK(e_out <= (kBf ? kTolBfOut : kTolF32));
  if (c.final_state) {
    double const e_h = rel_err(hT, ref_hT);
    INFO("rel err final state " << e_h);
    CHECK(e_h <= (kBf ? kTolBfState : kTolF32));
  }
}

void check_both(Case const& c, std::uint64_t seed) {
  check_against_reference<float>(c, seed);
  check_against_reference<bf>(c, seed);
}

/// Associative against Sequential on the same device inputs: float to kTolF32; bf16 final
/// state (float) to kTolF32, bf16 outputs to 1e-3 (a rounding flip here and there).
template <class TS>
void check_against_sequential(Case const& c, std::uint64_t seed) {
  constexpr bool kBf = std::is_same_v<TS, bf>;
  INFO(c.name() << (kBf ? " bf16" : " float") << " Associative vs Sequential");
  Problem const pr(c, seed, kBf);
  std::vector<float> o_as, h_as, o_seq, h_seq;
  bool pad_as = false, pad_seq = false;
  run_device<TS, scan::Associative>(pr, o_as, h_as, &pad_as);
  run_device<TS, scan::Sequential>(pr, o_seq, h_seq, &pad_seq);
  CHECK(pad_as);
  CHECK(pad_seq);
  double const e_out = rel_err(o_as, o_seq);
  INFO("rel diff out " << e_out);
  CHECK(e_out <= (kBf ? 1e-3 : kTolF32));
  if (c.final_state) {
    double const e_h = rel_err(h_as, h_seq);
    INFO("rel diff final state " << e_h);
    CHECK(e_h <= kTolF32);
  }
}

}  // namespace

TEST_CASE("CUDA Associative scan matches the fp64 reference (reduced sweep)", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  struct S { int b, D, N; };
  std::uint64_t seed = 1;
  int m = 0;
  for (int L : {1, 2, 33, 600}) {
    for (S s : {S{1, 1, 1}, S{3, 3, 5}, S{1, 130, 16}, S{3, 3, 33}}) {
      check_both(make_case(s.b, L, s.D, s.N, m++), seed++);
    }
  }
}

TEST_CASE("CUDA Associative scan matches the fp64 reference on odd shapes", "[cuda][scan][associative]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1000;
  int m = 0;
  for (int L : {1, 2, 31, 32, 33, 257, 1000, 4099})
    for (int Di : {1, 3, 130})
      for (int B : {1, 3})
        for (int N : {1, 5, 16, 33}) check_both(make_case(B, L, Di, N, m++), seed++);
}

TEST_CASE("CUDA Associative scan: every optional input off, then all on", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  Case c;
  c.batch = 2; c.length = 700; c.d_inner = 11; c.d_state = 16;
  c.bias = c.softplus = c.D = c.z = c.init = c.final_state = c.xproj = false;
  check_both(c, 7);
  c.bias = c.softplus = c.D = c.z = c.init = c.final_state = c.xproj = true;
  c.pad = 5;
  check_both(c, 8);
}

TEST_CASE("CUDA Associative agrees with Sequential", "[cuda][scan][associative]") {
  REQUIRE_GPU();
  struct S { int b, L, D, N; };
  std::uint64_t seed = 5000;
  for (S s : {S{2, 4099, 384, 16}, S{3, 1000, 130, 33}, S{1, 33, 3, 5}, S{1, 2049, 64, 64}}) {
    Case c;
    c.batch = s.b; c.length = s.L; c.d_inner = s.D; c.d_state = s.N; c.dt_rank = 64;
    check_against_sequential<float>(c, seed);
    check_against_sequential<bf>(c, seed);
    ++seed;
  }
}

TEST_CASE("CUDA Associative agrees with Sequential (small)", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  Case c;
  c.batch = 2; c.length = 1030; c.d_inner = 19; c.d_state = 16;
  check_against_sequential<float>(c, 6000);
  check_against_sequential<bf>(c, 6001);
}

TEST_CASE("CUDA Associative backward is the Chunked backward, bitwise", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  int const Bt = 2, L = 1000, Di = 70, N = 16;
  std::mt19937_64 rng(77);
  auto uni = [&](double lo, double hi) { return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)); };
  std::size_t const rows = static_cast<std::size_t>(Bt) * L;
  std::int64_t const ldx = Di, ldbc = 8 + 2 * N, offB = 8, offC = 8 + N;
  std::vector<float> u(rows * ldx), delta(rows * ldx), z(rows * ldx), dout(rows * ldx);
  for (std::size_t i = 0; i < u.size(); ++i) {
    u[i] = uni(-1, 1);
    delta[i] = uni(-4, 1.5);
    z[i] = uni(-3, 3);
    dout[i] = uni(-1, 1);
  }
  std::vector<float> bias(Di), A(static_cast<std::size_t>(Di) * N), D(Di), BC(rows * ldbc);
  for (auto& x : bias) x = uni(-2, 0);
  for (int d = 0; d < Di; ++d)
    for (int n = 0; n < N; ++n)
      A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
  for (auto& x : D) x = 1.f + uni(-0.1, 0.1);
  for (auto& x : BC) x = uni(-1, 1);
  std::size_t const S = static_cast<std::size_t>(Bt) * Di * N;
  std::vector<float> h0(S), dhT(S), dA0(A.size()), dD0(Di), dbias0(Di);
  for (auto& x : h0) x = uni(-1, 1);
  for (auto& x : dhT) x = uni(-1, 1);
  for (auto& x : dA0) x = uni(-1, 1);  // accumulated into
  for (auto& x : dD0) x = uni(-1, 1);
  for (auto& x : dbias0) x = uni(-1, 1);

  struct Result {
    std::vector<float> du, ddelta, dBC, dz, dh0, out, dA, dD, dbias;
  };
  auto run = [&](auto policy, std::size_t* ws_bytes) {
    using P = decltype(policy);
    Cuda be{};
    float const nan = std::numeric_limits<float>::quiet_NaN();
    auto gu = upload<float>(u), gdelta = upload<float>(delta), gz = upload<float>(z), gdout = upload<float>(dout);
    auto gBC = upload<float>(BC), gbias = upload<float>(bias), gA = upload<float>(A), gD = upload<float>(D);
    auto gh0 = upload<float>(h0), gdhT = upload<float>(dhT);
    std::vector<float> const poison_x(u.size(), nan), poison_bc(BC.size(), nan), poison_s(S, nan);
    auto gdu = upload<float>(poison_x), gddelta = upload<float>(poison_x), gdz = upload<float>(poison_x),
         gout = upload<float>(poison_x), gdBC = upload<float>(poison_bc), gdh0 = upload<float>(poison_s);
    auto gdA = upload<float>(dA0), gdD = upload<float>(dD0), gdbias = upload<float>(dbias0);
    ssm::SelectiveScanBackwardArguments<float> a;
    a.batch = Bt; a.length = L; a.d_inner = Di; a.d_state = N;
    a.u = gu.data(); a.ld_u = ldx;
    a.delta = gdelta.data(); a.ld_delta = ldx;
    a.delta_bias = gbias.data();
    a.delta_softplus = true;
    a.A = gA.data();
    a.B = gBC.data() + offB; a.ld_B = ldbc;
    a.C = gBC.data() + offC; a.ld_C = ldbc;
    a.D = gD.data();
    a.z = gz.data(); a.ld_z = ldx;
    a.initial_state = gh0.data();
    a.dout = gdout.data(); a.ld_dout = ldx;
    a.dfinal_state = gdhT.data();
    a.du = gdu.data(); a.ld_du = ldx;
    a.ddelta = gddelta.data(); a.ld_ddelta = ldx;
    a.dB = gdBC.data() + offB; a.ld_dB = ldbc;
    a.dC = gdBC.data() + offC; a.ld_dC = ldbc;
    a.dz = gdz.data(); a.ld_dz = ldx;
    a.dinitial_state = gdh0.data();
    a.out = gout.data(); a.ld_out = ldx;
    a.dA = gdA.data();
    a.dD = gdD.data();
    a.ddelta_bias = gdbias.data();
    using Op = ssm::SelectiveScanBackward<Cuda, float, P>;
    REQUIRE(Op::can_implement(a) == Status::kSuccess);
    *ws_bytes = Op::workspace_bytes(a, be);
    DeviceBuffer<std::byte> ws(*ws_bytes, be);
    Op::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    Result r;
    r.du = download(gdu, u.size());
    r.ddelta = download(gddelta, u.size());
    r.dBC = download(gdBC, BC.size());
    r.dz = download(gdz, u.size());
    r.dh0 = download(gdh0, S);
    r.out = download(gout, u.size());
    r.dA = download(gdA, A.size());
    r.dD = download(gdD, D.size());
    r.dbias = download(gdbias, bias.size());
    return r;
  };
  // Bitwise (NaN padding included: x_proj's dt columns of dB / dC stay NaN in both).
  auto same_bits = [](std::vector<float> const& x, std::vector<float> const& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  std::size_t ws_as = 0, ws_ch = 0;
  Result const ra = run(scan::Associative{}, &ws_as);
  Result const rc = run(scan::Chunked<kBwdSeg>{}, &ws_ch);
  CHECK(ws_as == ws_ch);
  CHECK(same_bits(ra.du, rc.du));
  CHECK(same_bits(ra.ddelta, rc.ddelta));
  CHECK(same_bits(ra.dBC, rc.dBC));
  CHECK(same_bits(ra.dz, rc.dz));
  CHECK(same_bits(ra.dh0, rc.dh0));
  CHECK(same_bits(ra.out, rc.out));
  CHECK(same_bits(ra.dA, rc.dA));
  CHECK(same_bits(ra.dD, rc.dD));
  CHECK(same_bits(ra.dbias, rc.dbias));
  // And the results are real numbers (the check above would also pass on two NaN arrays).
  bool finite = true;
  for (float x : ra.du) finite = finite && std::isfinite(x);
  for (float x : ra.dA) finite = finite && std::isfinite(x);
  CHECK(finite);
}

TEST_CASE("CUDA Associative: argument checks, no workspace, empty problems", "[cuda][scan][associative][small]") {
  using Op = ssm::SelectiveScan<Cuda, float, scan::Associative>;
  ssm::SelectiveScanArguments<float> a;
  a.batch = 1; a.length = 4; a.d_inner = 8; a.d_state = 65;
  float dummy = 0;
  a.u = a.delta = a.A = a.B = a.C = &dummy;
  a.out = &dummy;
  a.ld_u = a.ld_delta = a.ld_out = 8;
  a.ld_B = a.ld_C = 65;
  CHECK(Op::can_implement(a) == Status::kUnsupported);
  a.d_state = 64;
  a.ld_B = a.ld_C = 64;
  CHECK(Op::can_implement(a) == Status::kSuccess);
  CHECK(Op::workspace_bytes(a, Cuda{}) == 0);
  a.ld_u = 7;
  CHECK(Op::can_implement(a) == Status::kInvalidArgument);
  CHECK_THROWS_AS(Op::run(a, nullptr, Cuda{}), mambabyte::Error);
  REQUIRE_GPU();
  a.batch = 0;
  a.ld_u = 8;
  Op::run(a, nullptr, Cuda{});
  a.batch = 1;
  a.length = 0;
  Op::run(a, Cuda{});
  MixedScanArguments<bf> m;
  m.batch = 0; m.length = 10; m.d_inner = 8; m.d_state = 16;
  ssm::SelectiveScan<Cuda, bf, scan::Associative>::run(m, nullptr, Cuda{});
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
}
