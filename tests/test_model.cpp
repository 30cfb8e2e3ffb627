// The whole model on the CPU, every dtype x scan policy, against the double-precision reference
// model: random configurations (LayerNorm and RMSNorm, tied and untied, biases on and off, odd
// d_state / d_conv / dt_rank / expand, padded vocab), batch > 1, L = 1, L not a multiple of the
// chunk; prefill + step equals the parallel forward; snapshot / restore; bad calls.
#include <catch2/catch.hpp>

#include <random>

#include "mambabyte/model/model.hpp"
#include "mambabyte/reference/reference.hpp"
#include "test_util.hpp"

using namespace mambabyte;

using mbtest::random_tokens;

namespace {

ModelConfig small_config(int variant) {
  ModelConfig c;
  switch (variant) {
    case 0:  // MambaByte-like: LayerNorm with bias, untied head
      c.d_model = 16; c.n_layer = 2; c.d_state = 16; c.d_conv = 4; c.rms_norm = false; c.tie_embeddings = false;
      break;
    case 1:  // RMSNorm, tied, biases, odd everything
      c.d_model = 12; c.n_layer = 3; c.d_state = 5; c.d_conv = 3; c.dt_rank = 7; c.expand = 3;
      c.bias = true; c.conv_bias = false; c.rms_norm = true; c.tie_embeddings = true; c.vocab_size = 264;
      break;
    case 2:  // d_conv 1 (no window), d_state 1
      c.d_model = 8; c.n_layer = 1; c.d_state = 1; c.d_conv = 1; c.rms_norm = false; c.tie_embeddings = true;
      break;
    default:  // wider: several channel tiles and a ragged one
      c.d_model = 26; c.n_layer = 2; c.d_state = 8; c.d_conv = 2; c.rms_norm = true; c.tie_embeddings = false;
      c.vocab_size = 259;
      break;
  }
  c.finalize();
  return c;
}

/// Reference logits of each sequence of a batch (each from a zero state).
std::vector<double> reference_logits(ModelWeights<double> const& w, std::vector<std::int32_t> const& tokens, int batch,
                                     int length) {
  std::vector<double> out;
  for (int b = 0; b < batch; ++b) {
    std::vector<int> seq(tokens.begin() + static_cast<std::ptrdiff_t>(b) * length,
                         tokens.begin() + static_cast<std::ptrdiff_t>(b + 1) * length);
    auto l = reference::forward(w, seq);
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

template <class T, class Policy>
void check_model(int variant, int batch, int length, int threads, std::uint64_t seed) {
  ModelConfig const c = small_config(variant);
  auto const w64 = mbtest::random_weights<double>(c, seed);
  std::mt19937_64 rng(seed);
  auto const tokens = random_tokens(static_cast<std::size_t>(batch) * length, c.vocab_size, rng);
  auto const ref = reference_logits(w64, tokens, batch, length);

  Model<T, Policy> m(mbtest::cast_weights<T>(w64), backend::Cpu{threads});
  auto const got = m.forward(tokens, batch, length);
  INFO("variant " << variant << " policy " << Policy::name << " B=" << batch << " L=" << length << " threads="
                  << threads);
  REQUIRE(got.size() == ref.size());
  CHECK(mbtest::rel_err(got, ref) < 50 * mbtest::tol<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("model forward matches the reference model (double)", "[model]", scan::Sequential,
                   scan::Associative, scan::Chunked<8>, scan::Auto) {
  std::uint64_t seed = 11;
  for (int variant = 0; variant < 4; ++variant)
    for (auto [batch, length] : {std::pair{1, 1}, std::pair{2, 19}, std::pair{3, 8}, std::pair{1, 41}})
      check_model<double, TestType>(variant, batch, length, 2, seed++);
}

TEMPLATE_TEST_CASE("model forward matches the reference model (float)", "[model]", scan::Sequential,
                   scan::Associative, scan::Chunked<8>, scan::Auto) {
  std::uint64_t seed = 31;
  for (int variant = 0; variant < 4; ++variant)
    for (auto [batch, length] : {std::pair{1, 1}, std::pair{2, 19}, std::pair{1, 41}})
      check_model<float, TestType>(variant, batch, length, variant % 2 + 1, seed++);
}

TEST_CASE("reference model: the state carried through a split equals one pass", "[model][reference]") {
  // Guards the oracle itself: two reference calls with a carried state = one call.
  ModelConfig const c = small_config(0);
  auto const w = mbtest::random_weights<double>(c, 5);
  std::mt19937_64 rng(5);
  auto const t = random_tokens(30, 256, rng);
  std::vector<int> all(t.begin(), t.end()), a(t.begin(), t.begin() + 13), b(t.begin() + 13, t.end());
  auto const whole = reference::forward(w, all);
  auto st = reference::empty_state(c);
  auto la = reference::forward(w, a, st);
  auto lb = reference::forward(w, b, st);
  la.insert(la.end(), lb.begin(), lb.end());
  CHECK(mbtest::rel_err(la, whole) < 1e-13);
}

TEMPLATE_TEST_CASE("prefill + step equals the parallel forward", "[model][decode]", scan::Sequential,
                   scan::Associative, scan::Chunked<4>) {
  for (int variant = 0; variant < 4; ++variant) {
    ModelConfig const c = small_config(variant);
    auto w = mbtest::random_weights<double>(c, 100 + variant);
    Model<double, TestType> m(w, backend::Cpu{2});
    int const batch = 3, prompt = 7, total = 20, V = c.vocab_size;
    std::mt19937_64 rng(variant);
    auto const tokens = random_tokens(static_cast<std::size_t>(batch) * total, V, rng);
    auto const full = m.forward(tokens, batch, total);

    auto state = m.make_state(batch);
    std::vector<std::int32_t> head;
    for (int b = 0; b < batch; ++b)
      head.insert(head.end(), tokens.begin() + b * total, tokens.begin() + b * total + prompt);
    auto last = m.prefill(head, batch, prompt, state);
    INFO("variant " << variant);
    for (int b = 0; b < batch; ++b)
      for (int v = 0; v < V; ++v)
        REQUIRE(last[b * V + v] == Approx(full[(static_cast<std::size_t>(b) * total + prompt - 1) * V + v]).margin(1e-11));
    for (int t = prompt; t < total; ++t) {
      std::vector<std::int32_t> next(batch);
      for (int b = 0; b < batch; ++b) next[b] = tokens[b * total + t];
      auto logits = m.step(next, state);
      for (int b = 0; b < batch; ++b)
        for (int v = 0; v < V; ++v)
          REQUIRE(logits[b * V + v] == Approx(full[(static_cast<std::size_t>(b) * total + t) * V + v]).margin(1e-11));
    }
  }
}

TEST_CASE("float step-by-step decoding tracks the float forward", "[model][decode]") {
  ModelConfig const c = small_config(0);
  Model<float> m(mbtest::random_weights<float>(c, 9), backend::Cpu{1});
  std::mt19937_64 rng(9);
  auto const tokens = random_tokens(64, 256, rng);
  auto const full = m.forward(tokens, 1, 64);
  auto state = m.make_state(1);
  std::vector<float> stepped;
  for (int t = 0; t < 64; ++t) {
    auto l = m.step(std::span<std::int32_t const>(&tokens[t], 1), state);
    stepped.insert(stepped.end(), l.begin(), l.end());
  }
  CHECK(mbtest::rel_err(stepped, full) < 1e-5);
}

TEST_CASE("the inference state matches the reference state", "[model][decode]") {
  ModelConfig const c = small_config(0);
  auto const w = mbtest::random_weights<double>(c, 4);
  std::mt19937_64 rng(4);
  auto const t = random_tokens(23, 256, rng);
  Model<double, scan::Chunked<8>> m(w, backend::Cpu{2});
  auto state = m.make_state(1);
  m.forward(t, 1, 23, &state);
  auto rs = reference::empty_state(c);
  reference::forward(w, std::vector<int>(t.begin(), t.end()), rs);
  int const di = c.d_inner(), K1 = c.d_conv - 1;
  for (int l = 0; l < c.n_layer; ++l) {
    std::vector<double> ssm(state.ssm(l), state.ssm(l) + state.ssm_per_seq());
    CHECK(mbtest::rel_err(ssm, rs.ssm[l]) < 1e-12);
    // ours: (K-1, d_inner) oldest first; reference: (d_inner, K-1) oldest first
    for (int d = 0; d < di; ++d)
      for (int k = 0; k < K1; ++k) REQUIRE(state.conv(l)[k * di + d] == Approx(rs.conv[l][d * K1 + k]).margin(1e-13));
  }
}

TEST_CASE("snapshot / restore rolls the state back exactly", "[model][decode]") {
  ModelConfig const c = small_config(1);
  Model<float, scan::Sequential> m(mbtest::random_weights<float>(c, 21), backend::Cpu{2});
  std::mt19937_64 rng(21);
  auto const prompt = random_tokens(2 * 9, c.vocab_size, rng);
  auto state = m.make_state(2);
  m.prefill(prompt, 2, 9, state);
  auto const snap = state.snapshot();
  std::vector<std::int32_t> a = {5, 7}, b = {100, 3};
  auto const la = m.step(a, state);
  m.step(b, state);
  m.step(b, state);  // wander off
  state.restore(snap);
  auto const again = m.step(a, state);
  CHECK(again == la);  // bit-identical

  // copy_sequence: sequence 1 of a batch-2 state equals a batch-1 state with that history
  auto single = m.make_state(1);
  single.copy_sequence(0, snap, 1);
  auto const l1 = m.step(std::span<std::int32_t const>(&a[1], 1), single);
  // (a batch of 1 takes other GEMM paths than a batch of 2: equal to rounding, not bitwise)
  std::vector<float> la1(la.begin() + c.vocab_size, la.end());
  CHECK(mbtest::rel_err(l1, la1) < 1e-6);

  auto other = m.make_state(3);
  CHECK_THROWS_AS(other.restore(snap), Error);
  CHECK_THROWS_AS(single.copy_sequence(1, snap, 0), Error);
}

TEST_CASE("Associative scan splits one long sequence across threads and still matches", "[model]") {
  // Long enough that every Blelloch level has several nodes per thread.
  ModelConfig const c = small_config(2);
  auto const w = mbtest::random_weights<double>(c, 77);
  std::mt19937_64 rng(77);
  auto const t = random_tokens(1000, 256, rng);
  Model<double, scan::Associative> a(w, backend::Cpu{2});
  Model<double, scan::Sequential> s(w, backend::Cpu{1});
  CHECK(mbtest::rel_err(a.forward(t, 1, 1000), s.forward(t, 1, 1000)) < 1e-11);
}

TEST_CASE("bad calls are clear errors", "[model][errors]") {
  ModelConfig const c = small_config(0);
  Model<float> m(mbtest::random_weights<float>(c, 1));
  std::vector<std::int32_t> t = {1, 2, 3};
  CHECK_THROWS_WITH(m.forward(t, 1, 4), Catch::Contains("expected batch*length"));
  std::vector<std::int32_t> bad = {1, 256, 3};
  CHECK_THROWS_WITH(m.forward(bad, 1, 3), Catch::Contains("outside the vocabulary"));
  std::vector<std::int32_t> neg = {-1};
  CHECK_THROWS_WITH(m.forward(neg, 1, 1), Catch::Contains("outside the vocabulary"));
  auto st = m.make_state(2);
  CHECK_THROWS_WITH(m.forward(t, 1, 3, &st), Catch::Contains("state is for batch 2"));
  CHECK_THROWS_WITH(m.prefill(std::vector<std::int32_t>{}, 1, 0, st), Catch::Contains("empty"));
  CHECK_THROWS_AS(m.make_state(0), Error);
  ModelConfig z;
  CHECK_THROWS_WITH(z.finalize(), Catch::Contains("d_model"));
}
