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
// optional input on and off, batch 64 x d_inner 2048, a CUDA-graph capture (replayed twice:
// bitwise the direct result), argument checks. Without a GPU the GPU cases are skipped.
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/reference/reference.hpp>

#include <cuda_bf16.h>

#include <catch2/catch.hpp>

#include "cuda_scan_runner.cuh"
#include "cuda_test_util.hpp"
#include "scan_cases.hpp"

#include <cstdint>
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

}  // namespace

TEST_CASE("CUDA decode step equals the scan: small odd shapes", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (auto const& c : mbtest::step_cases()) check_steps_both(c, seed++);
}

TEST_CASE("CUDA decode step: d_state other than 16", "[cuda][step][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (auto const& c : mbtest::step_d_state_cases()) check_steps_both(c, seed++);
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
