// The whole model on the GPU (cuda::Model, DeviceWeights, DeviceState, CudaStepEngine) against
// the CPU backend in double (itself checked against finite differences, the fp64 oracle and
// PyTorch goldens in tests/test_backward_model.cpp and tests/test_golden.cpp):
//  - training step: loss and every parameter's gradient, fp32 (tight) and bf16 (loose), every
//    scan policy, LayerNorm/RMSNorm, tied/untied, biases, padded vocabulary, odd sizes;
//  - stateful forward in chunks and the graph-captured decode step vs the CPU forward; step vs
//    parallel; snapshot/restore; bits per byte vs the CPU;
//  - the fused decode step (decode.cuh) vs the parallel forward on the device, fp32 and bf16,
//    batch 1 (x_proj fused into the in_proj kernel), 5 and 64 (separate x_proj kernel, several
//    batch passes), odd shapes; the graph step bitwise equal to forward(length 1);
//  - the engine: bitwise determinism, exact resume (2 + 2 steps == 4 steps), the update vs the
//    CPU AdamW, a non-finite loss leaves the weights untouched.
// Without a GPU every case is skipped with a message (label `cuda`). [small]: the sanitizer set.
#include <mambabyte/cuda.hpp>
#include <mambabyte/mambabyte.hpp>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.hpp"

namespace {

using namespace mambabyte;
namespace mcu = mambabyte::cuda;
using mbtest::cast_weights;
using mbtest::random_tokens;
using mbtest::random_weights;
using mbtest::rel_err;

using mbtest::have_gpu;

backend::Cuda make_be() {
  static cudaStream_t s = [] {
    cudaStream_t x = nullptr;
    MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
    return x;
  }();
  backend::Cuda be;
  be.stream = s;
  return be;
}

ModelConfig config_variant(int v) {
  ModelConfig c;
  switch (v) {
    case 0:  // MambaByte layout: LayerNorm + bias, untied head
      c.d_model = 32; c.n_layer = 2; c.d_state = 16; c.d_conv = 4; c.tie_embeddings = false;
      break;
    case 1:  // RMSNorm, tied, in/out biases, no conv bias, odd sizes, padded vocab
      c.d_model = 24; c.n_layer = 2; c.d_state = 8; c.d_conv = 3; c.dt_rank = 5; c.expand = 3;
      c.bias = true; c.conv_bias = false; c.rms_norm = true; c.tie_embeddings = true; c.vocab_size = 264;
      break;
    default:  // several channel blocks (d_inner 200 > 128) and a ragged one, d_conv 2
      c.d_model = 100; c.n_layer = 1; c.d_state = 16; c.d_conv = 2; c.rms_norm = false; c.tie_embeddings = false;
      c.vocab_size = 259;
      break;
  }
  c.finalize();
  return c;
}

/// Per tensor: ||g_gpu - g_cpu|| / max(||g_cpu||, floor * ||g_cpu,all||) (small tensors are judged
/// against the whole gradient's scale, not their own near-zero norm).
double worst_tensor_error(ModelWeights<float> const& g, ModelWeights<double> const& ref, std::string* which) {
  double total = 0;
  for (double x : ref.flat()) total += x * x;
  total = std::sqrt(total);
  double worst = 0;
  for (auto const& p : ref.parameters()) {
    auto a = g.tensor(p);
    auto b = ref.tensor(p);
    double num = 0, den = 0;
    for (std::size_t i = 0; i < b.size(); ++i) {
      double const d = double(a[i]) - b[i];
      num += d * d;
      den += b[i] * b[i];
    }
    double const e = std::sqrt(num) / std::max(std::sqrt(den), 1e-3 * total);
    if (e > worst) {
      worst = e;
      *which = p.name;
    }
  }
  return worst;
}

struct StepCheck {
  double loss_rel = 0, grad_rel = 0;
  std::string worst;
};

/// keep_states: the GPU model keeps the scan states from the forward (set_keep_scan_states).
template <class S, class Policy>
StepCheck compare_step(ModelConfig const& c, int batch, int L, std::uint64_t seed, bool keep_states = false) {
  auto const wd = random_weights<double>(c, seed);
  auto const wf = cast_weights<float>(wd);
  auto const wd_exact = cast_weights<double>(wf);  // the CPU sees exactly the GPU's fp32 weights
  std::mt19937_64 rng(seed + 1);
  auto tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), c.vocab_size, rng);
  for (int b = 0; b < batch; ++b)
    for (int t = 1; t <= L; ++t) tokens[b * (L + 1) + t] %= 256;  // targets are bytes
  TrainingModel<double, scan::Sequential> cpu;
  auto gcpu = TrainingModel<double, scan::Sequential>::make_gradients(c);
  double const loss_cpu = cpu.forward_backward(wd_exact, tokens, batch, gcpu);

  auto const be = make_be();
  mcu::DeviceWeights<S> w(wf, be);
  mcu::DeviceWeights<float> g(c, be);
  mcu::Model<S, Policy> m(be);
  m.set_keep_scan_states(keep_states);
  double const loss_gpu = m.forward_backward(w, tokens, batch, g);
  ModelWeights<float> gh(c);
  g.download(gh);
  StepCheck r;
  r.loss_rel = std::abs(loss_gpu - loss_cpu) / std::abs(loss_cpu);
  r.grad_rel = worst_tensor_error(gh, gcpu, &r.worst);
  INFO("loss gpu " << loss_gpu << " cpu " << loss_cpu << "; worst gradient " << r.worst << " " << r.grad_rel);
  return r;
}

/// An fp32 step (policy P) against the CPU in double: loss within 2e-6, every tensor within 2e-4.
template <class P>
void check_fp32_step(ModelConfig const& c, int batch, int L, std::uint64_t seed, bool keep_states) {
  auto const r = compare_step<float, P>(c, batch, L, seed, keep_states);
  CAPTURE(batch, L, keep_states, r.worst, r.loss_rel, r.grad_rel);
  CHECK(r.loss_rel < 2e-6);
  CHECK(r.grad_rel < 2e-4);
}

