// Every CPU scan policy x dtype against the double-precision reference scan, on the shared case
// lists of tests/common/scan_cases.hpp (the same bodies and lists run on the CUDA backend in
// tests/cuda/): random and odd shapes, L = 1, L not a multiple of the chunk, batch > 1, d_state
// 1..64, with and without D / z / bias / softplus / initial and final state, strided
// (non-contiguous) B, C, z as the model passes them; a scan resumed from a carried state equals
// one long scan; decode steps (the scan over one token, state in place) equal the parallel scan.
#include <catch2/catch.hpp>

#include "cpu_scan_runner.hpp"
#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "scan_cases.hpp"

using namespace mambabyte;
using mbtest::CpuScanRunner;

TEMPLATE_TEST_CASE("cpu selective scan matches the reference (double)", "[scan]", scan::Sequential,
                   scan::Associative, scan::Chunked<16>, scan::Chunked<64>, scan::Auto) {
  for (int threads : {1, 2}) mbtest::forward_suite<TestType>(CpuScanRunner<double>{threads}, mbtest::all_forward_cases(), 1);
}

TEMPLATE_TEST_CASE("cpu selective scan matches the reference (float)", "[scan]", scan::Sequential,
                   scan::Associative, scan::Chunked<16>, scan::Chunked<64>, scan::Auto) {
  for (int threads : {1, 2}) mbtest::forward_suite<TestType>(CpuScanRunner<float>{threads}, mbtest::all_forward_cases(), 100);
}

TEST_CASE("random shapes, every policy, double", "[scan][property]") {
  std::uint64_t seed = 1000;
  for (auto const& c : mbtest::random_forward_cases(7, 12))
    mbtest::check_forward_all<scan::Sequential, scan::Associative, scan::Chunked<32>>(CpuScanRunner<double>{2}, c, seed++);
}

TEMPLATE_TEST_CASE("scan resumed from a carried state equals one long scan", "[scan]", scan::Chunked<16>,
                   scan::Sequential, scan::Associative, scan::Chunked<64>, scan::Auto) {
  // Split one sequence in two: scan the first part, pass its final state as the initial state
  // of the second; outputs and final state equal a single scan.
  std::uint64_t seed = 3;
  for (auto const& [c, split] : mbtest::resume_cases()) {
    mbtest::check_resume<TestType>(CpuScanRunner<double>{2}, c, split, seed);
    mbtest::check_resume<TestType>(CpuScanRunner<float>{2}, c, split, seed);
    ++seed;
  }
}

TEST_CASE("cpu decode steps (the scan over one token, state in place) equal the parallel scan", "[scan][step]") {
  std::uint64_t seed = 1;
  for (auto const& list : {mbtest::step_cases(), mbtest::step_d_state_cases()})
    for (auto const& c : list) {
      mbtest::check_steps(CpuScanRunner<double>{2}, c, seed);
      mbtest::check_steps(CpuScanRunner<float>{1}, c, seed++);
    }
}

TEST_CASE("invalid scan arguments are reported", "[scan]") {
  ssm::SelectiveScanArguments<float> a;
  a.batch = 1; a.length = 4; a.d_inner = 8; a.d_state = 4;  // no pointers
  using Scan = ssm::SelectiveScan<backend::Cpu, float, scan::Sequential>;
  CHECK(Scan::can_implement(a) == Status::kInvalidArgument);
  CHECK_THROWS_AS(Scan::run(a, backend::Cpu{1}), Error);
  a.d_state = 0;
  CHECK(ssm::validate(a) == Status::kInvalidArgument);
}
