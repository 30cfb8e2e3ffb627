// CUDA selective-scan backward (float) against the CPU backward in double
// (SelectiveScanBackward<backend::Cpu, double, scan::Sequential>, itself checked against finite
// differences in tests/test_backward.cpp) with the shared body check_backward and the case lists
// of tests/common/scan_cases.hpp (the CPU backward tests run the same ones): every output (du,
// ddelta, dz, dB, dC, dinitial_state, out, dA, dD, ddelta_bias) to relative L2 error <= 1e-4.
// Odd shapes, every optional input on/off, strided B/C, padded leading dimensions (poison kept),
// the CPU tests' cases; 16-byte rows and channel-block edges; model-like sizes; the Auto rule;
// argument checks. Needs a GPU to do more than compile: without one every case is skipped
// (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/backend/cpu/selective_scan_backward.hpp>

#include <catch2/catch.hpp>

#include "cuda_scan_runner.cuh"
#include "cuda_test_util.hpp"
#include "scan_cases.hpp"

#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cuda;
namespace scan = mambabyte::scan;
namespace ssm = mambabyte::ssm;

using Runner = mbtest::CudaScanRunner<float>;
using mbtest::check_backward;

}  // namespace

TEST_CASE("cuda scan backward: odd shapes, every option", "[cuda][backward][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (auto const& c : mbtest::backward_mask_cases({1, 7, 8, 9, 33})) {
    check_backward<scan::Sequential>(Runner{}, c, seed++);
    // Time-parallel: segments of 16 steps (2 chunks) and of 24 (Chunked<20> rounds up to 8s).
    if (c.length > 8) {
      check_backward<scan::Chunked<16>>(Runner{}, c, seed++);
      check_backward<scan::Chunked<20>>(Runner{}, c, seed++);
    }
  }
}

TEST_CASE("cuda scan backward: the CPU backward tests' cases, every policy", "[cuda][backward][small]") {
  REQUIRE_GPU();
  mbtest::backward_suite<scan::Sequential, scan::Chunked<4>, scan::Chunked<16>, scan::Associative, scan::Auto>(
      Runner{}, mbtest::classic_backward_cases(), 700);
}

TEST_CASE("cuda scan backward: random shapes", "[cuda][backward]") {
  REQUIRE_GPU();
  std::uint64_t seed = 800;
  for (auto const& c : mbtest::random_backward_cases(5, 6)) {
    check_backward<scan::Sequential>(Runner{}, c, seed);
    check_backward<scan::Chunked<7>>(Runner{}, c, seed);
    check_backward<scan::Auto>(Runner{}, c, seed++);
  }
}

TEST_CASE("cuda scan backward: 16-byte rows, channel-block and tile edges", "[cuda][backward][small]") {
  // ld a multiple of 4 floats: the 16-byte cp.async path for u / delta / dout / z (d_inner 68:
  // a second 64-channel block with 4 channels, the rest of its 16-byte groups zero-filled);
  // segments of 8, 12 and 20 steps (1, 1.5 and 2.5 tiles of 8 steps) and Auto.
  REQUIRE_GPU();
  std::uint64_t seed = 500;
  for (int Di : {64, 68, 130}) {
    for (int L : {4, 37, 64}) {
      mbtest::ScanCase c;
      c.batch = 2; c.length = L; c.d_inner = Di;
      c.pad = (Di % 4 == 0) ? 4 : 2;
      c.bc = (L != 37) ? mbtest::BcLayout::kRows : mbtest::BcLayout::kPlain;
      check_backward<scan::Sequential>(Runner{}, c, seed++);
      check_backward<scan::Chunked<8>>(Runner{}, c, seed++);
      check_backward<scan::Chunked<12>>(Runner{}, c, seed++);
      check_backward<scan::Chunked<20>>(Runner{}, c, seed++);
      check_backward<scan::Auto>(Runner{}, c, seed++);
    }
  }
}

TEST_CASE("cuda scan backward: general d_state", "[cuda][backward][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (auto const& c : mbtest::backward_d_state_cases()) {
    check_backward<scan::Sequential>(Runner{}, c, seed++);
    check_backward<scan::Chunked<8>>(Runner{}, c, seed++);
  }
}

