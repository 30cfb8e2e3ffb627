// CUDA selective scan, forward and backward, with bf16 storage (ssm::SelectiveScan /
// SelectiveScanBackward<backend::Cuda, __nv_bfloat16, Policy>, MixedScan[Backward]Arguments):
// activations and activation gradients bf16, parameters, states and parameter gradients float,
// fp32 math. Every policy against the fp64 oracles (reference::selective_scan; the CPU backward
// in double) evaluated ON THE bf16-ROUNDED INPUTS, so the tolerances only cover fp32 arithmetic
// and the rounding of the bf16 outputs: relative L2 error <= 1e-2 for bf16 outputs (one
// rounding: <= 2^-8 per element), <= 2e-4 for the forward's final state (float), <= 1e-3 for
// the backward's float outputs (dinitial_state, dA, dD, ddelta_bias).
// Layouts: both load paths of the forward are covered: rows 16-byte aligned (leading
// dimensions multiples of 8: 16-byte cp.async with a zero-filled ragged tail) and not (plain
// loads), for u / delta / z and for B / C separately. Outputs start as NaN; the padding of
// padded rows and x_proj's dt columns must keep it.
// Needs a GPU to do more than compile: without one every GPU case is skipped (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/backend/cpu/selective_scan_backward.hpp>
#include <mambabyte/reference/reference.hpp>

#include <cuda_bf16.h>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
using mambabyte::backend::cuda::MixedScanArguments;
using mambabyte::backend::cuda::MixedScanBackwardArguments;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;
namespace backend = mambabyte::backend;
using bf = __nv_bfloat16;

static_assert(std::is_same_v<ssm::SelectiveScan<Cuda, bf, scan::Sequential>::Arguments, MixedScanArguments<bf>>);
static_assert(std::is_same_v<ssm::SelectiveScanBackward<Cuda, bf, scan::Auto>::Arguments,
                             MixedScanBackwardArguments<bf>>);
static_assert(std::is_same_v<ssm::SelectiveScan<Cuda, float, scan::Chunked<64>>::Arguments,
                             ssm::SelectiveScanArguments<float>>);

using mbtest::have_gpu;

// ---- bf16 on the host (round to nearest even, as __float2bfloat16_rn) ----
bf to_bf(float x) {
  std::uint16_t const bits = mambabyte::bf16::from_float(x);
  bf r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}
float from_bf(bf x) {
  std::uint16_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return mambabyte::bf16::to_float(bits);
}
float round_bf(float x) { return mambabyte::bf16::to_float(mambabyte::bf16::from_float(x)); }

DeviceBuffer<bf> upload_bf(std::vector<float> const& v) {
  std::vector<bf> h(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) h[i] = to_bf(v[i]);
  DeviceBuffer<bf> d(std::max<std::size_t>(v.size(), 1));
  d.copy_from_host(h.data(), h.size());
  return d;
}
DeviceBuffer<float> upload_f(std::vector<float> const& v) {
  DeviceBuffer<float> d(std::max<std::size_t>(v.size(), 1));
  d.copy_from_host(v.data(), v.size());
  return d;
}
std::vector<float> download_bf(DeviceBuffer<bf> const& d, std::size_t n) {
  std::vector<bf> h(n);
  d.copy_to_host(h.data(), n);
  std::vector<float> r(n);
  for (std::size_t i = 0; i < n; ++i) r[i] = from_bf(h[i]);
  return r;
}
std::vector<float> download_f(DeviceBuffer<float> const& d, std::size_t n) {
  std::vector<float> r(n);
  d.copy_to_host(r.data(), n);
  return r;
}
std::vector<double> dbl(std::vector<float> const& v) { return std::vector<double>(v.begin(), v.end()); }

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

constexpr double kTolAct = 1e-2;    ///< bf16 outputs (one rounding, <= 2^-8 relative each)
constexpr double kTolState = 2e-4;  ///< forward final state (float; fp32 math only)
constexpr double kTolParam = 1e-3;  ///< backward float outputs (dinitial_state, dA, dD, dbias)

// =============================================================================================
// Forward
// =============================================================================================

