// CUDA decode step backend::cuda::selective_state_update<T> (T = float, __nv_bfloat16): L steps
// from an initial state, one token per call (inputs read through leading dimensions: step t of
// sequence b at row b*L + t), must give the outputs and the final state of the CUDA scan
// (Sequential, same storage type) on the same inputs, and of the fp64 oracle
// reference::selective_scan evaluated on the storage-rounded inputs. Tolerances (relative L2):
// float: 1e-5 against the scan and the oracle; bf16: outputs 1e-2 (bf16 rounding of the output),
// state 1e-4 against the scan and 2e-4 against the oracle (the state is float, fp32 math).
// Also: d_state 16 fast path and the guarded path (unaligned state / A, other d_state), every
// optional input on and off, batch 64 x d_inner 2048, a CUDA-graph capture (replayed twice:
// bitwise the direct result), argument checks. Without a GPU the GPU cases are skipped.
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
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
#include <type_traits>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
using mambabyte::backend::cuda::selective_state_update;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;
using bf = __nv_bfloat16;

using mbtest::have_gpu;

/// Host <-> storage type T (bf16: round to nearest even).
template <class T>
T to_t(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    std::uint16_t const bits = mambabyte::bf16::from_float(x);
    T r;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  }
}
template <class T>
float from_t(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    std::uint16_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return mambabyte::bf16::to_float(bits);
  }
}
template <class T>
float round_t(float x) { return from_t<T>(to_t<T>(x)); }

template <class T>
DeviceBuffer<T> upload(std::vector<float> const& v, std::size_t extra = 0) {
  std::vector<T> h(v.size() + extra, to_t<T>(0.f));
  for (std::size_t i = 0; i < v.size(); ++i) h[i + extra] = to_t<T>(v[i]);
  DeviceBuffer<T> d(std::max<std::size_t>(h.size(), 1));
  d.copy_from_host(h.data(), h.size());
  return d;
}
template <class T>
std::vector<float> download(DeviceBuffer<T> const& d, std::size_t n, std::size_t offset = 0) {
  std::vector<T> h(n + offset);
  d.copy_to_host(h.data(), n + offset);
  std::vector<float> r(n);
  for (std::size_t i = 0; i < n; ++i) r[i] = from_t<T>(h[i + offset]);
  return r;
}

double rel_err(std::vector<float> const& a, std::vector<double> const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    double const d = static_cast<double>(a[i]) - b[i];
    num += d * d;  // NaN (an unwritten element) fails
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}
double rel_err(std::vector<float> const& a, std::vector<float> const& b) {
  return rel_err(a, std::vector<double>(b.begin(), b.end()));
}

struct Case {
  int batch = 1, steps = 1, d_inner = 1, d_state = 16;
  bool bias = true, softplus = true, D = true, z = true;
  bool xproj = true;     ///< B, C inside x_proj rows (ld = 8 + 2N), else two arrays (ld = N)
  int pad = 0;           ///< padding of the u / delta / z / out rows
  bool misalign = false; ///< state and A one float off 16-byte alignment (guarded path)
  std::string name() const {
    return "B=" + std::to_string(batch) + " T=" + std::to_string(steps) + " D=" + std::to_string(d_inner) +
           " N=" + std::to_string(d_state) + (bias ? " bias" : "") + (softplus ? " softplus" : "") +
           (D ? " D" : "") + (z ? " z" : "") + (xproj ? " xproj" : "") + " pad=" + std::to_string(pad) +
           (misalign ? " misaligned" : "");
  }
};

template <class T>
struct Tol;
template <>
struct Tol<float> {
  static constexpr double out_scan = 1e-5, state_scan = 1e-5, out_ref = 1e-5, state_ref = 1e-5;
};
template <>
struct Tol<bf> {
  static constexpr double out_scan = 1e-2, state_scan = 1e-4, out_ref = 1e-2, state_ref = 2e-4;
};

template <class T>
struct StepRun {
  Case c;
  std::int64_t ldx = 0, ldbc = 0, offB = 0, offC = 0;
  std::vector<float> u, delta, bias, A, BC, D, z, h0;
  std::vector<double> ref_out, ref_hT;
  std::vector<float> scan_out, scan_hT, step_out, step_hT;

