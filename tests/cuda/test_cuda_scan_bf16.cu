// CUDA selective scan, forward and backward, with bf16 storage (ssm::SelectiveScan /
// SelectiveScanBackward<backend::Cuda, __nv_bfloat16, Policy>, MixedScan[Backward]Arguments):
// activations and activation gradients bf16, parameters, states and parameter gradients float,
// fp32 math. Every policy against the fp64 oracles (reference::selective_scan; the CPU backward
// in double) evaluated ON THE bf16-ROUNDED INPUTS, so the tolerances only cover fp32 arithmetic
// and the rounding of the bf16 outputs: relative L2 error <= 1e-2 for bf16 outputs (one
// rounding: <= 2^-8 per element), <= 2e-4 for the forward's final state (float), <= 1e-3 for
// the backward's float outputs (dinitial_state, dA, dD, ddelta_bias) - the tolerances of
// mbtest::CudaScanRunner<__nv_bfloat16> (tests/cuda/cuda_scan_runner.cuh).
// The bodies and case lists are the shared ones of tests/common/scan_cases.hpp (the CPU and the
// fp32 CUDA tests run the same). Layouts: both load paths of the forward are covered: rows
// 16-byte aligned (leading dimensions multiples of 8: 16-byte cp.async with a zero-filled ragged
// tail) and not (plain loads), for u / delta / z and for B / C separately. Outputs start as
// NaN; the padding of padded rows and x_proj's dt columns must keep it.
// Needs a GPU to do more than compile: without one every GPU case is skipped (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/backend/cpu/selective_scan_backward.hpp>
#include <mambabyte/reference/reference.hpp>

#include <cuda_bf16.h>

#include <catch2/catch.hpp>

#include "cuda_scan_runner.cuh"
#include "cuda_test_util.hpp"
#include "scan_cases.hpp"
#include "split_reduce_policy.cuh"

#include <cstdint>
#include <type_traits>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::MixedScanArguments;
using mambabyte::backend::cuda::MixedScanBackwardArguments;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;
using bf = __nv_bfloat16;

static_assert(std::is_same_v<ssm::SelectiveScan<Cuda, bf, scan::Sequential>::Arguments, MixedScanArguments<bf>>);
static_assert(std::is_same_v<ssm::SelectiveScanBackward<Cuda, bf, scan::Auto>::Arguments,
                             MixedScanBackwardArguments<bf>>);
static_assert(std::is_same_v<ssm::SelectiveScan<Cuda, float, scan::Chunked<64>>::Arguments,
                             ssm::SelectiveScanArguments<float>>);

using Runner = mbtest::CudaScanRunner<bf>;
using mbtest::check_backward;

using Seq = scan::Sequential;
using Ch16 = scan::Chunked<16>;
using Ch64 = scan::Chunked<64>;
using Ch256 = scan::Chunked<256>;

}  // namespace

// ---- forward ----

TEST_CASE("bf16 CUDA scan matches the fp64 reference on small odd shapes", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::odd_shape_cases(), 1);
}

TEST_CASE("bf16 CUDA scan: optional inputs off, layouts, padded rows", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16>(Runner{}, mbtest::option_cases(), 100);
}

TEST_CASE("bf16 CUDA scan: d_state other than 16 (general path)", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16>(Runner{}, mbtest::d_state_cases(), 200);
}

TEST_CASE("bf16 CUDA scan: the CPU tests' shapes and the length sweep (L 1..257, d_state 1..17)",
          "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::classic_forward_cases(), 500);
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::length_sweep_cases(), 600);
}

TEST_CASE("bf16 CUDA scan: the reduce pass cut into sub-chunks (Auto's reduce split)", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<mbtest::SplitReduce<64, 2>, mbtest::SplitReduce<48, 3>>(Runner{}, mbtest::odd_shape_cases(), 1);
  mbtest::resume_suite<mbtest::SplitReduce<64, 4>>(Runner{}, 700);
}

TEST_CASE("bf16 CUDA scan resumed from a carried state equals one long scan", "[cuda][scan][bf16][small]") {
  REQUIRE_GPU();
  mbtest::resume_suite<Seq, Ch16, scan::Auto>(Runner{}, 700);
}

