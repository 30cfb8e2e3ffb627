// bench_model: one Mamba layer (and each of its operators), and whole random-weight fp32
// models: the MambaByte-353M shape and a small one, prefill and decode; plus the machine
// probes. Results and how to read them: docs/performance.md.
//
//   layer/<op>/batch:B/L:L        d_model 1024, d_inner 2048, d_state 16, fp32, scan::Auto;
//                                 op = all (the whole mixer block: add+norm .. out_proj) or one
//                                 operator of it
//   model/<name>/prefill/L:L/batch:B     Model::forward with a state (a prefill), logits for
//                                        every position
//   model/<name>/decode/batch:B          Model::step, one byte per sequence per iteration
//
// Counters: text_bytes/s = bytes of text processed per second (vocabulary 256: a token is a
// byte); floor_frac = floor time / measured time (docs/performance.md gives every floor);
// mfu = 2 * parameters * text bytes per second / probe GEMM rate; ms_per_step (decode) =
// latency of one step, i.e. per byte of each sequence.
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "mambabyte/model/model.hpp"

namespace {

using namespace mambabyte;
using namespace mbbench;
using F = float;
constexpr double kF = sizeof(F);

ModelConfig make_config(int d_model, int n_layer) {
  ModelConfig c;
  c.d_model = d_model;
  c.n_layer = n_layer;
  c.vocab_size = 256;
  c.d_state = 16;
  c.d_conv = 4;
  c.expand = 2;
  c.rms_norm = false;        // LayerNorm with bias, as the released MambaByte checkpoints
  c.tie_embeddings = false;  // untied head, as the released MambaByte checkpoints
  c.finalize();
  return c;
}

// ---- floors of the operators of one layer ---------------------------------------------------

enum class Op { kNorm, kInProj, kConv, kXProj, kDtProj, kScan, kOutProj, kAll };
constexpr char const* kOpNames[] = {"add_norm", "in_proj", "conv1d", "x_proj", "dt_proj", "scan", "out_proj", "all"};

/// (M x K) * (K x Nout)^T: max(bytes / bandwidth, 2*M*K*Nout / GEMM rate).
Floor gemm_floor(double M, double K, double Nout) {
  Probes const& p = probes();
  double const bytes = kF * (M * K + K * Nout + M * Nout);
  return max_floor(bytes / p.bandwidth, "bandwidth", 2 * M * K * Nout / p.gemm_flops, "gemm");
}

Floor op_floor(ModelConfig const& c, int batch, int L, Op op) {
  Probes const& p = probes();
  double const M = static_cast<double>(batch) * L, dm = c.d_model, di = c.d_inner(), X = c.x_proj_out(),
               R = c.dt_rank, N = c.d_state, K = c.d_conv;
  switch (op) {
    case Op::kNorm: return {kF * M * dm * 4 / p.bandwidth, "bandwidth"};  // residual r+w, hidden r, out w
    case Op::kInProj: return gemm_floor(M, dm, 2 * di);
    case Op::kConv: return max_floor(kF * (2 * M * di + di * (K + 1)) / p.bandwidth, "bandwidth",
                                     M * di / p.exp_f32, "exp");  // SiLU
    case Op::kXProj: return gemm_floor(M, di, X);
    case Op::kDtProj: return gemm_floor(M, R, di);
    case Op::kScan: return scan_floor<F>(scan_cost(batch, L, di, N, kF));
    case Op::kOutProj: return gemm_floor(M, di, dm);
    case Op::kAll: {
      double s = 0;
      for (int k = 0; k < static_cast<int>(Op::kAll); ++k) s += op_floor(c, batch, L, static_cast<Op>(k)).seconds;
      return {s, "sum of ops"};
    }
  }
  return {};
}

/// Prefill of a whole model: the layers' operator floors, the final norm and the head.
double prefill_floor(ModelConfig const& c, int batch, int L) {
  double const M = static_cast<double>(batch) * L;
  return c.n_layer * op_floor(c, batch, L, Op::kAll).seconds + kF * M * c.d_model * 4 / probes().bandwidth +
         gemm_floor(M, c.d_model, c.vocab_size).seconds;
}

/// Decode step: every weight but the embedding table once (plus `batch` embedding rows) and the
/// recurrent state read and written; or the GEMM flops, whichever takes longer.
Floor decode_floor(ModelConfig const& c, int batch) {
  Probes const& p = probes();
  double const params = static_cast<double>(c.parameter_count());
  double const state = static_cast<double>(c.n_layer) * batch * c.d_inner() * (c.d_conv - 1 + c.d_state);
  double const bytes = kF * (params - static_cast<double>(c.vocab_size) * c.d_model + batch * c.d_model + 2 * state);
  return max_floor(bytes / p.bandwidth, "bandwidth", 2 * matmul_params(c) * batch / p.gemm_flops, "gemm");
}

// ---- one layer, operator by operator (the same sequence as Model::run_layers) ---------------

struct LayerFixture {
  ModelConfig cfg;
  ModelWeights<F> w;
  int batch, L;
  std::vector<F> A, residual, hidden, normed, xz, xc, xdbl, dt, y;
  std::vector<std::byte> ws;

