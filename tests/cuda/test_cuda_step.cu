// CUDA decode step backend::cuda::selective_state_update<T> (T = float, __nv_bfloat16): L steps
// from an initial state, one token per call (inputs read through leading dimensions: step t of
// sequence b at row b*L + t), must give the outputs and the final state of the CUDA scan
// (Sequential, same storage type) on the same inputs, and of the fp64 oracle
// reference::selective_scan evaluated on the storage-rounded inputs: the shared body
// mbtest::check_steps and the case lists of tests/common/scan_cases.hpp (the CPU tests run the
// same with the CPU decode step, the scan over one token with the state in place). Tolerances
// (relative L2, mbtest::CudaScanRunner): float: 1e-5 against the scan and the oracle; bf16:
// outputs 1e-2 (bf16 rounding of the output), state 1e-4 against the scan and 2e-4 against the
// oracle (the state is float, fp32 math).
// Also: d_state 16 fast path and the guarded path (unaligned state / A, other d_state), every
// optional input on and off, batch 8-11 with odd d_inner, batch 64 x d_inner 2048, A given as A_log (bitwise the step given A = -expf(A_log)), a CUDA-graph capture
// (replayed twice: bitwise the direct result), argument checks. Without a GPU the GPU cases are skipped.
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/reference/reference.hpp>

#include <cuda_bf16.h>

#include <catch2/catch.hpp>

#include "cuda_scan_runner.cuh"
#include "cuda_test_util.hpp"
#include "scan_cases.hpp"

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

namespace {

using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::selective_state_update;
using bf = __nv_bfloat16;

void check_steps_both(mbtest::ScanCase const& c, std::uint64_t seed) {
  mbtest::check_steps(mbtest::CudaScanRunner<float>{}, c, seed);
  mbtest::check_steps(mbtest::CudaScanRunner<bf>{}, c, seed);
}

/// The steps captured in a CUDA graph (replayed twice, the state reset first) give bitwise the
/// direct result; both leave the output padding alone.
template <class T>
void check_graph(mbtest::ScanCase const& c, std::uint64_t seed) {
  mbtest::CudaScanRunner<T> const runner;
  INFO(c.name() << " " << runner.name() << " (graph)");
  mbtest::ScanProblem const p(c, seed, runner.precision(), runner.random_param_grads());
  auto direct = runner.steps(p, false);
  auto graphed = runner.steps(p, true);
  CHECK(mbtest::strip_x_padding(p, direct.out));
  CHECK(mbtest::strip_x_padding(p, graphed.out));
  CHECK(mbtest::same_bits(direct.out, graphed.out));  // deterministic kernel, the graph replays reset the state first
  CHECK(mbtest::same_bits(direct.hT, graphed.hT));
}

/// The inputs of a step of (batch, d_inner, d_state) shared by the bitwise comparisons below
/// (T: the storage type the step reads): random u, z, B, C (T), delta bias, D, A_log (float), an
/// initial state h0; run_both runs a step twice from h0 (mode 0 and 1) and checks the two
/// bitwise equal, and that the step moved the state.
template <class T>
struct StepData {
  using Buf = mambabyte::backend::cuda::DeviceBuffer<T>;
  using FBuf = mambabyte::backend::cuda::DeviceBuffer<float>;
  std::mt19937_64 g;
  int batch, d_inner, d_state;
  std::size_t x, bc, ns, na;
  Buf u, z, B, C;
  FBuf bias, D, a_log;
  std::vector<float> h0;

  std::vector<float> vec(std::size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& e : v) e = d(g);
    return v;
  }
  static std::vector<T> to_t(std::vector<float> const& v) {
    std::vector<T> h(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
      if constexpr (std::is_same_v<T, float>) h[i] = v[i];
      else h[i] = __float2bfloat16_rn(v[i]);
    }
    return h;
  }
  static float to_f(T v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return __bfloat162float(v);
  }
  template <class E>
  static mambabyte::backend::cuda::DeviceBuffer<E> up(std::vector<E> const& h) {
    mambabyte::backend::cuda::DeviceBuffer<E> d(h.size());
    d.copy_from_host(h.data(), h.size());
    return d;
  }
  Buf dev(std::size_t n, float lo, float hi) { return up(to_t(vec(n, lo, hi))); }