/// The fp32 step (Sequential) of every config variant at (1, 1), (2, 37), (3, 130), and the
/// bf16 step (Auto) at (2, 64), against the CPU in double.
void check_steps_against_cpu(bool keep_states) {
  for (int v = 0; v < 3; ++v) {
    CAPTURE(v);
    auto const c = config_variant(v);
    for (auto [batch, L] : {std::pair{1, 1}, std::pair{2, 37}, std::pair{3, 130}})
      check_fp32_step<scan::Sequential>(c, batch, L, 100 + v, keep_states);
    auto const r = compare_step<mcu::bf16, scan::Auto>(c, 2, 64, 200 + v, keep_states);
    CAPTURE(r.worst, r.loss_rel, r.grad_rel);
    CHECK(r.loss_rel < 1e-2);
    CHECK(r.grad_rel < 0.1);  // bf16 activations: ~3 significant digits per operator
  }
}

}  // namespace

TEST_CASE("cuda model: fp32 and bf16 training steps equal the CPU step in double", "[cuda][model][small]") {
  REQUIRE_GPU();
  check_steps_against_cpu(false);
}

TEST_CASE("cuda model: fp32 training step in every scan policy", "[cuda][model]") {
  REQUIRE_GPU();
  check_fp32_step<scan::Chunked<16>>(config_variant(0), 2, 100, 7, false);
  check_fp32_step<scan::Auto>(config_variant(0), 2, 700, 8, false);
}

TEST_CASE("cuda model: gradients accumulate, are scaled, and are bitwise reproducible", "[cuda][model]") {
  REQUIRE_GPU();
  auto const c = config_variant(1);
  auto const wf = random_weights<float>(c, 5);
  std::mt19937_64 rng(6);
  auto tokens = random_tokens(2 * 41, 256, rng);
  auto const be = make_be();
  mcu::DeviceWeights<float> w(wf, be);
  mcu::Model<float> m(be);
  mcu::DeviceWeights<float> g1(c, be), g2(c, be);
  double const l1 = m.forward_backward(w, tokens, 2, g1);
  double const l2 = m.forward_backward(w, tokens, 2, g2, 0.5);
  (void)m.forward_backward(w, tokens, 2, g2, 0.5);  // g2 = 0.5 g + 0.5 g
  CHECK(l1 == l2);
  ModelWeights<float> h1(c), h2(c);
  g1.download(h1);
  g2.download(h2);
  CHECK(rel_err(h2.flat(), h1.flat()) < 1e-6);
  mcu::DeviceWeights<float> g3(c, be);
  (void)m.forward_backward(w, tokens, 2, g3);
  ModelWeights<float> h3(c);
  g3.download(h3);
  CHECK(std::equal(h1.flat().begin(), h1.flat().end(), h3.flat().begin()));  // deterministic
}

namespace {
/// One model object, random weights of a config variant and a batch of random tokens (windows
/// of L + 1 bytes); step() runs one forward_backward and returns the loss, the gradients and
/// the model's activation_bytes().
template <class S>
struct StepFixture {
  ModelConfig c;
  int batch, L;
  std::vector<std::int32_t> tokens;
  backend::Cuda be = make_be();
  mcu::DeviceWeights<S> w;
  mcu::Model<S> m;
  StepFixture(int variant, int b, int len, std::uint64_t seed)
      : c(config_variant(variant)), batch(b), L(len), w(random_weights<float>(c, seed), be), m(be) {
    std::mt19937_64 rng(seed + 1);
    tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), 256, rng);
  }
  std::tuple<double, ModelWeights<float>, std::size_t> step() {
    mcu::DeviceWeights<float> g(c, be);
    double const loss = m.forward_backward(w, tokens, batch, g);
    ModelWeights<float> h(c);
    g.download(h);
    return {loss, h, m.activation_bytes()};
  }
};

/// Loss and every gradient of one step with the activations kept (the default) and recomputed
/// (set_keep_activations(false)) on the same model object: bitwise equal, also after an
/// inference call in between (which must not read the training step's per-layer slices).
template <class S>
void check_keep_equals_recompute(int variant, int batch, int L, std::uint64_t seed) {
  StepFixture<S> f(variant, batch, L, seed);
  auto const& c = f.c;
  auto const& tokens = f.tokens;
  auto const& be = f.be;
  auto const& w = f.w;
  auto& m = f.m;
  REQUIRE(m.keep_activations());
  auto run = [&](bool keep) {
    m.set_keep_activations(keep);
    auto [loss, h, bytes] = f.step();
    return std::pair{loss, h};
  };
  auto const [l_keep, g_keep] = run(true);
  auto const [l_re, g_re] = run(false);
  // right after a (recomputing) step, a stateful forward of the same batch and length equals a
  // fresh model's: the inference scratch is fitted again, and the final state is written
  {
    std::vector<std::int32_t> inputs;
    for (int b = 0; b < batch; ++b)
      inputs.insert(inputs.end(), tokens.begin() + b * (L + 1), tokens.begin() + b * (L + 1) + L);
    auto forward_of = [&](mcu::Model<S>& model) {
      mcu::DeviceState st(c, batch, be);
      float const* lg = model.forward(w, inputs, batch, L, st);
      MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));  // the model's stream does not block the copies
      std::vector<float> logits(static_cast<std::size_t>(batch) * L * 256), state(st.size());
      MAMBABYTE_CUDA_CHECK(cudaMemcpy(logits.data(), lg, logits.size() * sizeof(float), cudaMemcpyDeviceToHost));
      MAMBABYTE_CUDA_CHECK(cudaMemcpy(state.data(), st.data(), state.size() * sizeof(float), cudaMemcpyDeviceToHost));
      return std::pair{logits, state};
    };
    mcu::Model<S> fresh(be);
    auto const [lg_after, st_after] = forward_of(m);
    auto const [lg_fresh, st_fresh] = forward_of(fresh);
    CHECK(lg_after == lg_fresh);
    CHECK(st_after == st_fresh);
  }
  // inference in between, then a kept step again
  mcu::DeviceState st(c, batch, be);
  (void)m.forward(w, std::span<std::int32_t const>(tokens.data(), static_cast<std::size_t>(batch) * 3), batch, 3, st);
  auto const [l_again, g_again] = run(true);
  CHECK(l_keep == l_re);
  CHECK(l_keep == l_again);
  CHECK(std::equal(g_keep.flat().begin(), g_keep.flat().end(), g_re.flat().begin()));
  CHECK(std::equal(g_keep.flat().begin(), g_keep.flat().end(), g_again.flat().begin()));
  bool any = false;
  for (float x : g_keep.flat()) any = any || x != 0.f;
  CHECK(any);
}
}  // namespace