  StepRun(Case const& cs, std::uint64_t seed) : c(cs) {
    std::mt19937_64 rng(seed);
    auto uni = [&](double lo, double hi) { return static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)); };
    std::size_t const rows = static_cast<std::size_t>(c.batch) * c.steps;
    int const N = c.d_state, Di = c.d_inner;
    ldx = Di + c.pad;
    u.assign(rows * ldx, 0.f);
    delta = u;
    z = u;
    for (std::size_t r = 0; r < rows; ++r)
      for (int d = 0; d < Di; ++d) {
        u[r * ldx + d] = round_t<T>(uni(-1, 1));
        delta[r * ldx + d] = round_t<T>(c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2));
        z[r * ldx + d] = round_t<T>(uni(-3, 3));
      }
    if (c.softplus && rows > 0) delta[0] = 25.f;  // the v > 20 branch once
    bias.resize(Di);
    for (auto& x : bias) x = c.softplus ? uni(-2, 0) : uni(0, 0.05);
    A.resize(static_cast<std::size_t>(Di) * N);
    for (int d = 0; d < Di; ++d)
      for (int n = 0; n < N; ++n)
        A[static_cast<std::size_t>(d) * N + n] = static_cast<float>(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
    if (c.xproj) {
      ldbc = 8 + 2 * N; offB = 8; offC = 8 + N;
      BC.assign(rows * ldbc, 0.f);
    } else {
      ldbc = N; offB = 0; offC = static_cast<std::int64_t>(rows) * N;
      BC.assign(2 * rows * N, 0.f);
    }
    for (auto& x : BC) x = round_t<T>(uni(-1, 1));
    D.resize(Di);
    for (auto& x : D) x = 1.f + uni(-0.1, 0.1);
    h0.resize(static_cast<std::size_t>(c.batch) * Di * N);
    for (auto& x : h0) x = uni(-1, 1);
  }

  std::size_t rows() const { return static_cast<std::size_t>(c.batch) * c.steps; }
  std::size_t state_size() const { return static_cast<std::size_t>(c.batch) * c.d_inner * c.d_state; }

  void reference() {
    auto dbl = [](std::vector<float> const& v) { return std::vector<double>(v.begin(), v.end()); };
    auto const du = dbl(u), ddt = dbl(delta), db = dbl(bias), dA = dbl(A), dBC = dbl(BC), dD = dbl(D),
               dz = dbl(z), dh0 = dbl(h0);
    ref_out.assign(rows() * ldx, 0.0);
    ref_hT.assign(state_size(), 0.0);
    ssm::SelectiveScanArguments<double> a;
    a.batch = c.batch; a.length = c.steps; a.d_inner = c.d_inner; a.d_state = c.d_state;
    a.u = du.data(); a.ld_u = ldx;
    a.delta = ddt.data(); a.ld_delta = ldx;
    a.delta_bias = c.bias ? db.data() : nullptr;
    a.delta_softplus = c.softplus;
    a.A = dA.data();
    a.B = dBC.data() + offB; a.ld_B = ldbc;
    a.C = dBC.data() + offC; a.ld_C = ldbc;
    a.D = c.D ? dD.data() : nullptr;
    a.z = c.z ? dz.data() : nullptr; a.ld_z = ldx;
    a.out = ref_out.data(); a.ld_out = ldx;
    a.initial_state = dh0.data();
    a.final_state = ref_hT.data();
    mambabyte::reference::selective_scan(a);
  }

  /// Runs the CUDA scan and the steps (directly, or captured in a CUDA graph replayed twice).
  void run_device(bool graph) {
    std::size_t const off = c.misalign ? 1 : 0;  // floats: breaks 16-byte alignment
    std::size_t const X = rows() * ldx, S = state_size();
    auto gu = upload<T>(u), gdelta = upload<T>(delta), gz = upload<T>(z), gBC = upload<T>(BC);
    auto gbias = upload<float>(bias), gA = upload<float>(A, off), gD = upload<float>(D), gh0 = upload<float>(h0);
    float const nan = std::numeric_limits<float>::quiet_NaN();
    auto gscan_out = upload<T>(std::vector<float>(X, nan)), gstep_out = upload<T>(std::vector<float>(X, nan));
    auto gscan_hT = upload<float>(std::vector<float>(S, nan));
    auto gstate = upload<float>(std::vector<float>(S, nan), off);
    float* const state = gstate.data() + off;
    float const* const Ap = gA.data() + off;

    // The scan, same storage type.
    {
      using Op = ssm::SelectiveScan<Cuda, T, scan::Sequential>;
      typename Op::Arguments a{};
      a.batch = c.batch; a.length = c.steps; a.d_inner = c.d_inner; a.d_state = c.d_state;
      a.u = gu.data(); a.ld_u = ldx;
      a.delta = gdelta.data(); a.ld_delta = ldx;
      a.delta_bias = c.bias ? gbias.data() : nullptr;
      a.delta_softplus = c.softplus;
      a.A = Ap;
      a.B = gBC.data() + offB; a.ld_B = ldbc;
      a.C = gBC.data() + offC; a.ld_C = ldbc;
      a.D = c.D ? gD.data() : nullptr;
      a.z = c.z ? gz.data() : nullptr; a.ld_z = ldx;
      a.out = gscan_out.data(); a.ld_out = ldx;
      a.initial_state = gh0.data();
      a.final_state = gscan_hT.data();
      REQUIRE(Op::can_implement(a) == Status::kSuccess);
      Op::run(a, Cuda{});
    }

    // The steps: step t of sequence b reads row b*L + t, i.e. base + t*ld with leading
    // dimension L*ld.
    cudaStream_t stream = nullptr;
    if (graph) MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    Cuda const be{stream, 0};
    std::int64_t const L = c.steps;
    auto enqueue = [&] {
      MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(state, gh0.data(), S * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      for (int t = 0; t < c.steps; ++t) {
        selective_state_update<T>(be, c.batch, c.d_inner, c.d_state, state, gu.data() + t * ldx, L * ldx,
                                  gdelta.data() + t * ldx, L * ldx, c.bias ? gbias.data() : nullptr, c.softplus,
                                  Ap, gBC.data() + offB + t * ldbc, L * ldbc, gBC.data() + offC + t * ldbc,
                                  L * ldbc, c.D ? gD.data() : nullptr, c.z ? gz.data() + t * ldx : nullptr,
                                  L * ldx, gstep_out.data() + t * ldx, L * ldx);
      }
    };
    if (graph) {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t exec = nullptr;
      MAMBABYTE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      enqueue();
      MAMBABYTE_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
      MAMBABYTE_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
      for (int rep = 0; rep < 2; ++rep) MAMBABYTE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(stream));
      MAMBABYTE_CUDA_CHECK(cudaGraphExecDestroy(exec));
      MAMBABYTE_CUDA_CHECK(cudaGraphDestroy(g));
      MAMBABYTE_CUDA_CHECK(cudaStreamDestroy(stream));
    } else {
      enqueue();
    }
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    scan_out = download<T>(gscan_out, X);
    step_out = download<T>(gstep_out, X);
    scan_hT = download<float>(gscan_hT, S);
    step_hT = download<float>(gstate, S, off);
  }

  /// Padding columns of the outputs: must still be NaN; zeroed for the comparisons.
  bool strip_padding() {
    bool ok = true;
    for (auto* v : {&scan_out, &step_out})
      for (std::size_t r = 0; r < rows(); ++r)
        for (std::int64_t d = c.d_inner; d < ldx; ++d) {
          ok = ok && std::isnan((*v)[r * ldx + d]);
          (*v)[r * ldx + d] = 0.f;
        }
    return ok;
  }
};