struct FwdCase {
  int batch = 1, length = 1, d_inner = 1, d_state = 16;
  bool bias = true, softplus = true, D = true, z = true, init = true, final_state = true;
  bool xproj = true;  ///< B, C inside x_proj rows (ld = dt_rank + 2N + bc_pad), else two arrays (ld = N + bc_pad)
  int dt_rank = 8;
  int bc_pad = 0;
  int pad = 0;        ///< padding of the u / delta / z / out rows
  std::string name() const {
    return "B=" + std::to_string(batch) + " L=" + std::to_string(length) + " D=" + std::to_string(d_inner) +
           " N=" + std::to_string(d_state) + (bias ? " bias" : "") + (softplus ? " softplus" : "") +
           (D ? " D" : "") + (z ? " z" : "") + (init ? " h0" : "") + (final_state ? " hT" : "") +
           (xproj ? " xproj(dt_rank=" + std::to_string(dt_rank) + ")" : " plainBC") +
           " bc_pad=" + std::to_string(bc_pad) + " pad=" + std::to_string(pad);
  }
};

/// Pads rows to a multiple of 8 elements (16 bytes of bf16) when `aligned`, else to an ld that
/// is not a multiple of 8.
int pad_for(int d_inner, bool aligned) {
  if (aligned) return (8 - d_inner % 8) % 8;
  return d_inner % 8 == 0 ? 1 : 0;
}

struct FwdProblem {
  FwdCase c;
  std::int64_t ldx = 0, ldbc = 0, offB = 0, offC = 0;
  std::vector<float> u, delta, bias, A, BC, D, z, h0;  // activations hold bf16-exact values

  FwdProblem(FwdCase const& cs, std::uint64_t seed) : c(cs) {
    std::mt19937_64 rng(seed);
    auto uni = [&](double lo, double hi) { return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)); };
    std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
    int const N = c.d_state, Di = c.d_inner;
    ldx = Di + c.pad;
    float const nan = std::numeric_limits<float>::quiet_NaN();
    u.assign(rows * ldx, nan);
    delta = u;
    z = u;
    for (std::size_t r = 0; r < rows; ++r)
      for (int d = 0; d < Di; ++d) {
        u[r * ldx + d] = round_bf(uni(-1, 1));
        delta[r * ldx + d] = round_bf(c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2));
        z[r * ldx + d] = round_bf(uni(-3, 3));
      }
    if (c.softplus && rows > 0) delta[0] = 25.f;  // the v > 20 branch once
    bias.resize(Di);
    for (auto& x : bias) x = c.softplus ? uni(-2, 0) : uni(0, 0.05);
    A.resize(static_cast<std::size_t>(Di) * N);
    for (int d = 0; d < Di; ++d)
      for (int n = 0; n < N; ++n)
        A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
    if (c.xproj) {
      ldbc = c.dt_rank + 2 * N + c.bc_pad;
      offB = c.dt_rank;
      offC = c.dt_rank + N;
      BC.assign(rows * ldbc, nan);
      for (std::size_t r = 0; r < rows; ++r)
        for (int j = 0; j < 2 * N; ++j) BC[r * ldbc + offB + j] = round_bf(uni(-1, 1));
    } else {
      ldbc = N + c.bc_pad;
      offB = 0;
      offC = static_cast<std::int64_t>(rows) * ldbc;
      BC.assign(2 * rows * ldbc, nan);
      for (std::size_t r = 0; r < 2 * rows; ++r)
        for (int n = 0; n < N; ++n) BC[r * ldbc + n] = round_bf(uni(-1, 1));
    }
    D.resize(Di);
    for (auto& x : D) x = 1.f + uni(-0.1, 0.1);
    h0.resize(static_cast<std::size_t>(c.batch) * Di * N);
    for (auto& x : h0) x = uni(-1, 1);
  }

  std::size_t rows() const { return static_cast<std::size_t>(c.batch) * c.length; }
  std::size_t out_size() const { return rows() * ldx; }
  std::size_t state_size() const { return static_cast<std::size_t>(c.batch) * c.d_inner * c.d_state; }
  bool vec_x() const { return ldx % 8 == 0; }  // device buffers are cudaMalloc'd (256-byte aligned)
  bool vec_bc() const { return ldbc % 8 == 0 && offB % 8 == 0 && offC % 8 == 0; }

  /// fp64 oracle on the (bf16-exact) inputs; padding / dt columns read as 0 (never used).
  void reference(std::vector<double>& out, std::vector<double>& hT) const {
    auto clean = [](std::vector<float> const& v) {
      std::vector<double> r(v.begin(), v.end());
      for (auto& x : r) if (std::isnan(x)) x = 0;
      return r;
    };
    auto const du = clean(u), ddt = clean(delta), db = dbl(bias), dA = dbl(A), dBC = clean(BC), dD = dbl(D),
               dz = clean(z), dh0 = dbl(h0);
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

template <class P>
void check_fwd(FwdCase const& c, std::uint64_t seed) {
  FwdProblem const pr(c, seed);
  INFO(c.name() << " policy " << P::name << " vec_x " << pr.vec_x() << " vec_bc " << pr.vec_bc());
  std::vector<double> ref_out, ref_hT;
  pr.reference(ref_out, ref_hT);

  Cuda be{};
  float const nan = std::numeric_limits<float>::quiet_NaN();
  auto u = upload_bf(pr.u), delta = upload_bf(pr.delta), z = upload_bf(pr.z), BC = upload_bf(pr.BC);
  auto bias = upload_f(pr.bias), A = upload_f(pr.A), D = upload_f(pr.D), h0 = upload_f(pr.h0);
  auto out = upload_bf(std::vector<float>(pr.out_size(), nan));
  auto hT = upload_f(std::vector<float>(pr.state_size(), nan));

  MixedScanArguments<bf> a;
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
  a.out = out.data(); a.ld_out = pr.ldx;
  a.initial_state = c.init ? h0.data() : nullptr;
  a.final_state = c.final_state ? hT.data() : nullptr;

  using Op = ssm::SelectiveScan<Cuda, bf, P>;
  REQUIRE(Op::can_implement(a) == Status::kSuccess);
  DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be), be);
  Op::run(a, ws.data(), be);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());

  auto got = download_bf(out, pr.out_size());
  bool pad_ok = true;
  for (std::size_t r = 0; r < pr.rows(); ++r)
    for (std::int64_t d = c.d_inner; d < pr.ldx; ++d) {
      pad_ok = pad_ok && std::isnan(got[r * pr.ldx + d]);
      got[r * pr.ldx + d] = 0.f;
    }
  CHECK(pad_ok);
  double const e_out = rel_err(got, ref_out);
  INFO("rel err out " << e_out);
  CHECK(e_out <= kTolAct);
  if (c.final_state) {
    double const e_h = rel_err(download_f(hT, pr.state_size()), ref_hT);
    INFO("rel err final state " << e_h);
    CHECK(e_h <= kTolState);
  }
}