  StepData(int batch_, int d_inner_, int d_state_, std::uint64_t seed)
      : g(seed), batch(batch_), d_inner(d_inner_), d_state(d_state_),
        x(static_cast<std::size_t>(batch_) * d_inner_), bc(static_cast<std::size_t>(batch_) * d_state_),
        ns(x * d_state_), na(static_cast<std::size_t>(d_inner_) * d_state_) {
    u = dev(x, -1.f, 1.f);
    z = dev(x, -2.f, 2.f);
    B = dev(bc, -1.f, 1.f);
    C = dev(bc, -1.f, 1.f);
    bias = up(vec(d_inner, -0.5f, 0.5f));
    D = up(vec(d_inner, -1.f, 1.f));
    a_log = up(vec(na, -1.f, 2.5f));
    h0 = vec(ns, -1.f, 1.f);
  }

  /// step(mode, state, out) for mode 0 and 1, each from h0.
  template <class F>
  void run_both(F&& step) {
    std::vector<float> state[2];
    std::vector<T> out[2];
    for (int mode = 0; mode < 2; ++mode) {
      auto st = up(h0);
      Buf y(x);
      step(mode, st.data(), y.data());
      MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
      state[mode].resize(ns);
      st.copy_to_host(state[mode].data(), ns);
      out[mode].resize(x);
      y.copy_to_host(out[mode].data(), x);
    }
    CHECK(std::memcmp(state[0].data(), state[1].data(), ns * sizeof(float)) == 0);
    CHECK(std::memcmp(out[0].data(), out[1].data(), x * sizeof(T)) == 0);
    bool moved = false;
    for (std::size_t i = 0; i < ns; ++i) moved = moved || state[0][i] != h0[i];
    CHECK(moved);
  }
};

__global__ void neg_exp_kernel(float const* a_log, float* A, int n) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) A[i] = -expf(a_log[i]);
}

/// selective_state_update with A_is_log (A_log given, A = -expf(A_log) inside the kernel) is
/// bitwise the step given A = -expf(A_log) computed by a separate kernel (as the model did),
/// on the float4 path (d_state 16, aligned) and the guarded one (d_state 5).
template <class T>
void check_a_log(int batch, int d_inner, int d_state, std::uint64_t seed) {
  INFO("A_is_log batch=" << batch << " d_inner=" << d_inner << " d_state=" << d_state);
  StepData<T> in(batch, d_inner, d_state, seed);
  auto dt = in.dev(in.x, -2.f, 1.f);
  mambabyte::backend::cuda::DeviceBuffer<float> A(in.na);
  neg_exp_kernel<<<static_cast<unsigned>((in.na + 127) / 128), 128>>>(in.a_log.data(), A.data(),
                                                                      static_cast<int>(in.na));
  Cuda const be{};
  in.run_both([&](int mode, float* st, T* y) {
    selective_state_update<T>(be, batch, d_inner, d_state, st, in.u.data(), d_inner, dt.data(), d_inner,
                              in.bias.data(), true, mode ? in.a_log.data() : A.data(), in.B.data(), d_state,
                              in.C.data(), d_state, in.D.data(), in.z.data(), d_inner, y, d_inner,
                              /*A_is_log=*/mode == 1);
  });
}