template <class T>
void check_steps(Case const& c, std::uint64_t seed) {
  INFO(c.name() << (std::is_same_v<T, float> ? " float" : " bf16"));
  StepRun<T> r(c, seed);
  r.reference();
  r.run_device(false);
  CHECK(r.strip_padding());
  double const e1 = rel_err(r.step_out, r.scan_out), e2 = rel_err(r.step_hT, r.scan_hT);
  double const e3 = rel_err(r.step_out, r.ref_out), e4 = rel_err(r.step_hT, r.ref_hT);
  INFO("step vs scan: out " << e1 << " state " << e2 << "; step vs oracle: out " << e3 << " state " << e4);
  CHECK(e1 <= Tol<T>::out_scan);
  CHECK(e2 <= Tol<T>::state_scan);
  CHECK(e3 <= Tol<T>::out_ref);
  CHECK(e4 <= Tol<T>::state_ref);
}

template <class T>
void check_graph(Case const& c, std::uint64_t seed) {
  INFO(c.name() << (std::is_same_v<T, float> ? " float" : " bf16") << " (graph)");
  StepRun<T> direct(c, seed), graphed(c, seed);
  direct.run_device(false);
  graphed.run_device(true);
  CHECK(direct.strip_padding());
  CHECK(graphed.strip_padding());
  bool same = true;
  for (std::size_t i = 0; i < direct.step_out.size(); ++i) same = same && direct.step_out[i] == graphed.step_out[i];
  for (std::size_t i = 0; i < direct.step_hT.size(); ++i) same = same && direct.step_hT[i] == graphed.step_hT[i];
  CHECK(same);  // deterministic kernel, the graph replays reset the state first
}

}  // namespace