  LayerFixture(int batch_, int L_) : cfg(make_config(1024, 1)), w(random_weights<F>(cfg, 11)), batch(batch_), L(L_) {
    std::size_t const M = static_cast<std::size_t>(batch) * L;
    int const dm = cfg.d_model, di = cfg.d_inner(), N = cfg.d_state;
    A.resize(static_cast<std::size_t>(di) * N);
    for (std::size_t i = 0; i < A.size(); ++i) A[i] = -std::exp(w.layers[0].A_log[i]);
    residual.assign(M * dm, 0);
    hidden.resize(M * dm);
    fill_uniform(hidden.data(), hidden.size(), -1, 1, 3);
    normed.resize(M * dm); xz.resize(M * 2 * di); xc.resize(M * di); xdbl.resize(M * cfg.x_proj_out());
    dt.resize(M * di); y.resize(M * di);
    std::vector<F> h0 = hidden;
    run(Op::kAll);  // every buffer holds realistic values from here on
    hidden = h0;
  }

  ssm::SelectiveScanArguments<F> scan_args() {
    int const di = cfg.d_inner(), N = cfg.d_state, R = cfg.dt_rank, X = cfg.x_proj_out();
    auto const& lw = w.layers[0];
    ssm::SelectiveScanArguments<F> sa;
    sa.batch = batch; sa.length = L; sa.d_inner = di; sa.d_state = N;
    sa.u = xc.data(); sa.ld_u = di;
    sa.delta = dt.data(); sa.ld_delta = di; sa.delta_bias = lw.dt_proj_b; sa.delta_softplus = true;
    sa.A = A.data();
    sa.B = xdbl.data() + R; sa.ld_B = X;
    sa.C = xdbl.data() + R + N; sa.ld_C = X;
    sa.D = lw.D;
    sa.z = xz.data() + di; sa.ld_z = 2 * di;
    sa.out = y.data(); sa.ld_out = di;
    return sa;
  }

  void run(Op op) {
    ModelConfig const& c = cfg;
    int const Mi = batch * L, dm = c.d_model, di = c.d_inner(), R = c.dt_rank, X = c.x_proj_out();
    auto const& lw = w.layers[0];
    backend::Cpu const be{};
    bool const all = op == Op::kAll;
    if (all || op == Op::kNorm)
      layers::AddNorm<backend::Cpu, F>::run({Mi, dm, residual.data(), hidden.data(), lw.norm_w, lw.norm_b,
                                            normed.data(), c.norm_eps, c.rms_norm}, nullptr, be);
    if (all || op == Op::kInProj)
      layers::Linear<backend::Cpu, F>::run({Mi, dm, 2 * di, normed.data(), dm, lw.in_proj_w, lw.in_proj_b, xz.data(), 2 * di},
                                           nullptr, be);
    if (all || op == Op::kConv)
      layers::CausalConv1d<backend::Cpu, F>::run({batch, L, di, c.d_conv, xz.data(), 2 * di, lw.conv_w, lw.conv_b,
                                                 xc.data(), di, nullptr, true}, nullptr, be);
    if (all || op == Op::kXProj)
      layers::Linear<backend::Cpu, F>::run({Mi, di, X, xc.data(), di, lw.x_proj_w, nullptr, xdbl.data(), X}, nullptr, be);
    if (all || op == Op::kDtProj)
      layers::Linear<backend::Cpu, F>::run({Mi, R, di, xdbl.data(), X, lw.dt_proj_w, nullptr, dt.data(), di}, nullptr, be);
    if (all || op == Op::kScan) {
      using Scan = ssm::SelectiveScan<backend::Cpu, F, scan::Auto>;
      auto const sa = scan_args();
      ws.resize(Scan::workspace_bytes(sa, be));
      Scan::run(sa, ws.data(), be);
    }
    if (all || op == Op::kOutProj)
      layers::Linear<backend::Cpu, F>::run({Mi, di, dm, y.data(), di, lw.out_proj_w, lw.out_proj_b, hidden.data(), dm},
                                           nullptr, be);
  }
};

void BM_Layer(benchmark::State& state, Op op) {
  int const batch = static_cast<int>(state.range(0)), L = static_cast<int>(state.range(1));
  static std::unique_ptr<LayerFixture> fx;
  if (!fx || fx->batch != batch || fx->L != L) { fx.reset(); fx = std::make_unique<LayerFixture>(batch, L); }
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) {
    fx->run(op);
    benchmark::ClobberMemory();
  }
  double const t = timer.per_iter(state);
  timer.report_contention(state);
  Floor const f = op_floor(fx->cfg, batch, L, op);
  state.counters["text_bytes/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * batch * L,
                                                      benchmark::Counter::kIsRate);
  state.counters["floor_frac"] = f.seconds / t;
  state.counters["floor_ms"] = f.seconds * 1e3;
  state.SetLabel(std::string("floor:") + f.bound);
}