TEST_CASE("cuda model: a step keeping the scan states equals the CPU step in double", "[cuda][model][small]") {
  // set_keep_scan_states: the forward scans store their states every 4 steps and the scan
  // backward starts from them; the same bars as the default step against the CPU in double
  // (Sequential: one segment; Auto at 700 steps: a chunked forward and time segments).
  REQUIRE_GPU();
  check_steps_against_cpu(true);
  check_fp32_step<scan::Auto>(config_variant(0), 2, 700, 8, true);
}

TEST_CASE("cuda model: keeping the scan states: the same loss bit for bit, gradients to rounding, deterministic",
          "[cuda][model][small]") {
  REQUIRE_GPU();
  auto check = [](auto tag, int variant, int batch, int L, std::uint64_t seed, double tol) {
    using S = decltype(tag);
    StepFixture<S> f(variant, batch, L, seed);
    auto const& c = f.c;
    REQUIRE(!f.m.keep_scan_states());
    auto run = [&](bool keep) {
      f.m.set_keep_scan_states(keep);
      return f.step();
    };
    auto const [l0, g0, b0] = run(false);
    auto const [l1, g1, b1] = run(true);
    auto const [l2, g2, b2] = run(true);
    auto const [l3, g3, b3] = run(false);
    CAPTURE(variant, batch, L);
    CHECK(l1 == l0);  // the forward writes the same outputs with or without the states
    CHECK(l2 == l1);
    double const e = rel_err(g1.flat(), g0.flat());
    CAPTURE(e);
    CHECK(e < tol);
    CHECK(std::equal(g1.flat().begin(), g1.flat().end(), g2.flat().begin()));  // deterministic
    CHECK(std::equal(g0.flat().begin(), g0.flat().end(), g3.flat().begin()));  // and back
    // the states: 4 bytes x layers x batch x ceil(L / 4) x d_inner x d_state (each layer's
    // rounded up to 16 bytes). Exactly that more because this object's workspace, sized by the
    // first (stateless) step, never shrinks (fit only grows buffers): the order of the runs matters
    std::size_t const per_layer = std::size_t(batch) * ((L + 3) / 4) * c.d_inner() * c.d_state;
    CHECK(b1 - b0 == std::size_t(4) * c.n_layer * ((per_layer + 3) / 4 * 4));
    CHECK(b2 == b1);
    CHECK(b3 == b0);
  };
  for (int v = 0; v < 3; ++v) {
    check(float{}, v, 2, 37, 400 + v, 1e-5);
    check(mcu::bf16{}, v, 3, 130, 410 + v, 1e-2);
  }
  // long enough for a chunked forward and time segments in the backward (Auto)
  check(float{}, 0, 2, 700, 420, 1e-5);
  check(mcu::bf16{}, 2, 1, 1030, 421, 1e-2);
  // a policy whose forward does not write the states is refused when asked
  mcu::Model<float, scan::Associative> assoc(make_be());
  CHECK_THROWS_WITH(assoc.set_keep_scan_states(true), Catch::Contains("does not write the states"));
  assoc.set_keep_scan_states(false);
}

// Not in [small]: compute-sanitizer counts the two deliberately failing cudaMalloc calls (and the
// cudaGetLastError that clears each) as API errors (run 139: 4 such reports, no memory errors).
TEST_CASE("cuda model: a step that does not fit in device memory is refused with what to change, and the model "
          "stays usable", "[cuda][model][oom]") {
  REQUIRE_GPU();
  // a device buffer larger than any GPU: the message names the size and the device's free memory
  try {
    mambabyte::backend::cuda::DeviceBuffer<float> huge(std::size_t(1) << 50);
    FAIL("a 4 PiB allocation succeeded");
  } catch (Error const& e) {
    std::string const m = e.what();
    CAPTURE(m);
    CHECK_THAT(m, Catch::Contains("cannot allocate 4503599627370496 bytes"));
    CHECK_THAT(m, Catch::Contains("GiB free of"));
  }
  CHECK(cudaGetLastError() == cudaSuccess);  // not left as the next call's error
  // a training step of ~1 TB at 256 x 8192 bytes (8 layers, d_inner 4096): refused before it runs,
  // naming the two memory options and their sizes
  ModelConfig big;
  big.d_model = 2048; big.n_layer = 8; big.d_state = 16; big.d_conv = 4; big.tie_embeddings = false;
  big.finalize();
  auto const be = make_be();
  mcu::Model<mcu::bf16> m(be);
  m.set_keep_scan_states(true);
  {
    mcu::DeviceWeights<mcu::bf16> w(big, be);  // zeros: the step never gets to read them
    mcu::DeviceWeights<float> g(big, be);
    std::vector<std::int32_t> tokens(std::size_t(256) * 8193, 65);
    try {
      (void)m.forward_backward(w, tokens, 256, g);
      FAIL("a ~1 TB training step ran");
    } catch (Error const& e) {
      std::string const msg = e.what();
      CAPTURE(msg);
      CHECK_THAT(msg, Catch::Contains("the training step at 256 x 8192 bytes does not fit in device memory"));
      CHECK_THAT(msg, Catch::Contains("cannot allocate"));
      CHECK_THAT(msg, Catch::Matches(".*kept for the backward, [0-9.]+ GiB \\(set_keep_activations\\(false\\), CLI "
                                     "--recompute-activations, saves [0-9.]+ GiB\\).*"));
      CHECK_THAT(msg, Catch::Contains("set_keep_scan_states(false), CLI without --keep-scan-states"));
      CHECK_THAT(msg, Catch::Contains("the residual stream of every layer, 144.0 GiB"));  // 9 x 256 x 8192 x 2048 x 4
    }
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(m.activation_bytes() == 0);  // what the failed call did allocate was given back
  }
  // the same model object then trains a small model as if nothing had happened: against a fresh one
  StepFixture<mcu::bf16> f(0, 2, 37, 430);
  mcu::DeviceWeights<float> g1(f.c, be), g2(f.c, be);
  double const l1 = m.forward_backward(f.w, f.tokens, f.batch, g1);
  double const l2 = f.m.forward_backward(f.w, f.tokens, f.batch, g2);
  CHECK(std::isfinite(l1));
  CHECK(l1 == l2);
  ModelWeights<float> h1(f.c), h2(f.c);
  g1.download(h1);
  g2.download(h2);
  CHECK(rel_err(h1.flat(), h2.flat()) < 1e-2);  // with the scan states kept (m) against without (f.m)
}