template <class... Ps>
void check_fwd_all(FwdCase const& c, std::uint64_t seed) {
  (check_fwd<Ps>(c, seed), ...);
}

using Seq = scan::Sequential;
using Ch16 = scan::Chunked<16>;
using Ch64 = scan::Chunked<64>;
using Ch256 = scan::Chunked<256>;

// =============================================================================================
// Backward
// =============================================================================================

struct BwdCase {
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

template <class P>
void check_bwd(BwdCase const& c, std::uint64_t seed) {
  INFO(c.name() << " policy " << P::name);
  std::mt19937_64 rng(seed);
  auto uni = [&](double lo, double hi) { return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)); };
  std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
  int const N = c.d_state, Di = c.d_inner;
  std::int64_t const ldx = Di + c.pad;
  float const nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> u(rows * ldx, nan), delta = u, z = u, dout = u;
  for (std::size_t r = 0; r < rows; ++r)
    for (int d = 0; d < Di; ++d) {
      u[r * ldx + d] = round_bf(uni(-1, 1));
      delta[r * ldx + d] = round_bf(c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2));
      z[r * ldx + d] = round_bf(uni(-3, 3));
      dout[r * ldx + d] = round_bf(uni(-1, 1));
    }
  if (c.softplus && rows > 1) delta[ldx] = 25.f;  // the v > 20 branch once
  std::vector<float> bias(Di), A(static_cast<std::size_t>(Di) * N), D(Di);
  for (auto& x : bias) x = c.softplus ? uni(-2, 0) : uni(0, 0.05);
  for (int d = 0; d < Di; ++d)
    for (int n = 0; n < N; ++n)
      A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
  for (auto& x : D) x = 1.f + uni(-0.1, 0.1);
  std::int64_t ldbc, offB, offC;
  std::vector<float> BC;
  if (c.xproj) { ldbc = 8 + 2 * N; offB = 8; offC = 8 + N; BC.assign(rows * ldbc, nan); }
  else { ldbc = N; offB = 0; offC = static_cast<std::int64_t>(rows) * N; BC.assign(2 * rows * N, nan); }
  for (std::size_t r = 0; r < rows; ++r)
    for (int n = 0; n < N; ++n) {
      BC[offB + r * ldbc + n] = round_bf(uni(-1, 1));
      BC[offC + r * ldbc + n] = round_bf(uni(-1, 1));
    }
  std::size_t const S = static_cast<std::size_t>(c.batch) * Di * N;
  std::vector<float> h0(S), dhT(S), dA0(A.size()), dD0(Di), dbias0(Di);
  for (auto& x : h0) x = uni(-1, 1);
  for (auto& x : dhT) x = uni(-1, 1);
  for (auto& x : dA0) x = uni(-1, 1);  // accumulated into
  for (auto& x : dD0) x = uni(-1, 1);
  for (auto& x : dbias0) x = uni(-1, 1);
  std::size_t const X = u.size();

  // --- CPU oracle in double on the same (bf16-exact) values ---
  auto clean = [](std::vector<float> const& v) {
    std::vector<double> r(v.begin(), v.end());
    for (auto& x : r) if (std::isnan(x)) x = 0;
    return r;
  };
  std::vector<double> ru = clean(u), rdelta = clean(delta), rz = clean(z), rdout = clean(dout), rBC = clean(BC),
                      rbias = dbl(bias), rA = dbl(A), rD = dbl(D), rh0 = dbl(h0), rdhT = dbl(dhT);
  std::vector<double> rdu(X, 0), rddelta(X, 0), rdBC(BC.size(), 0), rdz(X, 0), rdh0(S, 0), rout(X, 0),
      rdA = dbl(dA0), rdD = dbl(dD0), rdbias = dbl(dbias0);
  {
    ssm::SelectiveScanBackwardArguments<double> a;
    a.batch = c.batch; a.length = c.length; a.d_inner = Di; a.d_state = N;
    a.u = ru.data(); a.ld_u = ldx;
    a.delta = rdelta.data(); a.ld_delta = ldx;
    a.delta_bias = c.bias ? rbias.data() : nullptr;
    a.delta_softplus = c.softplus;
    a.A = rA.data();
    a.B = rBC.data() + offB; a.ld_B = ldbc;
    a.C = rBC.data() + offC; a.ld_C = ldbc;
    a.D = c.D ? rD.data() : nullptr;
    a.z = c.z ? rz.data() : nullptr; a.ld_z = ldx;
    a.initial_state = c.init ? rh0.data() : nullptr;
    a.dout = rdout.data(); a.ld_dout = ldx;
    a.dfinal_state = c.dfinal ? rdhT.data() : nullptr;
    a.du = rdu.data(); a.ld_du = ldx;
    a.ddelta = rddelta.data(); a.ld_ddelta = ldx;
    a.dB = rdBC.data() + offB; a.ld_dB = ldbc;
    a.dC = rdBC.data() + offC; a.ld_dC = ldbc;
    a.dz = c.z ? rdz.data() : nullptr; a.ld_dz = ldx;
    a.dinitial_state = c.dinit ? rdh0.data() : nullptr;
    a.out = c.out ? rout.data() : nullptr; a.ld_out = ldx;
    a.dA = rdA.data();
    a.dD = c.D ? rdD.data() : nullptr;
    a.ddelta_bias = c.bias ? rdbias.data() : nullptr;
    using CpuOp = ssm::SelectiveScanBackward<backend::Cpu, double, scan::Sequential>;
    REQUIRE(CpuOp::can_implement(a) == Status::kSuccess);
    CpuOp::run(a, backend::Cpu{1});
  }

  // --- device, bf16 storage ---
  Cuda be{};
  auto gu = upload_bf(u), gdelta = upload_bf(delta), gz = upload_bf(z), gdout = upload_bf(dout), gBC = upload_bf(BC);
  auto gbias = upload_f(bias), gA = upload_f(A), gD = upload_f(D), gh0 = upload_f(h0), gdhT = upload_f(dhT);
  std::vector<float> poison_x(X, nan), poison_bc(BC.size(), nan), poison_s(S, nan);
  auto gdu = upload_bf(poison_x), gddelta = upload_bf(poison_x), gdz = upload_bf(poison_x), gout = upload_bf(poison_x);
  auto gdBC = upload_bf(poison_bc);
  auto gdh0 = upload_f(poison_s);
  auto gdA = upload_f(dA0), gdD = upload_f(dD0), gdbias = upload_f(dbias0);
  MixedScanBackwardArguments<bf> a;
  a.batch = c.batch; a.length = c.length; a.d_inner = Di; a.d_state = N;
  a.u = gu.data(); a.ld_u = ldx;
  a.delta = gdelta.data(); a.ld_delta = ldx;
  a.delta_bias = c.bias ? gbias.data() : nullptr;
  a.delta_softplus = c.softplus;
  a.A = gA.data();
  a.B = gBC.data() + offB; a.ld_B = ldbc;
  a.C = gBC.data() + offC; a.ld_C = ldbc;
  a.D = c.D ? gD.data() : nullptr;
  a.z = c.z ? gz.data() : nullptr; a.ld_z = ldx;
  a.initial_state = c.init ? gh0.data() : nullptr;
  a.dout = gdout.data(); a.ld_dout = ldx;
  a.dfinal_state = c.dfinal ? gdhT.data() : nullptr;
  a.du = gdu.data(); a.ld_du = ldx;
  a.ddelta = gddelta.data(); a.ld_ddelta = ldx;
  a.dB = gdBC.data() + offB; a.ld_dB = ldbc;
  a.dC = gdBC.data() + offC; a.ld_dC = ldbc;
  a.dz = c.z ? gdz.data() : nullptr; a.ld_dz = ldx;
  a.dinitial_state = c.dinit ? gdh0.data() : nullptr;
  a.out = c.out ? gout.data() : nullptr; a.ld_out = ldx;
  a.dA = gdA.data();
  a.dD = c.D ? gdD.data() : nullptr;
  a.ddelta_bias = c.bias ? gdbias.data() : nullptr;
  using Op = ssm::SelectiveScanBackward<Cuda, bf, P>;
  REQUIRE(Op::can_implement(a) == Status::kSuccess);
  DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be), be);
  Op::run(a, ws.data(), be);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());

  bool pad_ok = true;
  auto strip = [&](std::vector<float>& v) {
    for (std::size_t r = 0; r < rows; ++r)
      for (std::int64_t d = Di; d < ldx; ++d) {
        pad_ok = pad_ok && std::isnan(v[r * ldx + d]);
        v[r * ldx + d] = 0.f;
      }
  };
  {
    auto g = download_bf(gdu, X); strip(g);
    INFO("du"); CHECK(rel_err(g, rdu) <= kTolAct);
  }
  {
    auto g = download_bf(gddelta, X); strip(g);
    INFO("ddelta"); CHECK(rel_err(g, rddelta) <= kTolAct);
  }
  {
    auto g = download_bf(gdBC, BC.size());
    std::vector<float> gb, gc;
    std::vector<double> rb, rc;
    for (std::size_t r = 0; r < rows; ++r) {
      if (c.xproj)
        for (int j = 0; j < 8; ++j) pad_ok = pad_ok && std::isnan(g[r * ldbc + j]);  // dt columns untouched
      for (int n = 0; n < N; ++n) {
        gb.push_back(g[offB + r * ldbc + n]); rb.push_back(rdBC[offB + r * ldbc + n]);
        gc.push_back(g[offC + r * ldbc + n]); rc.push_back(rdBC[offC + r * ldbc + n]);
      }
    }
    INFO("dB"); CHECK(rel_err(gb, rb) <= kTolAct);
    INFO("dC"); CHECK(rel_err(gc, rc) <= kTolAct);
  }
  if (c.z) { auto g = download_bf(gdz, X); strip(g); INFO("dz"); CHECK(rel_err(g, rdz) <= kTolAct); }
  if (c.out) { auto g = download_bf(gout, X); strip(g); INFO("out"); CHECK(rel_err(g, rout) <= kTolAct); }
  if (c.dinit) { INFO("dh0"); CHECK(rel_err(download_f(gdh0, S), rdh0) <= kTolParam); }
  { INFO("dA"); CHECK(rel_err(download_f(gdA, A.size()), rdA) <= kTolParam); }
  if (c.D) { INFO("dD"); CHECK(rel_err(download_f(gdD, Di), rdD) <= kTolParam); }
  if (c.bias) { INFO("dbias"); CHECK(rel_err(download_f(gdbias, Di), rdbias) <= kTolParam); }
  CHECK(pad_ok);
}

}  // namespace

