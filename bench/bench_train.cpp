// Training benchmarks (CPU): the selective-scan backward per policy, and a whole training step
// (forward + backward + AdamW) of the CLI's default small model and a wider one.
//
// Floors (bench_util.hpp measures the rates in this process):
//   scan backward: it re-runs the forward from chunk checkpoints and then the reverse
//     recurrence, so it moves at least the forward's inputs (u, delta, z, B, C, dout) and writes
//     their gradients: bytes = sizeof(T) * (B*L*(8*D + 4*N) + 2*D*N + 4*D); and it evaluates at
//     least 2*(N + 3) transcendentals per (b, t, d) (forward states + backward exps).
//   training step: 6 * (GEMM multiply-adds per byte) flops per byte (forward 2, backward 4)
//     at the probe's fp32 GEMM rate.
#include <benchmark/benchmark.h>

#include "bench_util.hpp"
#include "mambabyte/backend/cpu/selective_scan_backward.hpp"
#include "mambabyte/model/training.hpp"
#include "mambabyte/train/data.hpp"
#include "mambabyte/train/init.hpp"
#include "mambabyte/train/optimizer.hpp"

namespace {

using namespace mambabyte;

template <class T, class Policy>
void BM_ScanBackward(benchmark::State& state) {
  int const B = static_cast<int>(state.range(0)), L = static_cast<int>(state.range(1)),
            D = static_cast<int>(state.range(2)), N = static_cast<int>(state.range(3));
  std::size_t const rows = static_cast<std::size_t>(B) * L;
  aligned_vector<T> u(rows * D), dt(rows * D), z(rows * D), dout(rows * D), bc(rows * 2 * N), A(static_cast<std::size_t>(D) * N),
      Dv(D), bias(D);
  mbbench::fill_uniform(u.data(), u.size(), -1, 1, 1);
  mbbench::fill_uniform(dt.data(), dt.size(), -4, 0, 2);
  mbbench::fill_uniform(z.data(), z.size(), -2, 2, 3);
  mbbench::fill_uniform(dout.data(), dout.size(), -1, 1, 4);
  mbbench::fill_uniform(bc.data(), bc.size(), -1, 1, 5);
  mbbench::fill_uniform(A.data(), A.size(), -8, -0.5, 6);
  mbbench::fill_uniform(Dv.data(), Dv.size(), 0.5, 1.5, 7);
  mbbench::fill_uniform(bias.data(), bias.size(), -3, -1, 8);
  aligned_vector<T> du(rows * D), ddt(rows * D), dz(rows * D), dbc(rows * 2 * N), dA(A.size()), dD(D), dbias(D);

  ssm::SelectiveScanArguments<T> f;
  f.batch = B; f.length = L; f.d_inner = D; f.d_state = N;
  f.u = u.data(); f.ld_u = D; f.delta = dt.data(); f.ld_delta = D; f.delta_bias = bias.data(); f.delta_softplus = true;
  f.A = A.data(); f.B = bc.data(); f.ld_B = 2 * N; f.C = bc.data() + N; f.ld_C = 2 * N; f.D = Dv.data();
  f.z = z.data(); f.ld_z = D;
  auto a = ssm::SelectiveScanBackwardArguments<T>::from_forward(f);
  a.dout = dout.data(); a.ld_dout = D;
  a.du = du.data(); a.ld_du = D; a.ddelta = ddt.data(); a.ld_ddelta = D;
  a.dB = dbc.data(); a.ld_dB = 2 * N; a.dC = dbc.data() + N; a.ld_dC = 2 * N;
  a.dz = dz.data(); a.ld_dz = D; a.dA = dA.data(); a.dD = dD.data(); a.ddelta_bias = dbias.data();
  using Op = ssm::SelectiveScanBackward<backend::Cpu, T, Policy>;
  backend::Cpu const be{};
  if (Op::can_implement(a) != Status::kSuccess) {
    state.SkipWithError("cannot implement");
    return;
  }
  aligned_vector<std::byte> ws(Op::workspace_bytes(a, be));
  Op::run(a, ws.data(), be);  // warm
  mbbench::wait_for_quiet();
  mbbench::LoopTimer timer;
  for (auto _ : state) {
    Op::run(a, ws.data(), be);
    benchmark::DoNotOptimize(du.data());
  }
  timer.report_contention(state);
  double const per = timer.per_iter(state);
  double const bytes = sizeof(T) * (double(rows) * (8.0 * D + 4.0 * N) + 2.0 * D * N + 4.0 * D);
  double const transc = 2.0 * double(rows) * D * (N + 3);
  auto const& p = mbbench::probes();
  auto const fl = mbbench::max_floor(bytes / p.bandwidth, "bandwidth", transc / p.exp_rate<T>(), "exp");
  state.counters["elements/s"] = benchmark::Counter(double(rows) * D, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["workspace_MiB"] = double(ws.size()) / (1 << 20);
  state.counters["floor_ms"] = fl.seconds * 1e3;
  state.counters["floor_frac"] = per > 0 ? fl.seconds / per : 0;
  state.SetLabel(std::string("floor: ") + fl.bound);
}

struct TrainShape {
  char const* name;
  int d_model, n_layer, batch, seq_len;
};
TrainShape const kShapes[] = {{"cli_default", 128, 4, 8, 256}, {"wide", 256, 4, 2, 1024}};

template <class Policy>
void BM_TrainStep(benchmark::State& state, TrainShape s) {
  ModelConfig c;
  c.d_model = s.d_model;
  c.n_layer = s.n_layer;
  c.rms_norm = false;
  c.tie_embeddings = false;
  c.pad_vocab_size_multiple = 1;
  c.finalize();
  ModelWeights<float> w(c);
  train::initialize_mamba(w, 1);
  ModelWeights<float> g(c);
  train::AdamW<float> opt(c, train::AdamWOptions{});
  TrainingModel<float, Policy> tm;
  std::vector<std::uint8_t> text(1 << 20);
  mbbench::Rng r(9);
  for (auto& x : text) x = static_cast<std::uint8_t>(32 + r.next() % 90);
  auto corpus = train::ByteCorpus::from_bytes(std::move(text));
  train::WindowSampler sampler(1, s.seq_len);
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(s.batch) * (s.seq_len + 1));
  std::uint64_t step = 0;
  auto one = [&] {
    sampler.fill(corpus, step++, s.batch, tokens);
    g.zero();
    double const loss = tm.forward_backward(w, tokens, s.batch, g);
    train::clip_grad_norm(g.flat(), 1.0);
    opt.step(w.flat(), std::span<float const>(g.flat()), 1e-3);
    return loss;
  };
  one();  // warm: allocates the activations
  mbbench::wait_for_quiet();
  mbbench::LoopTimer timer;
  for (auto _ : state) benchmark::DoNotOptimize(one());
  timer.report_contention(state);
  double const per = timer.per_iter(state);
  double const bytes = double(s.batch) * s.seq_len;
  double const floor_s = 6.0 * mbbench::matmul_params(c) * bytes / mbbench::probes().gemm_flops;
  state.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["activation_MiB"] = double(tm.activation_bytes()) / (1 << 20);
  state.counters["params_M"] = double(c.parameter_count()) / 1e6;
  state.counters["floor_ms"] = floor_s * 1e3;
  state.counters["floor_frac"] = per > 0 ? floor_s / per : 0;
  state.SetLabel("floor: 6 x GEMM flops at the probe rate");
}

}  // namespace

