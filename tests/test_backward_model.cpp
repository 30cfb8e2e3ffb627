// Whole-model gradients of TrainingModel: against finite differences of the fp64 reference model
// (every scan policy, LayerNorm and RMSNorm, tied and untied, biases on and off, padded vocab),
// against the golden PyTorch float64 autograd gradients of the released-MambaByte layout, float
// against double, accumulation / scaling, the activation memory formula, and bad calls.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "mambabyte/io/safetensors.hpp"
#include "mambabyte/model/loader.hpp"
#include "mambabyte/model/model.hpp"
#include "mambabyte/model/training.hpp"
#include "mambabyte/reference/reference.hpp"
#include "test_util.hpp"

using namespace mambabyte;
namespace fs = std::filesystem;

using mbtest::random_tokens;

namespace {

ModelConfig small_config(int variant) {
  ModelConfig c;
  switch (variant) {
    case 0:  // MambaByte-like: LayerNorm with bias, untied head, no in/out bias
      c.d_model = 16; c.n_layer = 2; c.d_state = 16; c.d_conv = 4; c.rms_norm = false; c.tie_embeddings = false;
      break;
    case 1:  // RMSNorm, tied, in/out biases, no conv bias, odd everything, padded vocab
      c.d_model = 12; c.n_layer = 2; c.d_state = 5; c.d_conv = 3; c.dt_rank = 7; c.expand = 3;
      c.bias = true; c.conv_bias = false; c.rms_norm = true; c.tie_embeddings = true; c.vocab_size = 264;
      break;
    case 2:  // d_conv 1 (no window), d_state 1, LayerNorm, tied
      c.d_model = 8; c.n_layer = 1; c.d_state = 1; c.d_conv = 1; c.rms_norm = false; c.tie_embeddings = true;
      break;
    default:  // wider: several channel tiles and a ragged one; RMSNorm, untied, biases, padded vocab
      c.d_model = 26; c.n_layer = 2; c.d_state = 8; c.d_conv = 2; c.rms_norm = true; c.tie_embeddings = false;
      c.bias = true; c.vocab_size = 259;
      break;
  }
  c.finalize();
  return c;
}

/// Mean next-byte cross-entropy with the fp64 reference model; tokens (batch, L+1).
double reference_loss(ModelWeights<double> const& w, std::vector<std::int32_t> const& tokens, int batch) {
  int const per = static_cast<int>(tokens.size()) / batch, L = per - 1, V = w.config().vocab_size;
  double total = 0;
  for (int b = 0; b < batch; ++b) {
    std::vector<int> in(tokens.begin() + b * per, tokens.begin() + b * per + L);
    auto const logits = reference::forward(w, in);
    for (int t = 0; t < L; ++t) {
      double const* l = logits.data() + static_cast<std::size_t>(t) * V;
      double mx = -std::numeric_limits<double>::infinity();
      for (int v = 0; v < 256; ++v) mx = std::max(mx, l[v]);
      double s = 0;
      for (int v = 0; v < 256; ++v) s += std::exp(l[v] - mx);
      total += std::log(s) + mx - l[tokens[b * per + t + 1]];
    }
  }
  return total / (static_cast<double>(batch) * L);
}

/// Fourth-order central difference (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / 12h: truncation error
/// O(h^4), so a large step keeps the loss's rounding error out of the derivative.
constexpr double kStep = 1e-3;
template <class F>
double fd5(F&& f_at) {
  return (-f_at(2 * kStep) + 8 * f_at(kStep) - 8 * f_at(-kStep) + f_at(-2 * kStep)) / (12 * kStep);
}

double worst_entry_fd = 0, worst_abs_fd = 0, worst_directional = 0, worst_policy = 0;

/// Finite-difference gradients of the reference loss at up to `per_tensor` random entries of
/// every parameter tensor: (tensor index, entry index) -> derivative.
struct FdSample {
  std::vector<std::pair<std::size_t, std::size_t>> at;
  std::vector<double> value;
};

FdSample fd_sample(ModelWeights<double> const& w0, std::vector<std::int32_t> const& tokens, int batch, std::size_t per_tensor,
                   std::uint64_t seed) {
  ModelWeights<double> w = w0;
  std::mt19937_64 rng(seed);
  FdSample s;
  auto const& params = w.parameters();
  for (std::size_t p = 0; p < params.size(); ++p) {
    auto t = w.tensor(params[p]);
    std::vector<std::size_t> idx(t.size());
    for (std::size_t i = 0; i < t.size(); ++i) idx[i] = i;
    std::shuffle(idx.begin(), idx.end(), rng);
    if (idx.size() > per_tensor) idx.resize(per_tensor);
    for (std::size_t i : idx) {
      double const keep = t[i];
      double const d = fd5([&](double h) {
        t[i] = keep + h;
        double const l = reference_loss(w, tokens, batch);
        t[i] = keep;
        return l;
      });
      s.at.emplace_back(p, i);
      s.value.push_back(d);
    }
  }
  return s;
}

/// Compare a gradient with an FD sample, tensor by tensor (vector norm over its sampled entries).
void check_against_fd(ModelWeights<double> const& g, FdSample const& s, double tol) {
  auto const& params = g.parameters();
  for (std::size_t p = 0; p < params.size(); ++p) {
    std::vector<double> a, n;
    for (std::size_t k = 0; k < s.at.size(); ++k)
      if (s.at[k].first == p) {
        a.push_back(g.tensor(params[p])[s.at[k].second]);
        n.push_back(s.value[k]);
      }
    // Relative error of the sampled vector, its denominator floored at kFloor: the FD noise is
    // ~1e-11 absolute (loss ~5, step 1e-3), so a tensor whose gradient is ~0 (A_log at L = 1 from a
    // zero state, exactly 0) is checked in absolute terms instead.
    constexpr double kFloor = 1e-4;
    double nn = 0, dd = 0;
    for (std::size_t k = 0; k < a.size(); ++k) { nn += n[k] * n[k]; dd += (a[k] - n[k]) * (a[k] - n[k]); }
    nn = std::sqrt(nn);
    dd = std::sqrt(dd);
    double const e = dd / std::max(nn, kFloor);
    if (nn >= kFloor) worst_entry_fd = std::max(worst_entry_fd, e);
    worst_abs_fd = std::max(worst_abs_fd, dd);
    INFO("tensor " << params[p].name << " (" << a.size() << " entries): |fd| " << nn << " |analytic - fd| " << dd);
    CHECK(e < tol);
  }
}

/// Directional derivative of the reference loss along a random unit direction over all
/// parameters, against <gradient, direction>.
void check_directional(ModelWeights<double> const& w0, ModelWeights<double> const& g, std::vector<std::int32_t> const& tokens,
                       int batch, std::uint64_t seed, double tol) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  ModelWeights<double> dir(w0.config());
  double norm = 0;
  for (auto const& p : dir.parameters())
    for (auto& x : dir.tensor(p)) { x = nd(rng); norm += x * x; }
  norm = std::sqrt(norm);
  double gv = 0;
  for (auto const& p : dir.parameters()) {
    auto d = dir.tensor(p);
    auto gg = g.tensor(p);
    for (std::size_t i = 0; i < d.size(); ++i) { d[i] /= norm; gv += gg[i] * d[i]; }
  }
  ModelWeights<double> w = w0;
  double const fd = fd5([&](double h) {
    auto wf = w.flat();
    auto df = dir.flat();
    auto w0f = w0.flat();
    for (std::size_t i = 0; i < wf.size(); ++i) wf[i] = w0f[i] + h * df[i];
    return reference_loss(w, tokens, batch);
  });
  double const e = std::abs(fd - gv) / std::abs(fd);
  worst_directional = std::max(worst_directional, e);
  INFO("directional derivative: fd " << fd << " analytic " << gv << " rel err " << e);
  CHECK(e < tol);
}