// ---- forward ----

TEST_CASE("bf16 CUDA scan matches the fp64 reference on small odd shapes", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (int L : {1, 2, 17, 100}) {
    for (int Di : {1, 37, 130}) {
      for (bool aligned : {true, false}) {
        FwdCase c;
        c.batch = (L == 17) ? 3 : 2; c.length = L; c.d_inner = Di; c.d_state = 16;
        c.pad = pad_for(Di, aligned);
        c.dt_rank = aligned ? 8 : 5;  // x_proj ld 40 (aligned) or 37
        check_fwd_all<Seq, Ch16, Ch64, scan::Auto>(c, seed++);
      }
    }
  }
}

TEST_CASE("bf16 CUDA scan: optional inputs off, layouts, padded rows", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (int mask = 0; mask < 8; ++mask) {
    FwdCase c;
    c.batch = 2; c.length = 45; c.d_inner = 70; c.d_state = 16;
    c.bias = mask & 1; c.D = mask & 2; c.z = mask & 4;
    c.init = !(mask & 1); c.final_state = (mask != 3);
    c.softplus = (mask != 5);
    c.xproj = (mask % 3 != 0);
    c.bc_pad = c.xproj ? 0 : ((mask & 2) ? 0 : 3);  // plain B/C: ld 16 (aligned) or 19
    c.pad = pad_for(c.d_inner, mask & 1);            // ld 72 (aligned) or 70
    // x_proj ld 8 + 32: aligned; ragged x_proj columns (dt_rank 3): not.
    c.dt_rank = (mask & 4) ? 8 : 3;
    check_fwd_all<Seq, Ch16>(c, seed++);
  }
}

