// Every CPU scan policy x dtype against the double-precision reference scan, on random and odd
// shapes, L = 1, L not a multiple of the chunk, batch > 1, with and without D / z / bias /
// initial state, and strided (non-contiguous) B, C, z as the model passes them.
#include <catch2/catch.hpp>

#include <random>

#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "mambabyte/reference/reference.hpp"
#include "test_util.hpp"

using namespace mambabyte;

namespace {

struct Shape { int batch, length, d_inner, d_state; bool with_D, with_z, with_bias, with_h0; };

template <class T, class Policy>
void check_against_reference(Shape const& s, std::uint64_t seed, int threads) {
  std::mt19937_64 rng(seed);
  int const ldx = s.d_inner + 3, ldbc = 2 * s.d_state + 5;  // padded leading dimensions
  std::size_t const rows = static_cast<std::size_t>(s.batch) * s.length;
  auto u = mbtest::random_vector<double>(rows * ldx, rng);
  auto dt = mbtest::random_vector<double>(rows * ldx, rng, -4.0, 1.0);
  auto bias = mbtest::random_vector<double>(s.d_inner, rng, -1, 0.5);
  std::vector<double> A(static_cast<std::size_t>(s.d_inner) * s.d_state);
  for (auto& a : A) a = -std::exp(std::uniform_real_distribution<double>(-1, 2.5)(rng));
  auto bc = mbtest::random_vector<double>(rows * ldbc, rng);
  auto D = mbtest::random_vector<double>(s.d_inner, rng);
  auto z = mbtest::random_vector<double>(rows * ldx, rng, -3, 3);
  auto h0 = mbtest::random_vector<double>(static_cast<std::size_t>(s.batch) * s.d_inner * s.d_state, rng);

  auto make = [&](auto const& U, auto const& DT, auto const& BIAS, auto const& AA, auto const& BC, auto const& DD,
                  auto const& Z, auto const& H0, auto& out, auto& hT) {
    using V = std::decay_t<decltype(U[0])>;
    ssm::SelectiveScanArguments<V> a;
    a.batch = s.batch; a.length = s.length; a.d_inner = s.d_inner; a.d_state = s.d_state;
    a.u = U.data(); a.ld_u = ldx;
    a.delta = DT.data(); a.ld_delta = ldx;
    a.delta_bias = s.with_bias ? BIAS.data() : nullptr;
    a.A = AA.data();
    a.B = BC.data(); a.ld_B = ldbc;
    a.C = BC.data() + s.d_state + 2; a.ld_C = ldbc;
    a.D = s.with_D ? DD.data() : nullptr;
    a.z = s.with_z ? Z.data() : nullptr; a.ld_z = ldx;
    a.out = out.data(); a.ld_out = ldx;
    a.initial_state = s.with_h0 ? H0.data() : nullptr;
    a.final_state = hT.data();
    return a;
  };
  std::vector<double> ref_out(rows * ldx, 0.0), ref_h(h0.size());
  reference::selective_scan(make(u, dt, bias, A, bc, D, z, h0, ref_out, ref_h));

  auto cast = [](std::vector<double> const& v) { return std::vector<T>(v.begin(), v.end()); };
  auto uT = cast(u), dtT = cast(dt), biasT = cast(bias), AT = cast(A), bcT = cast(bc), DT_ = cast(D), zT = cast(z), h0T = cast(h0);
  std::vector<T> out(rows * ldx, T(0)), hT(h0.size());
  auto args = make(uT, dtT, biasT, AT, bcT, DT_, zT, h0T, out, hT);
  using Scan = ssm::SelectiveScan<backend::Cpu, T, Policy>;
  REQUIRE(Scan::can_implement(args) == Status::kSuccess);
  backend::Cpu be{threads};
  std::vector<std::byte> ws(Scan::workspace_bytes(args, be));
  Scan::run(args, ws.data(), be);

  // Compare only the real columns (padding must stay untouched: it is zero in both).
  INFO("policy " << Policy::name << " B=" << s.batch << " L=" << s.length << " D=" << s.d_inner << " N=" << s.d_state
       << " threads=" << threads);
  CHECK(mbtest::rel_err(out, ref_out) < mbtest::tol<T>() * 10);
  CHECK(mbtest::rel_err(hT, ref_h) < mbtest::tol<T>() * 10);
  for (std::size_t r = 0; r < rows; ++r)
    for (int d = s.d_inner; d < ldx; ++d) REQUIRE(out[r * ldx + d] == T(0));
}

std::vector<Shape> const kShapes = {
    {1, 1, 1, 1, true, true, true, false},     // the smallest case
    {1, 1, 17, 16, true, true, true, true},    // L = 1 with a state
    {2, 7, 5, 3, false, false, false, false},  // odd sizes, no optional parts
    {3, 33, 19, 16, true, true, true, true},   // batch > 1, odd channel count
    {1, 100, 40, 4, true, false, true, true},  // L not a multiple of the chunk
    {2, 129, 16, 7, true, true, false, false},
    {1, 300, 33, 16, true, true, true, true},  // several chunks of 64 and a ragged tail
};

}  // namespace

