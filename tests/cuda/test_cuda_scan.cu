// CUDA selective scan (float) against the fp64 oracle reference::selective_scan, per policy, with
// the shared bodies and case lists of tests/common/scan_cases.hpp (the CPU scan tests run the
// same ones): odd shapes, every optional input on / off, both B / C layouts, padded rows, d_state
// 1..64, lengths 1..257, the CPU tests' shapes and random shapes; a scan resumed from a carried
// state equals one long scan; Chunked against Sequential; model-like sizes; argument checks and
// the Auto rule. Needs a GPU to do more than compile: without one every test case is skipped
// with a message (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer (memcheck, racecheck).
#include <mambabyte/cuda.hpp>

#include <catch2/catch.hpp>

#include "cuda_scan_runner.cuh"
#include "cuda_test_util.hpp"
#include "scan_cases.hpp"
#include "split_reduce_policy.cuh"

#include <cstdint>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;

using Runner = mbtest::CudaScanRunner<float>;

// Small chunks so that short test sequences have many chunks (and a ragged last one).
using Seq = scan::Sequential;
using Ch16 = scan::Chunked<16>;
using Ch64 = scan::Chunked<64>;
using Ch256 = scan::Chunked<256>;

}  // namespace

TEST_CASE("CUDA scan matches the fp64 reference on small odd shapes", "[cuda][scan][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::odd_shape_cases(), 1);
}

TEST_CASE("CUDA scan: optional inputs off, plain B/C layout, padded rows", "[cuda][scan][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16>(Runner{}, mbtest::option_cases(), 100);
}

TEST_CASE("CUDA scan: d_state other than 16 (general path)", "[cuda][scan][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16>(Runner{}, mbtest::d_state_cases(), 200);
}

TEST_CASE("CUDA scan: the CPU tests' shapes and the length sweep (L 1..257, d_state 1..17)", "[cuda][scan][small]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::classic_forward_cases(), 500);
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::length_sweep_cases(), 600);
}

TEST_CASE("CUDA scan: random shapes, every policy", "[cuda][scan]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch16, Ch64, scan::Auto>(Runner{}, mbtest::random_forward_cases(7, 12), 1000);
}

TEST_CASE("CUDA scan resumed from a carried state equals one long scan", "[cuda][scan][small]") {
  REQUIRE_GPU();
  mbtest::resume_suite<Seq, Ch16, scan::Auto>(Runner{}, 700);
}

TEST_CASE("CUDA scan matches the reference at model-like sizes", "[cuda][scan]") {
  REQUIRE_GPU();
  mbtest::forward_suite<Seq, Ch64, Ch256, scan::Auto>(Runner{}, mbtest::model_like_cases(false), 300);
}

TEST_CASE("CUDA Chunked agrees with Sequential", "[cuda][scan]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 4099; c.d_inner = 384; c.d_state = 16; c.dt_rank = 64;
  mbtest::check_policies_agree<scan::Chunked<128>, Seq>(Runner{}, c, 400);
  mbtest::check_policies_agree<scan::Chunked<1000>, Seq>(Runner{}, c, 400);
}

TEST_CASE("CUDA scan: the reduce pass cut into sub-chunks (Auto's reduce split)", "[cuda][scan][small]") {
  REQUIRE_GPU();
  using S64x2 = mbtest::SplitReduce<64, 2>;
  using S64x4 = mbtest::SplitReduce<64, 4>;
  using S48x3 = mbtest::SplitReduce<48, 3>;  // sub-chunks of 16 steps: one tile each
  mbtest::forward_suite<S64x2, S64x4, S48x3>(Runner{}, mbtest::odd_shape_cases(), 1);
  mbtest::forward_suite<S64x2, S48x3>(Runner{}, mbtest::length_sweep_cases(), 600);
  mbtest::resume_suite<S64x4>(Runner{}, 700);
  mbtest::ScanCase c;
  c.batch = 2; c.length = 4099; c.d_inner = 384; c.d_state = 16; c.dt_rank = 64;
  mbtest::check_policies_agree<mbtest::SplitReduce<1024, 4>, Seq>(Runner{}, c, 400);
  mbtest::check_policies_agree<mbtest::SplitReduce<1024, 4>, scan::Chunked<1024>>(Runner{}, c, 401);
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
  // Auto (wave = 132 SMs x 4 blocks): one chunk when the channel blocks fill more than 2/5 of
  // the wave, 256-step chunks when the wave would need 8 chunks or more, else floor(wave /
  // blocks) chunks, multiples of 64 steps, at least 256 (the points of run 117).
  CHECK(ssm::resolve_auto_cuda(64, 2048, 2048, 528) == 0);      // 1024 blocks: more than a wave
  CHECK(ssm::resolve_auto_cuda(16, 8192, 2048, 528) == 0);      // 256 blocks > 2/5 of 528
  CHECK(ssm::auto_split_single(16, 2048, 528));                 // ... with two threads per channel
  CHECK(!ssm::auto_split_single(64, 2048, 528));
  CHECK(ssm::resolve_auto_cuda(16, 2048, 1536, 528) == 1024);   // 192 blocks: 2 chunks
  CHECK(ssm::resolve_auto_cuda(8, 8192, 2048, 528) == 2048);    // 128 blocks: 4 chunks
  CHECK(ssm::resolve_auto_cuda(8, 8192, 2048, 396) == 2752);    // (3 chunks of a smaller wave)
  CHECK(ssm::resolve_auto_cuda(4, 8192, 2048, 528) == 256);     // 64 blocks: 8 chunks -> 256 steps
  CHECK(ssm::resolve_auto_cuda(1, 65536, 2048, 528) == 256);
  CHECK(ssm::resolve_auto_cuda(1, 100, 2048, 528) == 0);        // too short
  CHECK(ssm::resolve_auto_cuda(1, 1000, 64, 528) == 256);       // chunks at least 256 long
  // The reduce split (wave 528 = 132 SMs x 4): only when the reduce pass's blocks fill at most
  // half the wave, as many sub-chunks as fit, each whole tiles and >= 256 steps.
  CHECK(ssm::resolve_auto_reduce_split(16, 2048, 1536, 1024, 528) == 2);  // 192 reduce blocks
  CHECK(ssm::resolve_auto_reduce_split(8, 8192, 2048, 2048, 528) == 1);   // 384 reduce blocks
  CHECK(ssm::resolve_auto_reduce_split(2, 8192, 2048, 4096, 528) == 16);  // 32 blocks, 256-step sub-chunks
  CHECK(ssm::resolve_auto_reduce_split(1, 4096, 128, 1024, 528) == 4);    // limited by the 256-step minimum
  CHECK(ssm::resolve_auto_reduce_split(16, 2048, 1536, 0, 528) == 1);     // one chunk
  CHECK(ssm::resolve_auto_reduce_split(16, 2048, 1536, 2048, 528) == 1);
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