template <class T, class Policy>
ModelWeights<T> model_gradient(ModelWeights<T> const& w, std::vector<std::int32_t> const& tokens, int batch, int threads,
                               double* loss = nullptr) {
  TrainingModel<T, Policy> tm(backend::Cpu{threads});
  auto g = tm.make_gradients(w.config());
  double const l = tm.forward_backward(w, tokens, batch, g);
  if (loss) *loss = l;
  return g;
}

template <class Policy>
void check_policy(ModelWeights<double> const& w, std::vector<std::int32_t> const& tokens, int batch, FdSample const& fd,
                  ModelWeights<double> const& seq, double ref_loss, std::uint64_t seed) {
  INFO("policy " << Policy::name);
  double loss = 0;
  auto const g = model_gradient<double, Policy>(w, tokens, batch, 2, &loss);
  CHECK(std::abs(loss - ref_loss) <= 1e-12 * ref_loss);
  check_against_fd(g, fd, 1e-6);
  check_directional(w, g, tokens, batch, seed, 1e-7);
  double const e = mbtest::rel_err(g.flat(), seq.flat());
  worst_policy = std::max(worst_policy, e);
  CHECK(e < 1e-12);
}

struct ModelCase { int variant, batch, length; };

}  // namespace

TEST_CASE("model gradients match finite differences of the reference model, every policy", "[backward][model]") {
  std::uint64_t seed = 1;
  for (ModelCase mc : {ModelCase{0, 2, 9}, ModelCase{1, 2, 9}, ModelCase{2, 1, 70}, ModelCase{3, 2, 6}, ModelCase{1, 1, 1}}) {
    ModelConfig const c = small_config(mc.variant);
    auto const w = mbtest::random_weights<double>(c, 100 + seed);
    std::mt19937_64 rng(seed);
    auto tokens = random_tokens(static_cast<std::size_t>(mc.batch) * (mc.length + 1), 256, rng);
    INFO("variant " << mc.variant << " batch " << mc.batch << " L " << mc.length);
    double const ref_loss = reference_loss(w, tokens, mc.batch);
    auto const fd = fd_sample(w, tokens, mc.batch, 30, seed);
    auto const seq = model_gradient<double, scan::Sequential>(w, tokens, mc.batch, 1);
    check_policy<scan::Sequential>(w, tokens, mc.batch, fd, seq, ref_loss, seed);
    check_policy<scan::Chunked<4>>(w, tokens, mc.batch, fd, seq, ref_loss, seed);
    check_policy<scan::Associative>(w, tokens, mc.batch, fd, seq, ref_loss, seed);
    check_policy<scan::Auto>(w, tokens, mc.batch, fd, seq, ref_loss, seed);
    ++seed;
  }
}

