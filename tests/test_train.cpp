// Training pieces and the trainer: data sampling, AdamW / schedule / clipping against hand
// computations, mamba_ssm initialisation, that training lowers the validation loss, bit-exact
// resume, atomic checkpoints (a failure mid-write keeps the previous one), and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "mambabyte/model/loader.hpp"
#include "mambabyte/train/trainer.hpp"
#include "test_util.hpp"

using namespace mambabyte;
using namespace mambabyte::train;
namespace fs = std::filesystem;

namespace {

fs::path tmpdir(std::string const& name) {
  fs::path p = fs::path(MAMBABYTE_TEST_TMP_DIR) / ("train_" + name);
  fs::remove_all(p);
  return p;
}

ByteCorpus shakespeare(std::size_t bytes) {
  auto all = ByteCorpus::from_file(fs::path(MAMBABYTE_TEST_DATA_DIR) / ".." / ".." / "data" / "tinyshakespeare.txt");
  return all.slice(0, std::min(bytes, all.size()), "tinyshakespeare");
}

ModelConfig tiny_config() {
  ModelConfig c;
  c.d_model = 16;
  c.n_layer = 2;
  c.d_state = 4;
  c.rms_norm = false;
  c.tie_embeddings = false;
  c.pad_vocab_size_multiple = 1;
  c.finalize();
  return c;
}

TrainerOptions tiny_options(std::int64_t steps) {
  TrainerOptions o;
  o.seq_len = 32;
  o.batch = 4;
  o.steps = steps;
  o.warmup = 5;
  o.adamw.lr = 5e-3;
  o.eval_every = 0;
  o.eval_max_bytes = 2000;
  o.seed = 3;
  return o;
}

}  // namespace

TEST_CASE("byte corpus and window sampler", "[train][data]") {
  std::vector<std::uint8_t> bytes(1000);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(i % 251);
  auto c = ByteCorpus::from_bytes(bytes, "ramp");
  auto [tr, va] = c.split(0.1);
  CHECK(tr.size() == 900);
  CHECK(va.size() == 100);
  CHECK(va.bytes()[0] == bytes[900]);

  WindowSampler s(42, 16);
  std::vector<std::int32_t> a(3 * 17), b(3 * 17), d(3 * 17);
  s.fill(tr, 5, 3, a);
  s.fill(tr, 5, 3, b);
  s.fill(tr, 6, 3, d);
  CHECK(a == b);  // a pure function of (seed, step)
  CHECK(a != d);
  for (int r = 0; r < 3; ++r)  // each row is a contiguous window of the corpus
    for (int i = 1; i < 17; ++i) {
      int const prev = a[r * 17 + i - 1], cur = a[r * 17 + i];
      REQUIRE(cur == (prev + 1) % 251);
    }
  // every start is reachable and in range; roughly uniform
  std::vector<int> hits(tr.size() - 16, 0);
  for (std::uint64_t st = 0; st < 20000; ++st) {
    auto const p = s.start(st, 0, tr.size());
    REQUIRE(p <= tr.size() - 17);
    ++hits[p];
  }
  CHECK(*std::min_element(hits.begin(), hits.end()) > 0);

  auto shorty = ByteCorpus::from_bytes(std::vector<std::uint8_t>(10, 1), "short");
  CHECK_THROWS_WITH(s.fill(shorty, 0, 1, std::span<std::int32_t>(a.data(), 17)), Catch::Contains("fewer than one training window"));
  CHECK_THROWS_WITH(ByteCorpus::from_file(tmpdir("nonexistent") / "x.txt"), Catch::Contains("cannot open"));
  fs::create_directories(tmpdir("empty"));
  std::ofstream(tmpdir("empty") / "e.txt").close();
  CHECK_THROWS_WITH(ByteCorpus::from_file(tmpdir("empty") / "e.txt"), Catch::Contains("empty"));
  CHECK_THROWS_WITH(shorty.split(0.1), Catch::Contains("too small"));
}