/// selective_state_update with a DeltaProjection (dt_proj inside the kernel) is bitwise the step
/// given delta = round_T(x W^T) computed on the host in the kernel's order (each of a channel's
/// 4 threads sums a quarter of the rank with fmaf: a contiguous quarter on the vector path, every
/// 4th element otherwise; the quarters added as (q0 + q1) + (q2 + q3)). x rows are read through
/// ld_x > rank (x_proj's output rows), on both load paths.
template <class T>
void check_delta_projection(int batch, int d_inner, int d_state, int rank, int ld_x, bool vec, std::uint64_t seed) {
  INFO("delta projection batch=" << batch << " d_inner=" << d_inner << " d_state=" << d_state << " rank=" << rank
                                 << " ld_x=" << ld_x << " vec=" << vec);
  StepData<T> in(batch, d_inner, d_state, seed);
  auto const xh = StepData<T>::to_t(in.vec(static_cast<std::size_t>(batch) * ld_x, -1.f, 1.f));
  auto const wh = StepData<T>::to_t(in.vec(static_cast<std::size_t>(d_inner) * rank, -0.3f, 0.3f));
  // the kernel's sums, replicated on the host
  std::vector<float> dth(in.x);
  for (int b = 0; b < batch; ++b)
    for (int d = 0; d < d_inner; ++d) {
      auto term = [&](int r, float s) {
        return std::fma(StepData<T>::to_f(wh[static_cast<std::size_t>(d) * rank + r]),
                        StepData<T>::to_f(xh[static_cast<std::size_t>(b) * ld_x + r]), s);
      };
      float q[4];
      for (int sub = 0; sub < 4; ++sub) {
        float s = 0.f;
        if (vec) {
          for (int r = sub * (rank / 4); r < (sub + 1) * (rank / 4); ++r) s = term(r, s);
        } else {
          for (int r = sub; r < rank; r += 4) s = term(r, s);
        }
        q[sub] = s;
      }
      dth[static_cast<std::size_t>(b) * d_inner + d] = (q[0] + q[1]) + (q[2] + q[3]);
    }
  auto x = StepData<T>::up(xh), W = StepData<T>::up(wh), dt = StepData<T>::up(StepData<T>::to_t(dth));
  Cuda const be{};
  in.run_both([&](int mode, float* st, T* y) {
    mambabyte::backend::cuda::DeltaProjection<T> proj;
    if (mode == 1) {
      proj.x = x.data(); proj.ld_x = ld_x; proj.W = W.data(); proj.rank = rank;
    }
    selective_state_update<T>(be, batch, d_inner, d_state, st, in.u.data(), d_inner,
                              mode == 1 ? static_cast<T const*>(nullptr) : dt.data(), d_inner, in.bias.data(), true,
                              in.a_log.data(), in.B.data(), d_state, in.C.data(), d_state, in.D.data(), in.z.data(),
                              d_inner, y, d_inner, /*A_is_log=*/true, proj);
  });
}

}  // namespace

TEST_CASE("CUDA decode step: A given as A_log equals A given", "[cuda][step][small]") {
  REQUIRE_GPU();
  check_a_log<float>(3, 40, 16, 400);
  check_a_log<float>(2, 37, 5, 401);
  check_a_log<bf>(64, 2048, 16, 402);
  check_a_log<bf>(1, 19, 7, 403);
  check_a_log<float>(9, 37, 5, 404);
}

TEST_CASE("CUDA decode step equals the scan: small odd shapes", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (auto const& c : mbtest::step_cases()) check_steps_both(c, seed++);
}

TEST_CASE("CUDA decode step: dt_proj inside the kernel equals delta given", "[cuda][step][small]") {
  REQUIRE_GPU();
  check_delta_projection<bf>(64, 2048, 16, 64, 96, true, 410);   // the 353M model's step at batch 64
  check_delta_projection<bf>(1, 2048, 16, 64, 96, true, 411);
  check_delta_projection<float>(5, 200, 16, 64, 96, true, 412);  // fp32: 4 floats per 16-byte load
  check_delta_projection<bf>(3, 37, 5, 5, 21, false, 413);       // rank 5: the scalar path
  check_delta_projection<float>(9, 40, 16, 40, 52, false, 414);  // rank 40: 10 floats per thread, the scalar path
  check_delta_projection<bf>(4, 64, 16, 64, 100, false, 415);    // rank fits, but rows of 100 bf16 are not 16-byte aligned
}