TEST_CASE("model gradients on random small configurations", "[backward][model][property]") {
  std::mt19937_64 rng(2024);
  auto pick = [&](int lo, int hi) { return lo + static_cast<int>(rng() % static_cast<std::uint64_t>(hi - lo + 1)); };
  for (int trial = 0; trial < 5; ++trial) {
    ModelConfig c;
    c.d_model = pick(4, 20); c.n_layer = pick(1, 2); c.d_state = pick(1, 9); c.d_conv = pick(1, 4);
    c.expand = pick(1, 3); c.dt_rank = pick(1, 5); c.bias = rng() & 1; c.conv_bias = rng() & 1;
    c.rms_norm = rng() & 1; c.tie_embeddings = rng() & 1; c.vocab_size = 256 + pick(0, 8);
    c.finalize();
    int const batch = pick(1, 3), L = pick(1, 12);
    auto const w = mbtest::random_weights<double>(c, 500 + trial);
    auto tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), 256, rng);
    INFO("trial " << trial << ": " << c.to_json().dump() << " batch " << batch << " L " << L);
    double const ref_loss = reference_loss(w, tokens, batch);
    auto const fd = fd_sample(w, tokens, batch, 12, 600 + trial);
    auto const seq = model_gradient<double, scan::Sequential>(w, tokens, batch, 1);
    switch (trial % 4) {  // one policy per configuration (all four above on the fixed ones)
      case 0: check_policy<scan::Chunked<3>>(w, tokens, batch, fd, seq, ref_loss, 700 + trial); break;
      case 1: check_policy<scan::Associative>(w, tokens, batch, fd, seq, ref_loss, 700 + trial); break;
      case 2: check_policy<scan::Auto>(w, tokens, batch, fd, seq, ref_loss, 700 + trial); break;
      default: check_policy<scan::Sequential>(w, tokens, batch, fd, seq, ref_loss, 700 + trial); break;
    }
  }
}