TEST_CASE("bf16 CUDA scan: d_state other than 16 (general path)", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 200;
  for (int N : {1, 5, 33, 64}) {
    for (bool aligned : {true, false}) {
      FwdCase c;
      c.batch = 2; c.length = 40; c.d_inner = 50; c.d_state = N;
      c.pad = pad_for(c.d_inner, aligned);
      c.xproj = !aligned;                               // aligned: plain arrays, rows padded to 8
      c.bc_pad = aligned ? (8 - N % 8) % 8 : 0;
      c.dt_rank = 3;
      check_fwd_all<Seq, Ch16>(c, seed++);
    }
  }
}

TEST_CASE("bf16 CUDA scan matches the reference at model-like sizes", "[cuda][scan][bf16]") {
  REQUIRE_GPU();
  std::uint64_t seed = 300;
  struct S { int b, L, D; };
  for (S s : {S{3, 1000, 200}, S{1, 3000, 256}, S{4, 513, 300}, S{2, 2048, 129}}) {
    FwdCase c;
    c.batch = s.b; c.length = s.L; c.d_inner = s.D; c.d_state = 16; c.dt_rank = 64;
    c.pad = pad_for(s.D, true);
    check_fwd_all<Seq, Ch64, Ch256, scan::Auto>(c, seed++);
  }
}