TEST_CASE("cuda scan backward: model-like sizes, policies", "[cuda][backward]") {
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 1000; c.d_inner = 200;
  check_backward<scan::Sequential>(Runner{}, c, 7);
  check_backward<scan::Auto>(Runner{}, c, 8);
  check_backward<scan::Chunked<64>>(Runner{}, c, 9);
  check_backward<scan::Chunked<256>>(Runner{}, c, 11);
  c.batch = 1; c.length = 3001; c.d_inner = 129; c.bc = mbtest::BcLayout::kPlain;
  check_backward<scan::Auto>(Runner{}, c, 10);  // 3 channel blocks: Auto picks 11 time segments
  check_backward<scan::Chunked<512>>(Runner{}, c, 12);
}

TEST_CASE("cuda scan backward: Auto rule", "[cuda][backward][small]") {
  namespace sd = mambabyte::backend::cuda::scan_bwd_detail;
  // Segments (in chunks of kBwdChunk steps) for 132 SMs x 4 resident blocks (528 blocks a wave).
  auto segs = [](int batch, int length, int d_inner) {
    int const sc = ssm::resolve_auto_cuda_backward(batch, length, d_inner, 132, 4);
    return sd::segment_count(length, sc);
  };
  CHECK(ssm::resolve_auto_cuda_backward(256, 8192, 2048, 132, 4) == 0);  // 8192 blocks: one segment
  CHECK(ssm::resolve_auto_cuda_backward(1, 300, 129, 132, 4) == 0);      // too short to split
  // 384 channel blocks (73% of a wave): one segment, no local pass (2.10 ms against 2.17 for
  // 512-step segments, bf16, run 122).
  CHECK(ssm::resolve_auto_cuda_backward(16, 2048, 1536, 132, 4) == 0);
  CHECK(ssm::resolve_auto_cuda_backward(16, 8192, 1536, 132, 4) == 0);
  // Few channel blocks: the segments fill at least one wave, each at least 256 steps long.
  for (auto [B, L, D] : {std::tuple{8, 8192, 2048}, {1, 65536, 2048}, {4, 8192, 2048}, {1, 3001, 129}}) {
    INFO("B=" << B << " L=" << L << " D=" << D);
    int const sc = ssm::resolve_auto_cuda_backward(B, L, D, 132, 4);
    CHECK(sc > 0);
    CHECK(sc * sd::kBwdChunk >= 256);
    CHECK(segs(B, L, D) >= 2);
  }
  CHECK(segs(1, 65536, 2048) * 32 >= 528);  // 32 channel blocks fill a wave of 528
}

TEST_CASE("cuda scan backward: argument checks", "[cuda][backward][small]") {
  using Op = ssm::SelectiveScanBackward<Cuda, float, scan::Sequential>;
  ssm::SelectiveScanBackwardArguments<float> a;
  a.batch = 1; a.length = 4; a.d_inner = 4; a.d_state = 16;
  CHECK(Op::can_implement(a) == Status::kInvalidArgument);  // no A / dA / pointers
  float dummy = 0;
  a.A = &dummy; a.dA = &dummy; a.d_state = 33;
  a.batch = 0;
  CHECK(Op::can_implement(a) == Status::kUnsupported);
}

TEST_CASE("cuda scan backward: from the forward's states", "[cuda][backward][small]") {
  // The forward writes the state every 4 steps (MixedScanArguments::checkpoints) and the
  // backward starts from them (no checkpoint pass of its own): one segment and time segments
  // (Chunked<16>: 4 chunks of 4 steps; Chunked<20>: 5), chunked forwards (Chunked<8>, Auto),
  // every option, the general d_state path, several channel blocks and Auto both ways.
  REQUIRE_GPU();
  using mbtest::check_backward_from_forward_states;
  std::uint64_t seed = 900;
  for (auto const& c : mbtest::backward_mask_cases({1, 7, 8, 9, 33})) {
    check_backward_from_forward_states<scan::Sequential, scan::Sequential>(Runner{}, c, seed++);
    if (c.length > 8) {
      check_backward_from_forward_states<scan::Chunked<8>, scan::Chunked<16>>(Runner{}, c, seed++);
      check_backward_from_forward_states<scan::Auto, scan::Chunked<20>>(Runner{}, c, seed++);
    }
  }
  for (auto const& c : mbtest::backward_d_state_cases())
    check_backward_from_forward_states<scan::Chunked<12>, scan::Chunked<8>>(Runner{}, c, seed++);
}