TEST_CASE("golden gradients: the released-MambaByte layout against PyTorch float64 autograd", "[backward][model][golden]") {
  fs::path const dir = fs::path(MAMBABYTE_TEST_DATA_DIR) / "golden";
  std::ifstream in(dir / "text.txt", std::ios::binary);
  std::string const text{std::istreambuf_iterator<char>(in), {}};
  REQUIRE(text.size() == 21);
  auto const tokens = bytes_to_tokens(text);  // batch 1, L + 1 = 21
  auto const w = load_weights<double>(dir / "ssm_layernorm_bin");
  auto const gold = io::read_safetensors(dir / "ssm_layernorm_bin" / "grads.safetensors");
  double const want_loss = std::stod(gold.metadata().at("loss_transcription"));
  auto check_policy_golden = [&]<class Policy>(Policy) {
    INFO("policy " << Policy::name);
    double loss = 0;
    auto const g = model_gradient<double, Policy>(w, tokens, 1, 2, &loss);
    CHECK(std::abs(loss - want_loss) <= 1e-10 * want_loss);
    double worst = 0;
    for (auto const& p : g.parameters()) {
      auto const& rec = gold.at("grad." + p.name);
      REQUIRE(static_cast<std::size_t>(rec.numel()) == p.numel);
      std::vector<double> want(p.numel);
      io::convert_to<double>(rec, std::span<double>(want));
      double const e = mbtest::rel_err(g.tensor(p), want);
      worst = std::max(worst, e);
      INFO("grad." << p.name << " rel err " << e);
      CHECK(e <= 1e-8);
    }
    WARN("golden gradients (" << Policy::name << "): |loss - golden| / golden = " << std::abs(loss - want_loss) / want_loss
                              << ", worst per-tensor relative error " << worst);
  };
  check_policy_golden(scan::Sequential{});
  check_policy_golden(scan::Chunked<8>{});
  check_policy_golden(scan::Associative{});
  check_policy_golden(scan::Auto{});
}

TEST_CASE("float gradients track double", "[backward][model][float]") {
  std::uint64_t seed = 50;
  double worst = 0;
  for (int variant = 0; variant < 4; ++variant) {
    ModelConfig const c = small_config(variant);
    auto const w = mbtest::random_weights<double>(c, seed);
    std::mt19937_64 rng(seed++);
    int const batch = 2, L = 40;
    auto tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), 256, rng);
    double ld = 0, lf = 0;
    auto const gd = model_gradient<double, scan::Chunked<16>>(w, tokens, batch, 2, &ld);
    auto const gf = model_gradient<float, scan::Chunked<16>>(mbtest::cast_weights<float>(w), tokens, batch, 2, &lf);
    auto const gfd = mbtest::cast_weights<double>(gf);
    INFO("variant " << variant);
    CHECK(std::abs(lf - ld) <= 1e-5 * ld);
    double const e = mbtest::rel_err(gfd.flat(), gd.flat());
    worst = std::max(worst, e);
    CHECK(e <= 1e-3);
    for (auto const& p : gd.parameters()) {
      double const et = mbtest::rel_err(gfd.tensor(p), gd.tensor(p));
      worst = std::max(worst, et);
      INFO(p.name << " rel err " << et);
      CHECK(et <= 1e-3);
    }
    // Sequential in float as well
    auto const gs = mbtest::cast_weights<double>(model_gradient<float, scan::Sequential>(mbtest::cast_weights<float>(w), tokens, batch, 2));
    CHECK(mbtest::rel_err(gs.flat(), gd.flat()) <= 1e-3);
  }
  WARN("float vs double model gradients: worst relative error " << worst);
}

TEST_CASE("gradients accumulate, scale, and do not depend on the thread count", "[backward][model]") {
  ModelConfig const c = small_config(3);
  auto const w = mbtest::random_weights<double>(c, 7);
  std::mt19937_64 rng(7);
  auto tokens = random_tokens(3 * 34, 256, rng);
  TrainingModel<double, scan::Chunked<8>> tm(backend::Cpu{2});
  auto g1 = tm.make_gradients(c);
  double const l1 = tm.forward_backward(w, tokens, 3, g1);
  auto g2 = g1;
  double const l2 = tm.forward_backward(w, tokens, 3, g2, 0.5);  // adds half again
  CHECK(l1 == l2);
  for (std::size_t i = 0; i < g1.flat().size(); ++i) REQUIRE(g2.flat()[i] == Approx(1.5 * g1.flat()[i]).epsilon(1e-12).margin(1e-300));
  tm.zero_grad(g2);
  for (double v : g2.flat()) REQUIRE(v == 0.0);
  CHECK(tm.loss(w, tokens, 3) == Approx(l1).epsilon(1e-14));
  auto const g3 = model_gradient<double, scan::Chunked<8>>(w, tokens, 3, 1);
  auto const g4 = model_gradient<double, scan::Chunked<8>>(w, tokens, 3, 3);
  CHECK(mbtest::rel_err(g3.flat(), g1.flat()) < 1e-13);
  CHECK(mbtest::rel_err(g4.flat(), g1.flat()) < 1e-13);
  // mean over a batch = average of per-sequence gradients
  auto gsum = tm.make_gradients(c);
  for (int b = 0; b < 3; ++b) {
    std::vector<std::int32_t> one(tokens.begin() + b * 34, tokens.begin() + (b + 1) * 34);
    tm.forward_backward(w, one, 1, gsum, 1.0 / 3);
  }
  CHECK(mbtest::rel_err(gsum.flat(), g1.flat()) < 1e-12);
}