TEST_CASE("CUDA decode step equals the scan: small odd shapes", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (int Di : {1, 37, 130}) {
    for (int mask = 0; mask < 8; ++mask) {
      Case c;
      c.batch = (mask & 1) ? 3 : 1;
      c.steps = (mask & 2) ? 5 : 1;
      c.d_inner = Di;
      c.bias = !(mask & 4);
      c.softplus = mask != 6;
      c.D = (mask & 3) != 1;
      c.z = mask != 3;
      c.xproj = mask & 2;
      c.pad = (mask & 4) ? 3 : 0;
      c.misalign = mask == 5 || mask == 2;
      check_steps<float>(c, seed);
      check_steps<bf>(c, seed++);
    }
  }
}

TEST_CASE("CUDA decode step: d_state other than 16", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (int N : {1, 5, 16, 17, 33, 64}) {
    Case c;
    c.batch = 2; c.steps = 4; c.d_inner = 70; c.d_state = N; c.pad = 1;
    c.xproj = N % 2;
    c.misalign = N == 16;
    check_steps<float>(c, seed);
    check_steps<bf>(c, seed++);
  }
}

TEST_CASE("CUDA decode step: batch 64 x d_inner 2048", "[cuda][step]") {
  REQUIRE_GPU();
  Case c;
  c.batch = 64; c.steps = 3; c.d_inner = 2048; c.d_state = 16;
  check_steps<float>(c, 200);
  check_steps<bf>(c, 201);
  c.batch = 1; c.steps = 8;
  check_steps<float>(c, 202);
  check_steps<bf>(c, 203);
}

TEST_CASE("CUDA decode step inside a CUDA graph", "[cuda][step][small]") {
  REQUIRE_GPU();
  Case c;
  c.batch = 2; c.steps = 6; c.d_inner = 130; c.d_state = 16;
  check_graph<float>(c, 300);
  check_graph<bf>(c, 301);
}

TEST_CASE("CUDA decode step: argument checks", "[cuda][step][small]") {
  float f = 0;
  bf h{};
  Cuda const be{};
  // d_state > 64, bad shapes and null pointers are refused before any CUDA call.
  CHECK_THROWS_AS(selective_state_update<float>(be, 1, 8, 65, &f, &f, 8, &f, 8, nullptr, true, &f, &f, 65, &f, 65,
                                                nullptr, nullptr, 0, &f, 8),
                  mambabyte::Error);
  CHECK_THROWS_AS(selective_state_update<bf>(be, 1, 0, 16, &f, &h, 8, &h, 8, nullptr, true, &f, &h, 16, &h, 16,
                                             nullptr, nullptr, 0, &h, 8),
                  mambabyte::Error);
  CHECK_THROWS_AS(selective_state_update<bf>(be, 2, 8, 16, &f, nullptr, 8, &h, 8, nullptr, true, &f, &h, 16, &h,
                                             16, nullptr, nullptr, 0, &h, 8),
                  mambabyte::Error);
  CHECK_THROWS_AS(selective_state_update<float>(be, 2, 8, 16, &f, &f, 4, &f, 8, nullptr, true, &f, &f, 16, &f, 16,
                                                nullptr, nullptr, 0, &f, 8),
                  mambabyte::Error);  // ld_u < d_inner with batch > 1
  // batch 0: nothing to do, no CUDA call.
  selective_state_update<float>(be, 0, 8, 16, nullptr, nullptr, 0, nullptr, 0, nullptr, true, nullptr, nullptr, 0,
                                nullptr, 0, nullptr, nullptr, 0, nullptr, 0);
}