TEST_CASE("cuda scan backward from the forward's states: model-like sizes", "[cuda][backward]") {
  REQUIRE_GPU();
  using mbtest::check_backward_from_forward_states;
  std::uint64_t seed = 950;
  mbtest::ScanCase c;
  c.batch = 2; c.length = 1000; c.d_inner = 200;
  check_backward_from_forward_states<scan::Auto, scan::Auto>(Runner{}, c, seed++);
  check_backward_from_forward_states<scan::Chunked<256>, scan::Chunked<64>>(Runner{}, c, seed++);
  c.batch = 1; c.length = 3001; c.d_inner = 129; c.bc = mbtest::BcLayout::kPlain;
  check_backward_from_forward_states<scan::Auto, scan::Auto>(Runner{}, c, seed++);  // 11 time segments
}

TEST_CASE("cuda scan backward from the forward's states: the local pass in pieces", "[cuda][backward][small]") {
  namespace sd = mambabyte::backend::cuda::scan_bwd_detail;
  // The rule: pieces of at least 32 chunks (128 steps), at most 8 per segment, and at most
  // 65535 pieces in all (a grid dimension).
  CHECK(sd::local_split(512, 4) == 8);  // (4, 2048, 8192): 2048-step segments
  CHECK(sd::local_split(256, 4) == 8);
  CHECK(sd::local_split(128, 16) == 4);  // (1, 2048, 8192): 512-step segments
  CHECK(sd::local_split(64, 4) == 2);
  CHECK(sd::local_split(63, 4) == 1);
  CHECK(sd::local_split(4, 3) == 1);
  CHECK(sd::local_split(512, 10001) == 6);  // 65535 / 10000
  CHECK(sd::local_split(512, 40000) == 1);
  REQUIRE_GPU();
  // Shapes where the pieces are split and some are empty (the last segment is short), against
  // the CPU double backward: 4 segments of 1024 steps, the last of 100 (8 pieces of 32 chunks:
  // one of 25, seven empty); 4 segments of 256 steps, the last of 20 (2 pieces: 5 chunks, empty).
  using mbtest::check_backward_from_forward_states;
  std::uint64_t seed = 980;
  mbtest::ScanCase c;
  c.batch = 1; c.length = 3 * 1024 + 100; c.d_inner = 40;
  check_backward_from_forward_states<scan::Auto, scan::Chunked<1024>>(Runner{}, c, seed++);
  c.batch = 2; c.length = 3 * 256 + 20; c.d_inner = 33; c.bc = mbtest::BcLayout::kPlain;
  check_backward_from_forward_states<scan::Sequential, scan::Chunked<256>>(Runner{}, c, seed++);
  // a ragged last chunk (the empty piece starts past the end) and the general d_state path
  c.batch = 1; c.length = 3 * 256 + 21; c.d_state = 12;
  check_backward_from_forward_states<scan::Sequential, scan::Chunked<256>>(Runner{}, c, seed++);
}

TEST_CASE("cuda scan: checkpoints only from forwards that write them, aligned", "[cuda][scan][small]") {
  namespace mcu = mambabyte::backend::cuda;
  using Ch6 = ssm::SelectiveScan<Cuda, float, scan::Chunked<6>>;  // chunk boundaries off the 4-step grid
  using Assoc = ssm::SelectiveScan<Cuda, float, scan::Associative>;
  using Auto = ssm::SelectiveScan<Cuda, float, scan::Auto>;
  STATIC_REQUIRE(!Ch6::writes_checkpoints());
  STATIC_REQUIRE(!Assoc::writes_checkpoints());
  STATIC_REQUIRE(Auto::writes_checkpoints());
  STATIC_REQUIRE(ssm::SelectiveScan<Cuda, float, scan::Chunked<8>>::writes_checkpoints());
  mcu::MixedScanArguments<float> a;
  a.batch = 1; a.length = 8; a.d_inner = 4; a.d_state = 16;
  float dummy[4] = {};
  a.u = a.delta = a.A = a.B = a.C = dummy;
  a.out = dummy;
  a.ld_u = a.ld_delta = a.ld_out = 4;
  a.ld_B = a.ld_C = 16;
  CHECK(Ch6::can_implement(a) == Status::kSuccess);
  a.checkpoints = dummy;
  CHECK(Ch6::can_implement(a) == Status::kUnsupported);
  CHECK(Assoc::can_implement(a) == Status::kUnsupported);
  CHECK(Auto::can_implement(a) == Status::kSuccess);
  CHECK(mcu::checkpoint_floats(3, 9, 5, 16) == std::size_t(3) * 3 * 5 * 16);  // ceil(9 / 4) = 3 slots
  CHECK(mcu::checkpoint_floats(0, 9, 5, 16) == 0);
  REQUIRE_GPU();
  // a misaligned checkpoint buffer is refused with a message, not written
  mcu::DeviceBuffer<float> u(64), out(64), bc(8 * 32), A(64), ck(8 * 4 * 16 + 1);
  a.u = a.delta = u.data(); a.out = out.data(); a.A = A.data(); a.B = bc.data(); a.C = bc.data() + 16;
  a.ld_B = a.ld_C = 32;
  a.checkpoints = ck.data() + 1;
  CHECK_THROWS_WITH(Auto::run(a, Cuda{}), Catch::Contains("16-byte aligned"));
}