TEST_CASE("activation memory: measured equals the documented formula", "[backward][model][memory]") {
  for (int variant = 0; variant < 4; ++variant) {
    ModelConfig const c = small_config(variant);
    auto const w = mbtest::random_weights<float>(c, 3);
    std::mt19937_64 rng(3);
    int const batch = 2, L = 100;
    auto tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), 256, rng);
    backend::Cpu const be{2};
    TrainingModel<float, scan::Auto> tm(be);
    auto g = tm.make_gradients(c);
    tm.forward_backward(w, tokens, batch, g);
    INFO("variant " << variant);
    CHECK(tm.activation_bytes() == TrainingModel<float, scan::Auto>::activation_bytes_formula(c, batch, L, be));
    // the scan keeps checkpoints, not every state: its workspace is far below B*L*d_inner*N
    // (variant 2 is too small to tell: d_state 1 and one tile, so the per-thread chunk buffers,
    // O(threads * K * 16 * d_state), are as large as the whole problem)
    if (variant == 2) continue;
    std::size_t const all_states = std::size_t(batch) * L * c.d_inner() * c.d_state * sizeof(float);
    CHECK(TrainingModel<float, scan::Chunked<32>>::scan_workspace_bytes(c, batch, L, be) < all_states);
  }
}

TEST_CASE("training: bad calls are errors", "[backward][model][errors]") {
  ModelConfig const c = small_config(1);  // vocab 264
  auto const w = mbtest::random_weights<double>(c, 1);
  TrainingModel<double> tm(backend::Cpu{1});
  auto g = tm.make_gradients(c);
  std::vector<std::int32_t> ok = {1, 2, 3, 4, 5, 6};
  CHECK_NOTHROW(tm.forward_backward(w, ok, 2, g));
  CHECK_THROWS_AS(tm.forward_backward(w, ok, 4, g), Error);                  // 6 tokens do not split in 4
  CHECK_THROWS_AS(tm.forward_backward(w, ok, 6, g), Error);                  // 1 token per sequence
  CHECK_THROWS_AS(tm.forward_backward(w, ok, 0, g), Error);
  std::vector<std::int32_t> bad_in = {260, 2, 3, 4};                         // an input < vocab 264 is fine ...
  CHECK_NOTHROW(tm.forward_backward(w, bad_in, 1, g));
  std::vector<std::int32_t> bad_tgt = {1, 260, 3, 4};                        // ... but a target must be a byte
  CHECK_THROWS_AS(tm.forward_backward(w, bad_tgt, 1, g), Error);
  std::vector<std::int32_t> neg = {1, -2, 3, 4};
  CHECK_THROWS_AS(tm.forward_backward(w, neg, 1, g), Error);
  std::vector<std::int32_t> big = {300, 2, 3, 4};
  CHECK_THROWS_AS(tm.loss(w, big, 1), Error);
  auto wrong = TrainingModel<double>::make_gradients(small_config(3));       // another config
  CHECK_THROWS_AS(tm.forward_backward(w, ok, 2, wrong), Error);
}

TEST_CASE("model gradient summary", "[backward][model][zz]") {
  WARN("model FD: worst per-tensor relative error (tensors with |grad| >= 1e-4) " << worst_entry_fd
       << ", worst absolute error norm " << worst_abs_fd << ", worst directional-derivative error " << worst_directional
       << ", worst policy vs Sequential " << worst_policy);
}