TEMPLATE_TEST_CASE("cpu selective scan matches the reference (double)", "[scan]", scan::Sequential,
                   scan::Associative, scan::Chunked<16>, scan::Chunked<64>, scan::Auto) {
  std::uint64_t seed = 1;
  for (auto const& s : kShapes)
    for (int threads : {1, 2}) check_against_reference<double, TestType>(s, seed++, threads);
}

TEMPLATE_TEST_CASE("cpu selective scan matches the reference (float)", "[scan]", scan::Sequential,
                   scan::Associative, scan::Chunked<16>, scan::Chunked<64>, scan::Auto) {
  std::uint64_t seed = 100;
  for (auto const& s : kShapes)
    for (int threads : {1, 2}) check_against_reference<float, TestType>(s, seed++, threads);
}

TEST_CASE("random shapes, every policy, double", "[scan][property]") {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 12; ++trial) {
    Shape s{1 + int(rng() % 3), 1 + int(rng() % 200), 1 + int(rng() % 40), 1 + int(rng() % 20),
            bool(rng() & 1), bool(rng() & 1), bool(rng() & 1), bool(rng() & 1)};
    check_against_reference<double, scan::Sequential>(s, 1000 + trial, 2);
    check_against_reference<double, scan::Associative>(s, 1000 + trial, 2);
    check_against_reference<double, scan::Chunked<32>>(s, 1000 + trial, 2);
  }
}

TEST_CASE("chunked scan resumes from a state exactly like one long scan", "[scan]") {
  // Split one sequence in two: scan the first part, pass its final state as the initial state
  // of the second; outputs and final state equal a single scan.
  Shape whole{1, 90, 12, 8, true, true, true, false};
  std::mt19937_64 rng(3);
  int const L = whole.length, Dd = whole.d_inner, N = whole.d_state, split = 37;
  auto u = mbtest::random_vector<double>(L * Dd, rng), dt = mbtest::random_vector<double>(L * Dd, rng, -3, 1);
  auto bc = mbtest::random_vector<double>(L * 2 * N, rng), z = mbtest::random_vector<double>(L * Dd, rng);
  std::vector<double> A(Dd * N);
  for (auto& a : A) a = -std::exp(std::uniform_real_distribution<double>(-1, 2)(rng));
  auto args = [&](int t0, int len, double* out, double const* h0, double* hT) {
    ssm::SelectiveScanArguments<double> a;
    a.batch = 1; a.length = len; a.d_inner = Dd; a.d_state = N;
    a.u = u.data() + t0 * Dd; a.ld_u = Dd; a.delta = dt.data() + t0 * Dd; a.ld_delta = Dd;
    a.A = A.data(); a.B = bc.data() + t0 * 2 * N; a.ld_B = 2 * N; a.C = bc.data() + t0 * 2 * N + N; a.ld_C = 2 * N;
    a.z = z.data() + t0 * Dd; a.ld_z = Dd; a.out = out; a.ld_out = Dd; a.initial_state = h0; a.final_state = hT;
    return a;
  };
  std::vector<double> full(L * Dd), hfull(Dd * N), part(L * Dd), hmid(Dd * N), hend(Dd * N);
  ssm::SelectiveScan<backend::Cpu, double, scan::Chunked<16>>::run(args(0, L, full.data(), nullptr, hfull.data()), backend::Cpu{2});
  ssm::SelectiveScan<backend::Cpu, double, scan::Chunked<16>>::run(args(0, split, part.data(), nullptr, hmid.data()), backend::Cpu{2});
  ssm::SelectiveScan<backend::Cpu, double, scan::Chunked<16>>::run(args(split, L - split, part.data() + split * Dd, hmid.data(), hend.data()), backend::Cpu{2});
  CHECK(mbtest::rel_err(part, full) < 1e-13);
  CHECK(mbtest::rel_err(hend, hfull) < 1e-13);
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