TEST_CASE("bf16 CUDA scan: argument checks, empty problems", "[cuda][scan][bf16][small]") {
  MixedScanArguments<bf> a;
  a.batch = 1; a.length = 4; a.d_inner = 8; a.d_state = 65;
  bf dummy{};
  float fdummy = 0;
  a.u = a.delta = a.B = a.C = &dummy;
  a.out = &dummy;
  a.A = &fdummy;
  a.ld_u = a.ld_delta = a.ld_out = 8;
  a.ld_B = a.ld_C = 65;
  using Op = ssm::SelectiveScan<Cuda, bf, Seq>;
  CHECK(Op::can_implement(a) == Status::kUnsupported);
  a.d_state = 64;
  a.ld_B = a.ld_C = 64;
  CHECK(Op::can_implement(a) == Status::kSuccess);
  a.ld_u = 7;
  CHECK(Op::can_implement(a) == Status::kInvalidArgument);
  CHECK_THROWS_AS(Op::run(a, nullptr, Cuda{}), mambabyte::Error);
  MixedScanBackwardArguments<bf> g;
  g.batch = 1; g.length = 4; g.d_inner = 4; g.d_state = 16;
  using BOp = ssm::SelectiveScanBackward<Cuda, bf, Seq>;
  CHECK(BOp::can_implement(g) == Status::kInvalidArgument);  // no A / dA
  g.A = &fdummy; g.dA = &fdummy; g.d_state = 33; g.batch = 0;
  CHECK(BOp::can_implement(g) == Status::kUnsupported);
  REQUIRE_GPU();
  MixedScanArguments<bf> e;
  e.batch = 0; e.length = 10; e.d_inner = 8; e.d_state = 16;
  ssm::SelectiveScan<Cuda, bf, Seq>::run(e, Cuda{});
  ssm::SelectiveScan<Cuda, bf, Ch64>::run(e, Cuda{});
  ssm::SelectiveScan<Cuda, bf, scan::Auto>::run(e, Cuda{});
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
}