TEST_CASE("cuda model: a step that keeps activations equals one that recomputes them, bitwise", "[cuda][model][small]") {
  REQUIRE_GPU();
  for (int v = 0; v < 3; ++v) {
    CAPTURE(v);
    check_keep_equals_recompute<float>(v, 2, 37, 300 + v);
    check_keep_equals_recompute<mcu::bf16>(v, 3, 130, 310 + v);
  }
}

namespace {
/// Three layer-by-layer decode steps of `batch` sequences with a fused variant on (the default)
/// and off (`use(m, false)`: dt_proj as a separate GEMM, or the conv kernel + the x_proj GEMM):
/// the logits agree to the storage type's rounding (the two sum in different orders).
template <class S, class Use, class After>
double step_variant_gap(ModelConfig const& c, int batch, std::uint64_t seed, Use&& use, After&& after) {
  auto const wf = random_weights<float>(c, seed);
  auto const be = make_be();
  mcu::DeviceWeights<S> w(wf, be);
  std::mt19937_64 rng(seed + 1);
  auto const tokens = random_tokens(static_cast<std::size_t>(batch) * 3, 256, rng);
  auto run = [&](bool fused) {
    mcu::Model<S> m(be);
    use(m, fused);
    mcu::DeviceState st(c, batch, be);
    std::vector<float> all;
    for (int t = 0; t < 3; ++t) {
      std::vector<std::int32_t> tok(tokens.begin() + t * batch, tokens.begin() + (t + 1) * batch);
      float const* lg = m.step(w, tok, st);
      MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
      std::vector<float> h(static_cast<std::size_t>(batch) * 256);
      MAMBABYTE_CUDA_CHECK(cudaMemcpy(h.data(), lg, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
      all.insert(all.end(), h.begin(), h.end());
    }
    CHECK_FALSE(m.persistent_decode());
    after(m, fused);
    return all;
  };
  return rel_err(run(true), run(false));
}
}  // namespace

TEST_CASE("cuda model: the step's dt_proj inside the state update equals the dt_proj GEMM", "[cuda][model][small]") {
  REQUIRE_GPU();
  auto use = [](auto& m, bool fused) { m.set_step_dt_projection(fused); };
  auto none = [](auto&, bool) {};
  double const f = step_variant_gap<float>(config_variant(0), 5, 700, use, none);
  CHECK(f < 1e-5);
  double const h = step_variant_gap<mcu::bf16>(config_variant(0), 64, 701, use, none);
  CHECK(h < 2e-2);
}

TEST_CASE("cuda model: the step's conv + x_proj kernel equals the conv kernel and the x_proj GEMM",
          "[cuda][model][small]") {
  REQUIRE_GPU();
  auto use = [](auto& m, bool fused) { m.set_step_conv_xproj(fused); };
  auto ran = [](auto& m, bool fused) { CHECK(m.step_conv_xproj_used() == fused); };
  // x_proj width 80 (d_model 256, d_state 32): the fp32 kernel's W slice needs 50 KB of shared
  // memory, raised before the graph capture (conv_xproj_setup in prepare_inference)
  ModelConfig wide;
  wide.d_model = 256; wide.n_layer = 2; wide.d_state = 32; wide.d_conv = 4; wide.tie_embeddings = false;
  wide.finalize();
  REQUIRE(wide.dt_rank + 2 * wide.d_state == 80);
  for (int batch : {1, 9}) {
    CAPTURE(batch);
    double const f = step_variant_gap<float>(config_variant(0), batch, 710, use, ran);
    CAPTURE(f);
    CHECK(f < 1e-5);  // (at this small shape the two orders happen to agree bitwise at batch 1)
    double const fw = step_variant_gap<float>(wide, batch, 712, use, ran);
    CAPTURE(fw);
    CHECK(fw < 1e-5);
  }
  static_assert(mcu::Model<mcu::bf16>::kStepConvXprojMaxBatchBf16 >= 20);
  double const h = step_variant_gap<mcu::bf16>(config_variant(0), 20, 711, use, ran);  // bf16: up to batch 32
  CAPTURE(h);
  CHECK(h < 2e-2);
  // above kStepConvXprojMaxBatchBf16 the bf16 step keeps the conv kernel + GEMM
  (void)step_variant_gap<mcu::bf16>(config_variant(0), 33, 713, use, [](auto& m, bool) { CHECK_FALSE(m.step_conv_xproj_used()); });
}

TEST_CASE("cuda model: stateful forward in chunks and the graph decode step match the CPU", "[cuda][model][small]") {
  REQUIRE_GPU();
  for (int v = 0; v < 3; ++v) {
    CAPTURE(v);
    auto const c = config_variant(v);
    auto const wd = cast_weights<double>(random_weights<float>(c, 300 + v));
    auto const wf = cast_weights<float>(wd);
    int const batch = 3, L = 45, split = 29;
    std::mt19937_64 rng(301);
    auto const tokens = random_tokens(static_cast<std::size_t>(batch) * L, c.vocab_size, rng);
    Model<double> cpu(wd);
    auto const ref = cpu.forward(tokens, batch, L);  // (batch*L, V), no state
    int const V = c.vocab_size;

    auto const be = make_be();
    mcu::DeviceWeights<float> w(wf, be);
    mcu::Model<float> m(be);
    mcu::DeviceState st(c, batch, be);
    // chunk 1 (split tokens per sequence), then the rest one step at a time through the graph
    std::vector<float> got(static_cast<std::size_t>(batch) * L * 256);
    auto rows = [&](int t0, int len) {
      std::vector<std::int32_t> x;
      for (int b = 0; b < batch; ++b)
        for (int t = t0; t < t0 + len; ++t) x.push_back(tokens[b * L + t]);
      return x;
    };
    {
      auto const x = rows(0, split);
      float const* d = m.forward(w, x, batch, split, st);
      std::vector<float> h(static_cast<std::size_t>(batch) * split * 256);
      MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, h.size() * 4, cudaMemcpyDeviceToHost, be.stream));
      MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
      for (int b = 0; b < batch; ++b)
        for (int t = 0; t < split; ++t)
          std::copy_n(&h[(static_cast<std::size_t>(b) * split + t) * 256], 256, &got[(static_cast<std::size_t>(b) * L + t) * 256]);
    }
    mcu::DeviceState snap = st.snapshot();
    std::vector<float> first_step(batch * 256);
    for (int t = split; t < L; ++t) {
      auto const x = rows(t, 1);
      float const* d = m.step(w, x, st);
      std::vector<float> h(static_cast<std::size_t>(batch) * 256);
      MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, h.size() * 4, cudaMemcpyDeviceToHost, be.stream));
      MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
      if (t == split) first_step = h;
      for (int b = 0; b < batch; ++b)
        std::copy_n(&h[static_cast<std::size_t>(b) * 256], 256, &got[(static_cast<std::size_t>(b) * L + t) * 256]);
    }
    double num = 0, den = 0;
    for (int r = 0; r < batch * L; ++r)
      for (int k = 0; k < 256; ++k) {
        double const d = got[static_cast<std::size_t>(r) * 256 + k] - ref[static_cast<std::size_t>(r) * V + k];
        num += d * d;
        den += ref[static_cast<std::size_t>(r) * V + k] * ref[static_cast<std::size_t>(r) * V + k];
      }
    CHECK(std::sqrt(num / den) < 1e-5);
    CHECK_FALSE(m.fused_decode());  // fp32: the layer-by-layer step (the fused one is bf16 only)
    // restore the snapshot: the same step gives bitwise the same logits
    st.copy_from(snap);
    auto const x = rows(split, 1);
    float const* d = m.step(w, x, st);
    std::vector<float> again(static_cast<std::size_t>(batch) * 256);
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(again.data(), d, again.size() * 4, cudaMemcpyDeviceToHost, be.stream));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
    CHECK(again == first_step);
  }
}