TEST_CASE("bf16 CUDA scan matches the reference at model-like sizes", "[cuda][scan][bf16]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch64, Ch256, scan::Auto>(Runner{}, mbtest::model_like_cases(true), 300);
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
  for (auto const& c : mbtest::backward_mask_cases({1, 9, 33})) {
    check_backward<scan::Sequential>(Runner{}, c, seed++);
    if (c.length > 8) {
      check_backward<scan::Chunked<16>>(Runner{}, c, seed++);
      check_backward<scan::Chunked<20>>(Runner{}, c, seed++);
    }
  }
}

TEST_CASE("bf16 CUDA scan backward: the CPU backward tests' cases, every policy", "[cuda][backward][bf16][small]") {
  REQUIRE_GPU();
  mbtest::backward_suite<scan::Sequential, scan::Chunked<4>, scan::Chunked<16>, scan::Associative, scan::Auto>(
      Runner{}, mbtest::classic_backward_cases(), 5000);
}

TEST_CASE("bf16 CUDA scan backward: 16-byte rows, channel-block and tile edges", "[cuda][backward][bf16][small]") {
  // ld a multiple of 8 bf16: 16-byte cp.async for u / delta / dout / z (d_inner 72: a second
  // 64-channel block with 8 channels; 68 + pad 4: a partial 16-byte group); B / C rows of
  // x_proj (ld 40 bf16 = 80 bytes) also 16-byte; segments of 8, 12, 20 steps and Auto.
  REQUIRE_GPU();
  std::uint64_t seed = 4000;
  for (int Di : {64, 68, 72}) {
    for (int L : {4, 37, 64}) {
      mbtest::ScanCase c;
      c.batch = 2; c.length = L; c.d_inner = Di;
      c.pad = (8 - Di % 8) % 8 + 8;
      c.bc = (L != 37) ? mbtest::BcLayout::kRows : mbtest::BcLayout::kPlain;
      check_backward<scan::Sequential>(Runner{}, c, seed++);
      check_backward<scan::Chunked<8>>(Runner{}, c, seed++);
      check_backward<scan::Chunked<12>>(Runner{}, c, seed++);
      check_backward<scan::Chunked<20>>(Runner{}, c, seed++);
      check_backward<scan::Auto>(Runner{}, c, seed++);
    }
  }
}

TEST_CASE("bf16 CUDA scan backward: general d_state", "[cuda][backward][bf16][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 2000;
  for (auto const& c : mbtest::backward_d_state_cases()) {
    check_backward<scan::Sequential>(Runner{}, c, seed++);
    check_backward<scan::Chunked<8>>(Runner{}, c, seed++);
  }
}

TEST_CASE("bf16 CUDA scan backward: model-like sizes, policies", "[cuda][backward][bf16]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 1000; c.d_inner = 200;
  check_backward<scan::Sequential>(Runner{}, c, 3007);
  check_backward<scan::Auto>(Runner{}, c, 3008);
  check_backward<scan::Chunked<64>>(Runner{}, c, 3009);
  c.batch = 1; c.length = 3001; c.d_inner = 129; c.bc = mbtest::BcLayout::kPlain;
  check_backward<scan::Auto>(Runner{}, c, 3010);  // 3 channel blocks: Auto picks time segments
}

TEST_CASE("bf16 CUDA scan backward: from the forward's states", "[cuda][backward][bf16][small]") {
  // As the float test: the forward keeps the state every 4 steps for the backward (bf16
  // activations, float states), one segment and several, chunked forwards, the general d_state
  // path, model-like sizes with 16-byte rows.
  REQUIRE_GPU();
  using mbtest::check_backward_from_forward_states;
  std::uint64_t seed = 6000;
  for (auto const& c : mbtest::backward_mask_cases({1, 7, 33})) {
    check_backward_from_forward_states<scan::Sequential, scan::Sequential>(Runner{}, c, seed++);
    if (c.length > 8) check_backward_from_forward_states<scan::Chunked<8>, scan::Chunked<20>>(Runner{}, c, seed++);
  }
  for (auto const& c : mbtest::backward_d_state_cases())
    check_backward_from_forward_states<scan::Chunked<16>, scan::Chunked<8>>(Runner{}, c, seed++);
}

TEST_CASE("bf16 CUDA scan backward from the forward's states: model-like sizes", "[cuda][backward][bf16]") {
  REQUIRE_GPU();
  std::uint64_t seed = 6500;
  for (auto const& c : mbtest::model_like_cases(true))
    mbtest::check_backward_from_forward_states<scan::Auto, scan::Auto>(Runner{}, c, seed++);
}