TEST_CASE("CUDA decode step: d_state other than 16", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (auto const& c : mbtest::step_d_state_cases()) check_steps_both(c, seed++);
}

TEST_CASE("CUDA decode step: batch 8-11, odd d_inner, both load paths", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 150;
  for (int batch : {8, 9, 11}) {
    mbtest::ScanCase c;
    c.batch = batch; c.length = 3; c.d_inner = 37; c.d_state = 16;
    check_steps_both(c, seed++);
    c.misalign = true; c.z = batch != 9; c.D = batch != 11;  // the guarded path
    check_steps_both(c, seed++);
    c.misalign = false; c.d_state = 5; c.bias = batch != 8;
    check_steps_both(c, seed++);
  }
}

TEST_CASE("CUDA decode step: batch 64 x d_inner 2048", "[cuda][step]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 64; c.length = 3; c.d_inner = 2048; c.d_state = 16;
  mbtest::check_steps(mbtest::CudaScanRunner<float>{}, c, 200);
  mbtest::check_steps(mbtest::CudaScanRunner<bf>{}, c, 201);
  c.batch = 1; c.length = 8;
  mbtest::check_steps(mbtest::CudaScanRunner<float>{}, c, 202);
  mbtest::check_steps(mbtest::CudaScanRunner<bf>{}, c, 203);
}