namespace {

std::vector<float> device_rows(float const* d, std::size_t rows, backend::Cuda const& be) {
  std::vector<float> h(rows * 256);
  MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, h.size() * sizeof(float), cudaMemcpyDeviceToHost, be.stream));
  MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
  return h;
}

/// Odd shapes for the fused decode step: d_state 32 (16 states per thread), d_conv 5, dt_rank
/// 70 (> 64: dt_proj columns beyond the registers; x_proj_out 134, not a multiple of 4),
/// d_model 1040 (norm rows wider than the register path; fp32 in_proj in two k passes),
/// in/out biases.
ModelConfig decode_odd_config() {
  ModelConfig c;
  c.d_model = 1040; c.n_layer = 1; c.expand = 1; c.d_state = 32; c.d_conv = 5; c.dt_rank = 70;
  c.bias = true; c.conv_bias = true; c.rms_norm = false; c.tie_embeddings = false; c.vocab_size = 256;
  c.finalize();
  return c;
}

struct DecodeCheck {
  double rel = 0;          ///< relative RMS error of the step logits vs the parallel forward
  bool bitwise = false;    ///< forward(length 1) on a snapshot == the graph step, bit for bit
  bool finite = true;
  bool fused = false;      ///< the step ran decode.cuh's kernels or the persistent step
  bool persistent = false; ///< the step ran decode_persistent.cuh's single kernel
  std::vector<float> last; ///< the last step's logits (batch, 256)
};