TEST_CASE("cuda scan backward: the given states are what it uses", "[cuda][backward][small]") {
  // The workspace shrinks by exactly the checkpoint pass's part (states every 4 steps, and the
  // per-chunk delta sums of a segmented run; segmented, the local pass keeps one piece per
  // segment > 0 here, and the segment states and delta sums it no longer needs are one
  // segment's (state + sum) less), a misaligned buffer is refused, and states that
  // are not the forward's change the result: scaled by 2, the recomputed output and the
  // gradients no longer match the oracle (so the backward reads them and does not recompute).
  namespace mcu = mambabyte::backend::cuda;
  namespace sbd = mcu::scan_bwd_detail;
  using Seq = ssm::SelectiveScanBackward<Cuda, float, scan::Sequential>;
  using Ch16 = ssm::SelectiveScanBackward<Cuda, float, scan::Chunked<16>>;
  mcu::MixedScanBackwardArguments<float> g;
  g.batch = 3; g.length = 37; g.d_inner = 70; g.d_state = 16;
  std::size_t const nc = 10;  // ceil(37 / 4)
  std::size_t const plain_seq = Seq::workspace_bytes(g, Cuda{}), plain_ch = Ch16::workspace_bytes(g, Cuda{});
  float const fake = 0;
  g.checkpoints = &fake;  // only presence matters for the size
  CHECK(plain_seq - Seq::workspace_bytes(g, Cuda{}) == 4 * std::size_t(3) * nc * 70 * 16);
  CHECK(plain_ch - Ch16::workspace_bytes(g, Cuda{}) == 4 * std::size_t(3) * (nc + 1) * 70 * (16 + 1));
  REQUIRE_GPU();
  mbtest::ScanCase c;
  c.batch = 2; c.length = 37; c.d_inner = 70; c.out = true;
  mbtest::ScanProblem const p(c, 77, Runner{}.precision(), true);
  mbtest::DeviceScanBuffers<float> b(p, true);
  std::size_t const nck = mcu::checkpoint_floats(c.batch, c.length, c.d_inner, c.d_state);
  mcu::DeviceBuffer<float> fout(p.x_size()), ck(nck + 4);
  auto fa = mbtest::forward_args<mcu::MixedScanArguments<float>>(p, b);
  fa.out = fout.data();
  fa.final_state = nullptr;
  fa.checkpoints = ck.data();
  ssm::SelectiveScan<Cuda, float, scan::Sequential>::run(fa, Cuda{});
  auto ba = mbtest::backward_args<mcu::MixedScanBackwardArguments<float>>(p, b);
  ba.checkpoints = ck.data() + 1;
  CHECK_THROWS_WITH(Seq::run(ba, Cuda{}), Catch::Contains("16-byte aligned"));
  // states x 2 (a kernel-free way: through the host)
  std::vector<float> h(nck);
  ck.copy_to_host(h.data(), nck);
  for (auto& x : h) x *= 2.f;
  ck.copy_from_host(h.data(), nck);
  ba.checkpoints = ck.data();
  Seq::run(ba, Cuda{});
  auto const ref = mbtest::reference_backward(p);
  auto out = mbtest::to_host(b.out, p.x_size());
  auto ddelta = mbtest::to_host(b.ddelta, p.x_size());  // (du does not depend on the states)
  mbtest::strip_x_padding(p, out);
  mbtest::strip_x_padding(p, ddelta);
  CHECK(mbtest::rel_err(out, ref.out) > 1e-2);
  CHECK(mbtest::rel_err(ddelta, ref.ddelta) > 1e-3);
}