TEST_CASE("CUDA decode step inside a CUDA graph", "[cuda][step][small]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 6; c.d_inner = 130; c.d_state = 16;
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

// ---- the layer-by-layer step's conv + x_proj kernel (decode_conv_xproj.cuh) ----------------------

namespace {

/// conv_xproj_step against the conv kernel (conv1d_forward over one step with a state: u and the
/// new state bitwise equal) and x_proj replicated on the host in the kernel's order (per split of
/// 128 channels four fmaf chains, chain k over the 16-byte chunks k, k + 4, ... of channels, added
/// as (0 + 1) + (2 + 3); the splits added in order; rounded to T: bitwise), and against a double-precision sum (sanity). Launched three
/// times from the same inputs, the output zeroed in between: the counters are back at zero after
/// each launch (else no block would write the output).
template <class T>
void check_conv_xproj(int batch, int d_inner, int width, int X, bool bias, std::uint64_t seed) {
  INFO("conv_xproj batch=" << batch << " d_inner=" << d_inner << " width=" << width << " X=" << X
                           << " bias=" << bias);
  using SD = StepData<T>;
  namespace bc = mambabyte::backend::cuda;
  SD in(1, 1, 1, seed);  // its random generator and conversions only
  std::size_t const ld_x = 2 * static_cast<std::size_t>(d_inner);  // in_proj's rows: x then z
  std::size_t const nst = static_cast<std::size_t>(batch) * (width - 1) * d_inner;
  auto const xh = SD::to_t(in.vec(static_cast<std::size_t>(batch) * ld_x, -2.f, 2.f));
  auto const cw = in.vec(static_cast<std::size_t>(d_inner) * width, -0.7f, 0.7f);
  auto const cb = in.vec(static_cast<std::size_t>(d_inner), -0.3f, 0.3f);
  auto const st0 = in.vec(nst, -1.5f, 1.5f);
  auto const wh = SD::to_t(in.vec(static_cast<std::size_t>(X) * d_inner, -0.3f, 0.3f));
  auto x = SD::up(xh), W = SD::up(wh);
  auto cwd = SD::up(cw), cbd = SD::up(cb);
  std::size_t const nu = static_cast<std::size_t>(batch) * d_inner, no = static_cast<std::size_t>(batch) * X;
  Cuda const be{};
  // the conv kernel's step: the reference u and state
  bc::DeviceBuffer<float> st_ref(std::max<std::size_t>(nst, 1));
  if (nst) st_ref.copy_from_host(st0.data(), nst);
  bc::DeviceBuffer<T> u_ref(nu);
  bc::conv1d_forward<T>(be, batch, 1, d_inner, width, x.data(), static_cast<std::int64_t>(ld_x), cwd.data(),
                        bias ? cbd.data() : nullptr, u_ref.data(), d_inner, nst ? st_ref.data() : nullptr, true);
  std::vector<T> uh(nu);
  std::vector<float> sth(nst);
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
  u_ref.copy_to_host(uh.data(), nu);
  if (nst) st_ref.copy_to_host(sth.data(), nst);
  // x_proj in the kernel's order, and in double
  std::vector<T> want(no);
  std::vector<double> exact(no), mag(no);
  int const splits = (d_inner + 127) / 128;
  constexpr int E = 16 / static_cast<int>(sizeof(T));  // channels per 16-byte chunk
  for (int b = 0; b < batch; ++b)
    for (int j = 0; j < X; ++j) {
      float t = 0.f;
      double e = 0, m = 0;
      for (int q = 0; q < splits; ++q) {
        int const c0 = 128 * q, cn = std::min(128, d_inner - c0);
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        for (int k = 0; k < 4; ++k)
          for (int ch = k; ch * E < cn; ch += 4)
            for (int c = c0 + E * ch; c < c0 + std::min(cn, E * ch + E); ++c) {
              float const wv = SD::to_f(wh[static_cast<std::size_t>(j) * d_inner + c]);
              float const uv = SD::to_f(uh[static_cast<std::size_t>(b) * d_inner + c]);
              s[k] = std::fma(wv, uv, s[k]);
              e += double(wv) * uv;
              m += std::fabs(double(wv) * uv);
            }
        t += (s[0] + s[1]) + (s[2] + s[3]);
      }
      want[static_cast<std::size_t>(b) * X + j] = SD::to_t({t})[0];
      exact[static_cast<std::size_t>(b) * X + j] = e;
      mag[static_cast<std::size_t>(b) * X + j] = m;
    }
  bc::DeviceBuffer<float> part(std::max<std::size_t>(bc::conv_xproj_partial_floats(batch, d_inner, X), 1));
  std::size_t const ncount = bc::conv_xproj_counters(batch, d_inner);
  bc::DeviceBuffer<unsigned> count(ncount);
  bc::conv_xproj_reset(be, count.data(), ncount);
  bc::DeviceBuffer<float> st(std::max<std::size_t>(nst, 1));
  bc::DeviceBuffer<T> u(nu), out(no);
  for (int run = 0; run < 3; ++run) {
    CAPTURE(run);
    if (nst) st.copy_from_host(st0.data(), nst);
    MAMBABYTE_CUDA_CHECK(cudaMemset(out.data(), 0, no * sizeof(T)));
    MAMBABYTE_CUDA_CHECK(cudaMemset(u.data(), 0, nu * sizeof(T)));
    bc::conv_xproj_step<T>(be, batch, d_inner, width, x.data(), static_cast<std::int64_t>(ld_x), cwd.data(),
                           bias ? cbd.data() : nullptr, nst ? st.data() : nullptr, u.data(), d_inner, W.data(), X,
                           out.data(), X, part.data(), count.data());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> ug(nu), og(no);
    std::vector<float> sg(nst);
    u.copy_to_host(ug.data(), nu);
    out.copy_to_host(og.data(), no);
    if (nst) st.copy_to_host(sg.data(), nst);
    CHECK(std::memcmp(ug.data(), uh.data(), nu * sizeof(T)) == 0);
    CHECK(std::memcmp(sg.data(), sth.data(), nst * sizeof(float)) == 0);
    CHECK(std::memcmp(og.data(), want.data(), no * sizeof(T)) == 0);
    double worst = 0;  // against the double sum, in units of the terms' magnitude
    for (std::size_t i = 0; i < no; ++i)
      worst = std::max(worst, std::fabs(SD::to_f(og[i]) - exact[i]) / (mag[i] + 1e-30));
    CAPTURE(worst);
    CHECK(worst < (std::is_same_v<T, float> ? 1e-5 : 8e-3));
  }
  std::vector<unsigned> ch(ncount);
  count.copy_to_host(ch.data(), ncount);
  CHECK(std::all_of(ch.begin(), ch.end(), [](unsigned v) { return v == 0u; }));
}

}  // namespace

TEST_CASE("CUDA decode conv + x_proj step equals the conv kernel and x_proj in its order", "[cuda][step][small]") {
  REQUIRE_GPU();
  struct Shape {
    int batch, d_inner, width, X;
    bool bias;
  };
  // the 353M shape at batch 1 and 64 (16 splits; 1 and 4 batch rows per block), odd d_inner (a
  // partial last split; 130: the scalar W path), width 1 (no state) and 5, x_proj widths that are
  // not multiples of 4, batch 130 (one row per block), 17 splits (more than the partials the last
  // block loads at once); partial last row groups: batch 33 (2 rows per block, the last group 1),
  // 130 x 2048 (8 rows, the last group 2; width 2), 301 x 260 (3 rows, the last group 1; a partial split)
  for (Shape s : {Shape{1, 2048, 4, 96, true}, Shape{64, 2048, 4, 96, true}, Shape{3, 200, 4, 37, false},
                  Shape{9, 130, 1, 5, true}, Shape{17, 260, 5, 40, true}, Shape{130, 136, 3, 12, false},
                  Shape{2, 2176, 4, 20, true}, Shape{33, 2048, 4, 96, true}, Shape{130, 2048, 2, 96, false},
                  Shape{301, 260, 5, 40, true}}) {
    check_conv_xproj<float>(s.batch, s.d_inner, s.width, s.X, s.bias, 900 + s.batch);
    check_conv_xproj<bf>(s.batch, s.d_inner, s.width, s.X, s.bias, 950 + s.batch);
  }
}

TEST_CASE("CUDA decode conv + x_proj step: argument checks", "[cuda][step][small]") {
  namespace bc = mambabyte::backend::cuda;
  Cuda const be{};
  float f = 0;
  unsigned c = 0;
  CHECK_THROWS_AS(bc::conv_xproj_step<float>(be, 1, 0, 4, &f, 8, &f, nullptr, &f, &f, 8, &f, 4, &f, 4, &f, &c),
                  mambabyte::Error);  // d_inner 0
  CHECK_THROWS_AS(bc::conv_xproj_step<float>(be, 1, 8, 0, &f, 8, &f, nullptr, &f, &f, 8, &f, 4, &f, 4, &f, &c),
                  mambabyte::Error);  // width 0
  CHECK_THROWS_AS(bc::conv_xproj_step<float>(be, 1, 8, 4, &f, 8, &f, nullptr, &f, &f, 8, &f, 4, &f, 4, nullptr, &c),
                  mambabyte::Error);  // no workspace
  CHECK_THROWS_AS(bc::conv_xproj_step<float>(be, 2, 8, 4, &f, 4, &f, nullptr, &f, &f, 8, &f, 4, &f, 4, &f, &c),
                  mambabyte::Error);  // ld_x < d_inner with batch > 1
  CHECK_THROWS_AS(bc::conv_xproj_step<float>(be, 1, 8, 4, &f, 8, &f, nullptr, nullptr, &f, 8, &f, 4, &f, 4, &f, &c),
                  mambabyte::Error);  // width > 1 without a state
  bc::conv_xproj_step<float>(be, 0, 8, 4, nullptr, 0, nullptr, nullptr, nullptr, nullptr, 0, nullptr, 4, nullptr, 0,
                             nullptr, nullptr);  // batch 0: nothing to do
}