/// The graph decode step (decode.cuh's fused kernels) against the same device model's parallel
/// forward (scan + cuBLAS) over the whole sequence: a prefix of `split` tokens by forward(), the
/// rest one step at a time.
template <class S>
DecodeCheck decode_vs_parallel(ModelConfig const& c, int batch, std::uint64_t seed, bool allow_persistent = true) {
  auto const wf = random_weights<float>(c, seed);
  int const L = 9, split = 4;
  std::mt19937_64 rng(seed + 1);
  auto const tokens = random_tokens(static_cast<std::size_t>(batch) * L, c.vocab_size, rng);
  auto rows = [&](int t0, int len) {
    std::vector<std::int32_t> x;
    for (int b = 0; b < batch; ++b)
      for (int t = t0; t < t0 + len; ++t) x.push_back(tokens[static_cast<std::size_t>(b) * L + t]);
    return x;
  };
  auto const be = make_be();
  mcu::DeviceWeights<S> w(wf, be);
  mcu::Model<S> m(be);
  m.set_persistent_decode(allow_persistent);
  mcu::DeviceState s0(c, batch, be);
  auto const ref = device_rows(m.forward(w, tokens, batch, L, s0), static_cast<std::size_t>(batch) * L, be);
  mcu::DeviceState st(c, batch, be);
  (void)m.forward(w, rows(0, split), batch, split, st);
  DecodeCheck r;
  double num = 0, den = 0;
  for (int t = split; t < L; ++t) {
    auto const x = rows(t, 1);
    std::vector<float> via_forward;
    if (t == split + 1) {
      mcu::DeviceState snap = st.snapshot();
      via_forward = device_rows(m.forward(w, x, batch, 1, snap), static_cast<std::size_t>(batch), be);
    }
    auto const got = device_rows(m.step(w, x, st), static_cast<std::size_t>(batch), be);
    r.fused = m.fused_decode();
    r.persistent = m.persistent_decode();
    if (t == split + 1) r.bitwise = got == via_forward;
    r.last = got;
    for (int b = 0; b < batch; ++b)
      for (int k = 0; k < 256; ++k) {
        double const e = ref[(static_cast<std::size_t>(b) * L + t) * 256 + k];
        double const d = got[static_cast<std::size_t>(b) * 256 + k] - e;
        if (!std::isfinite(d)) r.finite = false;
        num += d * d;
        den += e * e;
      }
  }
  r.rel = std::sqrt(num / den);
  return r;
}

}  // namespace

TEST_CASE("cuda model: decode step equals the parallel forward (batch 1, 4, 5, 9, 64)", "[cuda][model][small]") {
  REQUIRE_GPU();
  int const fused_max = mcu::Model<float>::kFusedDecodeMaxBatch;
  for (int v = 0; v < 4; ++v) {
    auto const c = v < 3 ? config_variant(v) : decode_odd_config();
    for (int batch : {1, 4, 5, 9, 64}) {
      CAPTURE(v, batch);
      auto const f = decode_vs_parallel<float>(c, batch, 500 + v);
      CAPTURE(f.rel);
      CHECK_FALSE(f.fused);  // fp32 decodes layer by layer (faster there)
      CHECK(f.finite);
      CHECK(f.rel < 1e-5);
      CHECK(f.bitwise);
      auto const h = decode_vs_parallel<mcu::bf16>(c, batch, 600 + v);
      CAPTURE(h.rel);
      // the persistent step needs d_model and d_inner multiples of 32: only variant 0 here
      CHECK(h.persistent == (v == 0 && batch <= mcu::Model<mcu::bf16>::kPersistentDecodeMaxBatch));
      CHECK(h.fused == (batch <= fused_max || h.persistent));
      CHECK(h.finite);
      CHECK(h.rel < 2e-2);  // bf16 activations: the two paths round the same values, summed in other orders
      CHECK(h.bitwise);
    }
  }
}

namespace {

/// Shapes of the persistent decode step (d_model, d_inner multiples of 32): several layers;
/// RMSNorm with biases, no conv bias, tied head, d_state 32, d_conv 5, an x_proj width that is
/// not a multiple of 4 (scalar partial sums); a model whose out_proj has 26 k steps (the
/// warp-specialised kernel's per-warp y fetch, with more steps than warps, not a multiple of
/// them; the first two shapes, 4 and 9 steps, and the last take the block-wide fetch); a model
/// whose channel blocks (24 channels each on a 132-SM H200) leave the last one partial; expand 1
/// (d_inner = d_model: at batch 5-8 the y rows share the residual rows' shared memory, and here
/// those are the larger).
ModelConfig persistent_config(int v) {
  ModelConfig c;
  switch (v) {
    case 0:
      c.d_model = 64; c.n_layer = 3; c.d_state = 16; c.d_conv = 4; c.rms_norm = false; c.tie_embeddings = false;
      break;
    case 1:
      c.d_model = 96; c.n_layer = 2; c.expand = 3; c.d_state = 32; c.d_conv = 5; c.dt_rank = 5;
      c.bias = true; c.conv_bias = false; c.rms_norm = true; c.tie_embeddings = true; c.vocab_size = 264;
      break;
    case 4:  // expand 1: the residual rows take more shared memory than the y rows (batch 5-8 alias them)
      c.d_model = 96; c.n_layer = 2; c.expand = 1; c.d_state = 16; c.d_conv = 4; c.rms_norm = false;
      c.tie_embeddings = false;
      break;
    case 3:  // d_inner 832: 26 out_proj k steps of 32 columns (>= 16 warps, not a multiple of 16)
      c.d_model = 416; c.n_layer = 2; c.d_state = 16; c.d_conv = 4; c.rms_norm = false; c.tie_embeddings = false;
      break;
    default:  // d_inner 2176: 24 channels per block on 132 SMs, the last block has 16
      c.d_model = 544; c.n_layer = 1; c.expand = 4; c.d_state = 16; c.d_conv = 4; c.rms_norm = false;
      c.tie_embeddings = false;
      break;
  }
  c.finalize();
  return c;
}

double rel_rms(std::vector<float> const& a, std::vector<float> const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    double const d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return a.size() == b.size() ? std::sqrt(num / den) : 1e300;
}

}  // namespace

TEST_CASE("cuda model: the persistent decode step equals the parallel forward and the fused kernels",
          "[cuda][model][small]") {
  REQUIRE_GPU();
#if defined(MAMBABYTE_TEST_EXPECT_WS)
  {  // built for sm_90a: on a compute capability 9.0 device the warp-specialised kernel runs
    auto const be = make_be();
    int major = 0, minor = 0;
    REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, be.device) == cudaSuccess);
    REQUIRE(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, be.device) == cudaSuccess);
    if (major == 9 && minor == 0)
      CHECK(mambabyte::backend::cuda::persistent_decode_block_threads(be) ==
            mambabyte::backend::cuda::persistent_detail::kWsThreads);
  }
