// CUDA selective scan, scan::Associative (backend/cuda/selective_scan_associative.cuh): the
// block-level associative scan over time with a carried prefix, float and bf16 storage, against
// the fp64 oracle reference::selective_scan (bf16: evaluated on the bf16-rounded inputs) with the
// shared body check_forward and the case lists of tests/common/scan_cases.hpp (the CPU tests run
// the same body for their Associative): lengths around the chunk of 512 steps and its warps (1,
// 2, 31, 32, 33, 257, 1000, 4099: several chunks, ragged last chunk), d_inner 1, 3, 130
// (partial channel blocks of 8), batch 1 and 3, d_state 1, 5, 16, 33 (partial state groups of
// 8) - with the optional inputs (bias, softplus, D, z, initial / final state) and the layouts
// (B/C inside x_proj rows or two arrays, padded rows) switched on and off across the sweep; the
// CPU tests' shapes and the length sweep; a scan resumed from a carried state; Associative
// against Sequential; the Associative backward against the CPU double backward and against the
// Chunked<kAssociativeBackwardSegment> backward it runs, bitwise. Outputs start as NaN; padding
// columns must keep it.
// Needs a GPU to do more than compile: without one every GPU case is skipped (label `cuda`).
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
#include <type_traits>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
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

/// Associative against the fp64 oracle, float storage (1e-5) and bf16 storage (outputs 1e-2,
/// final state 2e-4): the tolerances of mbtest::CudaScanRunner.
void check_both(mbtest::ScanCase const& c, std::uint64_t seed) {
  mbtest::check_forward<scan::Associative>(mbtest::CudaScanRunner<float>{}, c, seed);
  mbtest::check_forward<scan::Associative>(mbtest::CudaScanRunner<bf>{}, c, seed);
}

/// Associative against Sequential on the same device inputs: float to 1e-5; bf16 final state
/// (float) to 1e-5, bf16 outputs to 1e-3 (a rounding flip here and there).
void check_against_sequential(mbtest::ScanCase const& c, std::uint64_t seed_float, std::uint64_t seed_bf16) {
  mbtest::check_policies_agree<scan::Associative, scan::Sequential>(mbtest::CudaScanRunner<float>{}, c, seed_float);
  mbtest::check_policies_agree<scan::Associative, scan::Sequential>(mbtest::CudaScanRunner<bf>{}, c, seed_bf16);
}

}  // namespace

TEST_CASE("CUDA Associative scan matches the fp64 reference (reduced sweep)", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (auto const& c : mbtest::associative_sweep(true)) check_both(c, seed++);
}

TEST_CASE("CUDA Associative scan matches the fp64 reference on odd shapes", "[cuda][scan][associative]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1000;
  for (auto const& c : mbtest::associative_sweep(false)) check_both(c, seed++);
}

TEST_CASE("CUDA Associative scan: the CPU tests' shapes and the length sweep", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 2000;
  for (auto const& list : {mbtest::classic_forward_cases(), mbtest::length_sweep_cases()})
    for (auto const& c : list) check_both(c, seed++);
}

TEST_CASE("CUDA Associative scan: every optional input off, then all on", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 700; c.d_inner = 11; c.d_state = 16;
  c.bias = c.softplus = c.D = c.z = c.init = c.final_state = false;
  c.bc = mbtest::BcLayout::kPlain;
  check_both(c, 7);
  c.bias = c.softplus = c.D = c.z = c.init = c.final_state = true;
  c.bc = mbtest::BcLayout::kRows;
  c.pad = 5;
  check_both(c, 8);
}

TEST_CASE("CUDA Associative scan resumed from a carried state equals one long scan", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 3000;
  for (auto const& [c, split] : mbtest::resume_cases()) {
    mbtest::check_resume<scan::Associative>(mbtest::CudaScanRunner<float>{}, c, split, seed);
    mbtest::check_resume<scan::Associative>(mbtest::CudaScanRunner<bf>{}, c, split, seed++);
  }
}

TEST_CASE("CUDA Associative agrees with Sequential", "[cuda][scan][associative]") {
  REQUIRE_GPU();
  struct S { int b, L, D, N; };
  std::uint64_t seed = 5000;
  for (S s : {S{2, 4099, 384, 16}, S{3, 1000, 130, 33}, S{1, 33, 3, 5}, S{1, 2049, 64, 64}}) {
    mbtest::ScanCase c;
    c.batch = s.b; c.length = s.L; c.d_inner = s.D; c.d_state = s.N; c.dt_rank = 64;
    check_against_sequential(c, seed, seed);
    ++seed;
  }
}

TEST_CASE("CUDA Associative agrees with Sequential (small)", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 1030; c.d_inner = 19; c.d_state = 16;
  check_against_sequential(c, 6000, 6001);
}

TEST_CASE("CUDA Associative backward matches the CPU double backward", "[cuda][backward][associative][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 7000;
  for (auto const& list : {mbtest::backward_d_state_cases(), mbtest::backward_mask_cases({33})})
    for (auto const& c : list) {
      mbtest::check_backward<scan::Associative>(mbtest::CudaScanRunner<float>{}, c, seed);
      mbtest::check_backward<scan::Associative>(mbtest::CudaScanRunner<bf>{}, c, seed++);
    }
}

TEST_CASE("CUDA Associative backward is the Chunked backward, bitwise", "[cuda][scan][associative][small]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;  // every option on, B / C in x_proj rows (dt_rank 8), unpadded rows
  c.batch = 2; c.length = 1000; c.d_inner = 70; c.d_state = 16;
  mbtest::CudaScanRunner<float> const runner;
  mbtest::ScanProblem const p(c, 77, runner.precision(), runner.random_param_grads());
  auto const ra = runner.backward<scan::Associative>(p);
  auto const rc = runner.backward<scan::Chunked<kBwdSeg>>(p);
  CHECK(runner.backward_workspace_bytes<scan::Associative>(p) == runner.backward_workspace_bytes<scan::Chunked<kBwdSeg>>(p));
  // Bitwise (NaN padding included: x_proj's dt columns of dB / dC stay NaN in both).
  CHECK(mbtest::same_bits(ra.du, rc.du));
  CHECK(mbtest::same_bits(ra.ddelta, rc.ddelta));
  CHECK(mbtest::same_bits(ra.dBC, rc.dBC));
  CHECK(mbtest::same_bits(ra.dz, rc.dz));
  CHECK(mbtest::same_bits(ra.dh0, rc.dh0));
  CHECK(mbtest::same_bits(ra.out, rc.out));
  CHECK(mbtest::same_bits(ra.dA, rc.dA));
  CHECK(mbtest::same_bits(ra.dD, rc.dD));
  CHECK(mbtest::same_bits(ra.dbias, rc.dbias));
  // And the results are real numbers (the check above would also pass on two NaN arrays).
  bool finite = true;
  for (double x : ra.du) finite = finite && std::isfinite(x);
  for (double x : ra.dA) finite = finite && std::isfinite(x);
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