TEST_CASE("AdamW step, decoupled decay and the no-decay set", "[train][optim]") {
  ModelConfig const c = tiny_config();
  auto w = mbtest::random_weights<double>(c, 1);
  auto const w0 = w;
  ModelWeights<double> g(c);
  std::mt19937_64 rng(2);
  for (auto& x : g.flat()) x = std::normal_distribution<double>(0, 1)(rng);
  AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0.1;
  AdamW<double> opt(c, o);
  opt.step(w.flat(), std::span<double const>(g.flat()), 0.01);
  opt.step(w.flat(), std::span<double const>(g.flat()), 0.02);
  for (ParamInfo const& p : w.parameters()) {
    double const wd = p.no_weight_decay ? 0 : 0.1;
    CHECK(p.no_weight_decay == (p.name.ends_with("A_log") || p.name.ends_with(".D") || p.name.ends_with("bias") ||
                                p.name.ends_with("norm.weight") || p.name.ends_with("norm_f.weight")));
    for (std::size_t i = 0; i < p.numel; i += 7) {
      // two steps by hand, same gradient both times
      double x = w0.tensor(p)[i], gi = g.tensor(p)[i], m = 0, v = 0;
      for (int t = 1; t <= 2; ++t) {
        double const lr = t == 1 ? 0.01 : 0.02;
        m = 0.9 * m + 0.1 * gi;
        v = 0.95 * v + 0.05 * gi * gi;
        double const mh = m / (1 - std::pow(0.9, t)), vh = v / (1 - std::pow(0.95, t));
        x -= lr * (mh / (std::sqrt(vh) + 1e-8) + wd * x);
      }
      REQUIRE(w.tensor(p)[i] == Approx(x).epsilon(1e-12).margin(1e-15));
    }
  }
  CHECK(opt.step_count() == 2);
  CHECK_THROWS_AS(AdamW<double>(c, AdamWOptions{-1}), Error);
}

TEST_CASE("schedule and clipping", "[train][optim]") {
  CosineSchedule s{1.0, 0.1, 10, 110};
  CHECK(s(0) == Approx(0.1));
  CHECK(s(9) == Approx(1.0));
  CHECK(s(10) == Approx(1.0));
  CHECK(s(60) == Approx(0.55));
  CHECK(s(110) == Approx(0.1));
  CHECK(s(500) == Approx(0.1));
  std::vector<float> g = {3, 4};
  CHECK(clip_grad_norm(std::span<float>(g), 1.0) == Approx(5.0));
  CHECK(std::hypot(g[0], g[1]) == Approx(1.0).epsilon(1e-5));
  std::vector<float> h = {0.3f, 0.4f};
  clip_grad_norm(std::span<float>(h), 1.0);
  CHECK(h[0] == 0.3f);  // below the threshold: untouched
}

TEST_CASE("mamba_ssm initialisation", "[train][init]") {
  ModelConfig c = tiny_config();
  c.n_layer = 4;
  ModelWeights<double> a(c), b(c), d(c);
  initialize_mamba(a, 7);
  initialize_mamba(b, 7);
  initialize_mamba(d, 8);
  CHECK(std::equal(a.flat().begin(), a.flat().end(), b.flat().begin()));
  CHECK(!std::equal(a.flat().begin(), a.flat().end(), d.flat().begin()));
  for (int l = 0; l < c.n_layer; ++l) {
    auto const& L = a.layers[l];
    for (int i = 0; i < c.d_inner(); ++i) {
      REQUIRE(L.D[i] == 1.0);
      double const dt = std::log1p(std::exp(L.dt_proj_b[i]));  // softplus(bias) = the initial dt
      REQUIRE(dt >= 1e-4 * 0.999);
      REQUIRE(dt <= 0.1 * 1.001);
      for (int n = 0; n < c.d_state; ++n) REQUIRE(L.A_log[i * c.d_state + n] == Approx(std::log(n + 1.0)));
    }
    double const bound = 1 / std::sqrt(double(c.d_inner())) / std::sqrt(double(c.n_layer));
    for (int i = 0; i < c.d_model * c.d_inner(); ++i) REQUIRE(std::abs(L.out_proj_w[i]) <= bound);
    CHECK(L.norm_w[0] == 1.0);
    CHECK(L.norm_b[0] == 0.0);
  }
  double s2 = 0;
  auto const emb = a.tensor(*a.find("backbone.embedding.weight"));
  for (double x : emb) s2 += x * x;
  CHECK(std::sqrt(s2 / double(emb.size())) == Approx(0.02).epsilon(0.05));
}