#endif
  for (int v = 0; v < 5; ++v) {
    auto const c = persistent_config(v);
    // 1-4: a kernel each; 5-8: one kernel with the batch at run time (Y rows sharing RS's bytes)
    for (int batch : {1, 2, 3, 4, 5, 7, 8}) {
      CAPTURE(v, batch);
      auto const p = decode_vs_parallel<mcu::bf16>(c, batch, 700 + v);
      CAPTURE(p.rel);
      CHECK(p.persistent);
      CHECK(p.finite);
      CHECK(p.rel < 2e-2);  // as the fused kernels: same rounding points, other summation orders
      CHECK(p.bitwise);     // forward(length 1) runs the same kernel: bit for bit
      auto const again = decode_vs_parallel<mcu::bf16>(c, batch, 700 + v);
      CHECK(again.last == p.last);  // fixed summation orders: reproducible run to run
      auto const f = decode_vs_parallel<mcu::bf16>(c, batch, 700 + v, false);
      CHECK_FALSE(f.persistent);
      CAPTURE(f.rel);
      double const pf = rel_rms(p.last, f.last);
      CAPTURE(pf);
      CHECK(pf < 2e-2);
    }
  }
  // batch 9 is beyond the persistent step: the layer-by-layer path, still correct
  static_assert(mcu::Model<mcu::bf16>::kPersistentDecodeMaxBatch == 8);
  auto const q = decode_vs_parallel<mcu::bf16>(persistent_config(0), 9, 710);
  CHECK_FALSE(q.persistent);
  CHECK(q.rel < 2e-2);
}

// The persistent step's exchange words carry flags (epoch, layer) from launch to launch: one
// model driven through many steps and changes of batch size (new layouts of the words, reset)
// gives bit for bit the logits of a fresh model per batch size; a stale or mismatched flag would
// either hang (the poll traps: a CUDA error) or read old values.
TEST_CASE("cuda model: the persistent step over many launches and changes of batch size", "[cuda][model][small]") {
  REQUIRE_GPU();
  auto const c = persistent_config(0);
  auto const wf = random_weights<float>(c, 730);
  auto const be = make_be();
  mcu::DeviceWeights<mcu::bf16> w(wf, be);
  mcu::Model<mcu::bf16> shared(be);
  std::mt19937_64 rng(731);
  for (int batch : {1, 4, 2, 8, 1, 6, 3}) {
    CAPTURE(batch);
    mcu::Model<mcu::bf16> fresh(be), chained(be);
    chained.set_persistent_decode(false);  // decode.cuh's kernels (batch <= 4) or layer by layer: a reference
    mcu::DeviceState a(c, batch, be), b(c, batch, be), d(c, batch, be);
    std::vector<float> la, lb, ld;
    bool all_persistent = true;
    for (int t = 0; t < 40; ++t) {
      auto const x = random_tokens(static_cast<std::size_t>(batch), c.vocab_size, rng);
      la = device_rows(shared.step(w, x, a), static_cast<std::size_t>(batch), be);
      all_persistent = all_persistent && shared.persistent_decode();
      lb = device_rows(fresh.step(w, x, b), static_cast<std::size_t>(batch), be);
      ld = device_rows(chained.step(w, x, d), static_cast<std::size_t>(batch), be);
    }
    CHECK(all_persistent);
    CHECK_FALSE(chained.persistent_decode());
    CHECK(la == lb);
    double const rel = rel_rms(la, ld);
    CAPTURE(rel);
    CHECK(rel < 2e-2);
    bool finite = true;
    for (float v : la) finite = finite && std::isfinite(v);
    CHECK(finite);
  }
}

// The persistent decode step once per shape of the case above at batch 1, 4 and 8, for
// compute-sanitizer's racecheck (hidden: that case covers the same and more, and is too slow
// under racecheck).
TEST_CASE("cuda model: persistent decode step, every shape once (racecheck)", "[.][race]") {
  REQUIRE_GPU();
  for (int v = 0; v < 5; ++v)
    for (int batch : {1, 4, 8}) {
      CAPTURE(v, batch);
      auto const p = decode_vs_parallel<mcu::bf16>(persistent_config(v), batch, 720 + v);
      CHECK(p.persistent);
      CHECK(p.finite);
      CHECK(p.rel < 2e-2);
      CHECK(p.bitwise);
    }
}

TEST_CASE("cuda model: bits per byte equal the CPU evaluation", "[cuda][model]") {
  REQUIRE_GPU();
  auto const c = config_variant(0);
  auto const wf = random_weights<float>(c, 11);
  std::string text;
  for (int i = 0; i < 3000; ++i) text += static_cast<char>("the quick brown fox jumps over the lazy dog. "[i % 45]);
  std::span<std::uint8_t const> data(reinterpret_cast<std::uint8_t const*>(text.data()), text.size());
  EvalOptions eo;
  eo.chunk = 700;  // several chunks, state carried
  Model<double> cpu(cast_weights<double>(wf));
  auto const ref = evaluate_bits_per_byte(cpu, data, eo);
  auto const be = make_be();
  mcu::DeviceWeights<float> w(wf, be);
  mcu::Model<float> m(be);
  auto const got = mcu::evaluate_bits_per_byte(m, w, data, eo);
  CHECK(got.bytes_predicted == ref.bytes_predicted);
  CHECK(std::abs(got.bits_per_byte - ref.bits_per_byte) < 1e-5 * ref.bits_per_byte);
  mcu::DeviceWeights<mcu::bf16> wb(wf, be);
  mcu::Model<mcu::bf16> mb(be);
  auto const gb = mcu::evaluate_bits_per_byte(mb, wb, data, eo);
  CHECK(std::abs(gb.bits_per_byte - ref.bits_per_byte) < 2e-2 * ref.bits_per_byte);
}