// ---- backward ----

TEST_CASE("bf16 CUDA scan backward: odd shapes, every option", "[cuda][backward][bf16][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1000;
  for (int L : {1, 9, 33}) {
    for (int Di : {1, 37, 130}) {
      for (int mask : {0, 1, 2, 3, 4, 5, 6, 7}) {
        BwdCase c;
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
        check_bwd<scan::Sequential>(c, seed++);
        if (L > 8) {
          check_bwd<scan::Chunked<16>>(c, seed++);
          check_bwd<scan::Chunked<20>>(c, seed++);
        }
      }
    }
  }
}

TEST_CASE("bf16 CUDA scan backward: 16-byte rows, channel-block and tile edges", "[cuda][backward][bf16][small]") {
  // ld a multiple of 8 bf16: 16-byte cp.async for u / delta / dout / z (d_inner 72: a second
  // 64-channel block with 8 channels; 68 + pad 4: a partial 16-byte group); B / C rows of
  // x_proj (ld 40 bf16 = 80 bytes) also 16-byte; segments of 8, 12, 20 steps and Auto.
  REQUIRE_GPU();
  std::uint64_t seed = 4000;
  for (int Di : {64, 68, 72}) {
    for (int L : {4, 37, 64}) {
      BwdCase c;
      c.batch = 2; c.length = L; c.d_inner = Di;
      c.pad = (8 - Di % 8) % 8 + 8;
      c.xproj = (L != 37);
      check_bwd<scan::Sequential>(c, seed++);
      check_bwd<scan::Chunked<8>>(c, seed++);
      check_bwd<scan::Chunked<12>>(c, seed++);
      check_bwd<scan::Chunked<20>>(c, seed++);
      check_bwd<scan::Auto>(c, seed++);
    }
  }
}

TEST_CASE("bf16 CUDA scan backward: general d_state", "[cuda][backward][bf16][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 2000;
  for (int N : {1, 5, 17, 32}) {
    BwdCase c;
    c.batch = 2; c.length = 21; c.d_inner = 70; c.d_state = N; c.pad = 1;
    check_bwd<scan::Sequential>(c, seed++);
    check_bwd<scan::Chunked<8>>(c, seed++);
  }
}

TEST_CASE("bf16 CUDA scan backward: model-like sizes, policies", "[cuda][backward][bf16]") {
  REQUIRE_GPU();
  BwdCase c;
  c.batch = 2; c.length = 1000; c.d_inner = 200;
  check_bwd<scan::Sequential>(c, 3007);
  check_bwd<scan::Auto>(c, 3008);
  check_bwd<scan::Chunked<64>>(c, 3009);
  c.batch = 1; c.length = 3001; c.d_inner = 129; c.xproj = false;
  check_bwd<scan::Auto>(c, 3010);  // 3 channel blocks: Auto picks time segments
}
