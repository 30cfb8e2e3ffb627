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