int main(int argc, char** argv) {
  mbbench::init(&argc, argv);
  mbbench::register_probe_benchmarks();
  using benchmark::RegisterBenchmark;
  auto shapes = [](benchmark::internal::Benchmark* b) {
    b->ArgNames({"batch", "L", "d_inner", "d_state"})->Args({2, 2048, 512, 16})->Args({1, 8192, 2048, 16})
        ->UseRealTime()->Unit(benchmark::kMillisecond);
  };
  shapes(RegisterBenchmark("scan_backward/f32/sequential", BM_ScanBackward<float, scan::Sequential>));
  shapes(RegisterBenchmark("scan_backward/f32/chunked64", BM_ScanBackward<float, scan::Chunked<64>>));
  shapes(RegisterBenchmark("scan_backward/f32/chunked256", BM_ScanBackward<float, scan::Chunked<256>>));
  shapes(RegisterBenchmark("scan_backward/f32/associative", BM_ScanBackward<float, scan::Associative>));
  shapes(RegisterBenchmark("scan_backward/f32/auto", BM_ScanBackward<float, scan::Auto>));
  for (TrainShape const& s : kShapes)
    RegisterBenchmark((std::string("train_step/f32/") + s.name).c_str(), BM_TrainStep<scan::Auto>, s)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