// ---- whole models ---------------------------------------------------------------------------

struct NamedModel {
  char const* name;
  int d_model, n_layer;
};
constexpr NamedModel kModels[] = {{"mambabyte353m", 1024, 53}, {"small", 256, 8}};

Model<F>& get_model(int which) {
  static std::unique_ptr<Model<F>> models[std::size(kModels)];
  auto& m = models[which];
  if (!m) m = std::make_unique<Model<F>>(random_weights<F>(make_config(kModels[which].d_model, kModels[which].n_layer), 42 + which));
  return *m;
}

std::vector<std::int32_t> random_tokens(std::size_t n, std::uint64_t seed) {
  Rng r(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = static_cast<std::int32_t>(r.next() & 255);
  return t;
}

void BM_Prefill(benchmark::State& state, int which) {
  int const L = static_cast<int>(state.range(0)), batch = static_cast<int>(state.range(1));
  Model<F>& m = get_model(which);
  ModelConfig const& c = m.config();
  auto const tokens = random_tokens(static_cast<std::size_t>(batch) * L, 5);
  std::vector<F> logits(static_cast<std::size_t>(batch) * L * c.vocab_size);
  auto st = m.make_state(batch);
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) {
    st.reset();
    m.forward(tokens, batch, L, &st, logits);
    benchmark::DoNotOptimize(logits.data());
  }
  double const t = timer.per_iter(state);
  timer.report_contention(state);
  double const text = static_cast<double>(batch) * L;
  state.counters["text_bytes/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * text,
                                                      benchmark::Counter::kIsRate);
  state.counters["floor_frac"] = prefill_floor(c, batch, L) / t;
  state.counters["mfu"] = 2.0 * static_cast<double>(c.parameter_count()) * text / t / probes().gemm_flops;
  state.counters["params_M"] = static_cast<double>(c.parameter_count()) / 1e6;
}

void BM_Decode(benchmark::State& state, int which) {
  int const batch = static_cast<int>(state.range(0));
  Model<F>& m = get_model(which);
  ModelConfig const& c = m.config();
  auto st = m.make_state(batch);
  int const prompt = 16;
  auto const p = random_tokens(static_cast<std::size_t>(batch) * prompt, 9);
  m.prefill(p, batch, prompt, st);
  std::vector<std::int32_t> tok = random_tokens(static_cast<std::size_t>(batch), 10);
  std::vector<F> logits(static_cast<std::size_t>(batch) * c.vocab_size);
  m.step(tok, st, logits);  // warm
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) {
    m.step(tok, st, logits);
    for (auto& x : tok) x = (x * 31 + 7) & 255;
    benchmark::DoNotOptimize(logits.data());
  }
  double const t = timer.per_iter(state);
  timer.report_contention(state);
  Floor const f = decode_floor(c, batch);
  state.counters["text_bytes/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * batch,
                                                      benchmark::Counter::kIsRate);
  state.counters["ms_per_step"] = t * 1e3;
  state.counters["floor_ms"] = f.seconds * 1e3;
  state.counters["floor_frac"] = f.seconds / t;
  state.SetLabel(std::string("floor:") + f.bound);
}

void register_model_benchmarks() {
  using benchmark::RegisterBenchmark;
  bool const quick = quick_mode();  // bench_smoke: small shapes, the command line's min time
  auto timing = [quick](benchmark::internal::Benchmark* b, double min_time) {
    b->UseRealTime()->Unit(benchmark::kMillisecond);
    if (!quick) b->MinTime(min_time);
  };
  for (int k = 0; k <= static_cast<int>(Op::kAll); ++k) {
    Op const op = k == 0 ? Op::kAll : static_cast<Op>(k - 1);  // "all" first
    auto* b = RegisterBenchmark((std::string("layer/") + kOpNames[static_cast<int>(op)]).c_str(), BM_Layer, op)
                  ->ArgNames({"batch", "L"})->Args({1, quick ? 256 : 2048});
    timing(b, 1.0);
  }
  for (int which : {1, 0}) {  // small model first
    if (quick && which == 0) continue;
    std::string const base = std::string("model/") + kModels[which].name;
    auto* pre = RegisterBenchmark((base + "/prefill").c_str(), BM_Prefill, which)->ArgNames({"L", "batch"});
    if (quick) pre->Args({256, 1});
    else if (which == 1) pre->Args({2048, 1})->Args({2048, 8});
    else pre->Args({512, 1})->Args({2048, 1});
    timing(pre, which == 1 ? 1.0 : 0.5);
    auto* dec = RegisterBenchmark((base + "/decode").c_str(), BM_Decode, which)->ArgNames({"batch"})->Arg(1);
    if (!quick) dec->Arg(8);
    timing(dec, which == 1 ? 1.0 : 3.0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  mbbench::init(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  mbbench::register_probe_benchmarks();
  register_model_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