TEST_CASE("training lowers the validation loss", "[train][trainer]") {
  auto [tr, va] = shakespeare(60000).split(0.1);
  auto opt = tiny_options(120);
  fs::path const out = tmpdir("learns");
  Trainer<float> t(tiny_config(), tr, va, opt, out, backend::Cpu{2});
  double const before = t.evaluate().bits_per_byte;
  std::vector<double> losses;
  typename Trainer<float>::Callbacks cb;
  cb.on_step = [&](StepStats const& s) { losses.push_back(s.bits_per_byte); };
  CHECK(t.run(cb) == StopReason::kDone);
  double const after = t.evals().back().bits_per_byte;
  INFO("validation bits/byte " << before << " -> " << after);
  CHECK(before > 7.5);          // ~8 bits: uniform over bytes at init
  CHECK(after < before - 2.5);  // learns at least the character distribution
  CHECK(losses.size() == 120);
  // the checkpoint loads as a plain model with the same validation score
  Model<float> m(load_weights<float>(out), backend::Cpu{2});
  EvalOptions eo;
  eo.chunk = opt.eval_chunk;
  eo.max_bytes = opt.eval_max_bytes;
  CHECK(evaluate_bits_per_byte(m, va.bytes(), eo).bits_per_byte == Approx(after).epsilon(1e-6));
}

TEST_CASE("resume is bit-exact: 2 x N steps equal 2N uninterrupted", "[train][resume]") {
  auto [tr, va] = shakespeare(30000).split(0.1);
  auto const opt = tiny_options(40);
  auto collect = [](std::vector<double>& v) {
    typename Trainer<float>::Callbacks cb;
    cb.on_step = [&v](StepStats const& s) { v.push_back(s.loss); };
    return cb;
  };
  std::vector<double> whole, split;
  fs::path const a = tmpdir("resume_whole"), b = tmpdir("resume_split");
  Trainer<float> full(tiny_config(), tr, va, opt, a, backend::Cpu{2});
  full.run(collect(whole));

  {
    Trainer<float> first(tiny_config(), tr, va, opt, b, backend::Cpu{2});
    int n = 0;
    auto cb = collect(split);
    cb.should_stop = [&n, &split] { return split.size() >= 20 && ++n > 0; };  // stop after step 20
    CHECK(first.run(cb) == StopReason::kInterrupted);
    CHECK(first.step() == 20);
  }
  auto second = Trainer<float>::resume(b, tr, va, opt, backend::Cpu{2});
  CHECK(second.step() == 20);
  second.run(collect(split));
  REQUIRE(split.size() == whole.size());
  for (std::size_t i = 0; i < whole.size(); ++i) {
    INFO("step " << i + 1);
    REQUIRE(split[i] == whole[i]);  // bitwise
  }
  CHECK(std::equal(second.weights().flat().begin(), second.weights().flat().end(), full.weights().flat().begin()));
}

TEST_CASE("checkpoints are atomic: a failure mid-write keeps the previous one", "[train][checkpoint]") {
  ModelConfig const c = tiny_config();
  auto w = mbtest::random_weights<float>(c, 5);
  AdamW<float> opt(c, AdamWOptions{});
  fs::path const out = tmpdir("atomic");
  ModelWeights<float> g(c);
  opt.step(w.flat(), std::span<float const>(g.flat()), 1e-3);
  auto const first = save_checkpoint(out, w, opt, {{"note", "first"}});
  auto const w_first = w;
  opt.step(w.flat(), std::span<float const>(g.flat()), 1e-3);
  for (auto& x : w.flat()) x += 1.0f;
  // invalid UTF-8 in the trainer state makes the JSON writer throw after the weights and the
  // optimizer state of the new checkpoint are already on disk
  CHECK_THROWS(save_checkpoint(out, w, opt, {{"note", std::string("\xff\xfe")}}));
  CHECK(fs::canonical(out / "latest") == fs::canonical(first));
  for (auto const& e : fs::directory_iterator(out)) CHECK_FALSE(e.path().string().ends_with(".tmp"));
  auto const back = load_checkpoint<float>(out, AdamWOptions{});
  CHECK(back.optimizer.step_count() == 1);
  CHECK(std::equal(back.weights.flat().begin(), back.weights.flat().end(), w_first.flat().begin()));
  CHECK(back.trainer_state["note"] == "first");
  // `mambabyte eval --model OUT` follows latest
  CHECK(fs::canonical(model_directory(out)) == fs::canonical(first));
  // the next good save replaces it and prunes beyond `keep`
  save_checkpoint(out, w, opt, {}, 1);
  CHECK_FALSE(fs::exists(first));
}