namespace {
train::StepResult engine_steps(mcu::CudaStepEngine<float>& e, int from, int to, int batch, int L) {
  train::StepResult r;
  for (int s = from; s < to; ++s) {
    std::mt19937_64 rng(1000 + s);
    auto tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), 256, rng);
    r = e.step(tokens, batch, 1e-3 * (s + 1), 0.5);
  }
  return r;
}
}  // namespace

TEST_CASE("cuda engine: AdamW step matches the CPU optimizer; resume is exact", "[cuda][engine][small]") {
  REQUIRE_GPU();
  auto const c = config_variant(0);
  ModelWeights<float> w0 = random_weights<float>(c, 21);
  train::AdamWOptions ao;
  ao.lr = 1e-3;
  train::AdamW<float> opt0(c, ao);
  auto const be = make_be();
  int const batch = 2, L = 33;

  // one step against the CPU: same gradient (fp32 GPU vs CPU float), clipping and AdamW
  {
    mcu::CudaStepEngine<float> e(c, be);
    e.load(w0, opt0);
    std::mt19937_64 rng(1000);
    auto tokens = random_tokens(static_cast<std::size_t>(batch) * (L + 1), 256, rng);
    auto const r = e.step(tokens, batch, 1e-3, 0.5);
    ModelWeights<float> wg(c);
    train::AdamW<float> og(c, ao);
    e.store(wg, og);
    CHECK(og.step_count() == 1);

    ModelWeights<float> wc = w0;
    train::AdamW<float> oc(c, ao);
    TrainingModel<float, scan::Sequential> tm;
    auto g = TrainingModel<float, scan::Sequential>::make_gradients(c);
    double const loss = tm.forward_backward(wc, tokens, batch, g);
    double const norm = train::clip_grad_norm(g.flat(), 0.5);
    oc.step(wc.flat(), std::span<float const>(g.flat()), 1e-3);
    CHECK(std::abs(r.loss - loss) < 1e-5 * loss);
    CHECK(std::abs(r.grad_norm - norm) < 1e-4 * norm);
    // the update itself: compare the change of the weights
    std::vector<double> dg, dc;
    for (std::size_t i = 0; i < wc.flat().size(); ++i) {
      dg.push_back(double(wg.flat()[i]) - w0.flat()[i]);
      dc.push_back(double(wc.flat()[i]) - w0.flat()[i]);
    }
    CHECK(rel_err(dg, dc) < 1e-2);  // Adam's first step is ~lr * sign(g): tiny |g| entries may differ
    CHECK(rel_err(og.first_moment(), oc.first_moment()) < 1e-4);
  }

  // 4 steps in one go vs 2 steps, store, a fresh engine loaded from the stored state, 2 more
  ModelWeights<float> wa(c), wb(c);
  train::AdamW<float> oa(c, ao), ob(c, ao);
  train::StepResult ra, rb;
  {
    mcu::CudaStepEngine<float> e(c, be);
    e.load(w0, opt0);
    ra = engine_steps(e, 0, 4, batch, L);
    e.store(wa, oa);
  }
  {
    ModelWeights<float> mid(c);
    train::AdamW<float> omid(c, ao);
    {
      mcu::CudaStepEngine<float> e(c, be);
      e.load(w0, opt0);
      (void)engine_steps(e, 0, 2, batch, L);
      e.store(mid, omid);
    }
    mcu::CudaStepEngine<float> e2(c, be);
    e2.load(mid, omid);
    rb = engine_steps(e2, 2, 4, batch, L);
    e2.store(wb, ob);
  }
  CHECK(ra.loss == rb.loss);
  CHECK(oa.step_count() == 4);
  CHECK(ob.step_count() == 4);
  CHECK(std::equal(wa.flat().begin(), wa.flat().end(), wb.flat().begin()));
  CHECK(std::equal(oa.second_moment().begin(), oa.second_moment().end(), ob.second_moment().begin()));
}

TEST_CASE("cuda engine: bf16 mixed precision trains and a non-finite loss updates nothing", "[cuda][engine]") {
  REQUIRE_GPU();
  auto const c = config_variant(0);
  ModelWeights<float> w0 = random_weights<float>(c, 31);
  train::AdamWOptions ao;
  train::AdamW<float> opt0(c, ao);
  auto const be = make_be();
  mcu::CudaStepEngine<mcu::bf16> e(c, be);
  e.load(w0, opt0);
  // a repetitive text is learnt quickly: the loss must fall
  std::vector<std::int32_t> tokens;
  for (int b = 0; b < 4; ++b)
    for (int t = 0; t <= 64; ++t) tokens.push_back("abcabdabe"[(b + t) % 9]);
  double first = 0, last = 0;
  for (int s = 0; s < 60; ++s) {
    auto const r = e.step(tokens, 4, 3e-3, 1.0);
    REQUIRE(std::isfinite(r.loss));
    if (s == 0) first = r.loss;
    last = r.loss;
  }
  CHECK(last < 0.5 * first);
  // poison one weight with NaN: the step reports it and leaves everything as it was
  ModelWeights<float> before(c);
  train::AdamW<float> ob(c, ao);
  e.store(before, ob);
  ModelWeights<float> bad = before;
  bad.flat()[bad.find("backbone.norm_f.weight")->offset] = std::nanf("");
  e.load(bad, ob);
  auto const r = e.step(tokens, 4, 3e-3, 1.0);
  CHECK_FALSE(std::isfinite(r.loss));
  ModelWeights<float> after(c);
  train::AdamW<float> oa(c, ao);
  e.store(after, oa);
  CHECK(oa.step_count() == ob.step_count());
  CHECK(std::equal(after.flat().begin(), after.flat().end(), bad.flat().begin(),
                   [](float x, float y) { return x == y || (std::isnan(x) && std::isnan(y)); }));
}