TEST_CASE("bad training input is a clear error", "[train][errors]") {
  auto [tr, va] = shakespeare(20000).split(0.1);
  auto opt = tiny_options(5);
  SECTION("data shorter than a window") {
    auto shorty = ByteCorpus::from_bytes(std::vector<std::uint8_t>(20, 'a'), "tiny.txt");
    CHECK_THROWS_WITH(Trainer<float>(tiny_config(), shorty, va, opt, tmpdir("short")),
                      Catch::Contains("tiny.txt") && Catch::Contains("fewer than one window"));
  }
  SECTION("nonsense options") {
    auto o = opt;
    o.batch = 0;
    CHECK_THROWS_WITH(Trainer<float>(tiny_config(), tr, va, o, tmpdir("opt")), Catch::Contains("--batch"));
    o = opt;
    o.adamw.lr = std::nan("");
    CHECK_THROWS_WITH(Trainer<float>(tiny_config(), tr, va, o, tmpdir("opt")), Catch::Contains("learning rate"));
  }
  SECTION("unwritable output") {
    fs::path const file = tmpdir("file_not_dir");
    std::ofstream(file) << "x";
    Trainer<float> t(tiny_config(), tr, va, opt, file / "run");
    CHECK_THROWS_WITH(t.run(), Catch::Contains("cannot create output directory"));
  }
  SECTION("resume on other data") {
    fs::path const out = tmpdir("otherdata");
    auto o = opt;
    o.steps = 2;
    Trainer<float>(tiny_config(), tr, va, o, out).run();
    auto [tr2, va2] = shakespeare(20001).split(0.1);
    CHECK_THROWS_WITH(Trainer<float>::resume(out, tr2, va2, o), Catch::Contains("training data differs"));
    CHECK_NOTHROW(Trainer<float>::resume(out, tr, va, o));
  }
  SECTION("resume without a checkpoint") {
    CHECK_THROWS_AS(Trainer<float>::resume(tmpdir("none"), tr, va, opt), Error);
  }
  SECTION("divergence stops with the step number and keeps the last good checkpoint") {
    fs::path const out = tmpdir("diverge");
    auto o = opt;
    o.steps = 4;
    Trainer<float> good(tiny_config(), tr, va, o, out);
    good.run();
    auto const kept = fs::canonical(out / "latest");
    // poison: a NaN in the weights makes the next loss NaN
    auto o2 = o;
    o2.steps = 10;
    auto t = Trainer<float>::resume(out, tr, va, o2);
    t.mutable_weights().norm_f_w[0] = std::nanf("");  // used by every prediction
    CHECK_THROWS_WITH(t.run(), Catch::Contains("diverged") && Catch::Contains("at step 5"));
    CHECK(fs::canonical(out / "latest") == kept);
  }
}

TEST_CASE("the gradient norm does not depend on the thread count", "[train][optim]") {
  std::vector<float> g(1'000'003);
  std::mt19937_64 rng(1);
  for (auto& x : g) x = std::uniform_real_distribution<float>(-1, 1)(rng);
  double const one = [&] { backend::cpu::set_default_threads(1); return global_norm(std::span<float const>(g)); }();
  for (int t : {2, 3, 5, 8}) {
    backend::cpu::set_default_threads(t);
    for (int rep = 0; rep < 5; ++rep) REQUIRE(global_norm(std::span<float const>(g)) == one);
  }
  backend::cpu::set_default_threads(2);
}
