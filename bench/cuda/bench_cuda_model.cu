// bench_cuda_model: the whole MambaByte model on one GPU (Google Benchmark, manual time from CUDA
// events), at the MambaByte-353M shape (d_model 1024, 53 layers, d_state 16, expand 2, LayerNorm,
// untied head, 256-byte vocabulary; REFERENCE.md section 0 has PyTorch + mamba_ssm's figures):
//   - TrainStep/<precision>/<batch>/<length>: one full optimizer step of the CUDA engine (zero
//     grad, forward, backward, global norm, clip, fused AdamW) at 1 x 8192 and 4 x 8192 bytes.
//     Counters: bytes/s, MFU = 6 params bytes/s / 790 TFLOP/s (the reference's definition),
//     peak_GiB = device memory in use after the step minus before the engine existed.
//     TrainStepRecompute: the same with set_keep_activations(false) (the backward runs each
//     layer's conv and norm again instead of reading them: less memory, more time);
//     TrainStepKeepStates: with set_keep_scan_states(true) (the forward scans keep their states
//     every 4 steps for the backward, which then skips its checkpoint pass: more memory, less time).
//   - Prefill/<precision>/<batch>/<length>: the stateful forward (logits of every byte).
//   - Decode/<precision>/<batch>: one graph-replayed decode step (the default path: bf16 batch
//     <= 8 the persistent kernel of decode_persistent.cuh, else layer by layer); bytes/s = batch /
//     time; floor_frac = (bytes of weights in the compute precision / 4.8 TB/s) / time; counters
//     persistent / fused say which path ran. DecodeFusedPDL: the persistent step not allowed:
//     decode.cuh's 3 kernels per layer chained with PDL (batch <= 4; above, layer by layer); DecodeNoPDL: the same without PDL; DecodeUnfused: the layer-by-layer step
//     (cuBLAS + state update, dt_proj inside the state update, conv + x_proj in one kernel);
//     DecodeDtGemm: that step with dt_proj as a separate GEMM; DecodeConvXprojSplit: with the
//     conv kernel and the x_proj GEMM.
// --quick on the command line (first argument): a 2-layer d_model 128 model, tiny shapes (ctest).
#include <mambabyte/cuda.hpp>
#include <mambabyte/mambabyte.hpp>

#include <benchmark/benchmark.h>

#include "bench_cuda_main.hpp"

#include "bench_config.hpp"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace mambabyte;
namespace mcu = mambabyte::cuda;

bool g_quick = false;
constexpr double kPeakFlops = 790e12;  // bf16 dense, as REFERENCE.md's MFU
constexpr double kHbm = 4.8e12;

ModelConfig bench_config() { return bench::mambabyte_353m(g_quick); }

backend::Cuda make_be() { return bench::cuda_bench_backend(); }

ModelWeights<float> const& host_weights() {
  static ModelWeights<float> w = [] {
    ModelWeights<float> x(bench_config());
    train::initialize_mamba(x, 1);
    return x;
  }();
  return w;
}

std::vector<std::int32_t> random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = static_cast<std::int32_t>(rng() % 256);
  return t;
}

std::size_t used_bytes() {
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
  std::size_t free = 0, total = 0;
  MAMBABYTE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return total - free;
}

/// Times fn on the stream with CUDA events (manual time).
template <class Fn>
void time_loop(benchmark::State& state, backend::Cuda const& be, Fn&& fn) {
  (void)bench::cuda_time_loop(state, be, fn);
}

template <class S, bool kKeep = true, bool kStates = false>
void BM_TrainStep(benchmark::State& state) {
  int const batch = static_cast<int>(state.range(0)), L = static_cast<int>(state.range(1));
  auto const be = make_be();
  ModelConfig const c = bench_config();
  std::size_t const before = used_bytes();
  auto engine = std::make_unique<mcu::CudaStepEngine<S>>(c, be);
  engine->model().set_keep_activations(kKeep);
  engine->model().set_keep_scan_states(kStates);
  train::AdamW<float> opt(c, train::AdamWOptions{});
  engine->load(host_weights(), opt);
  auto const tokens = random_bytes(static_cast<std::size_t>(batch) * (L + 1), 7);
  (void)engine->step(tokens, batch, 1e-4, 1.0);  // warm-up: allocations, cuBLAS heuristics
  std::size_t const peak = used_bytes() - before;
  time_loop(state, be, [&] { (void)engine->step(tokens, batch, 1e-4, 1.0); });
  double const bytes = double(batch) * L;
  state.counters["bytes_per_second"] = benchmark::Counter(bytes * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["MFU"] = benchmark::Counter(6.0 * double(c.parameter_count()) * bytes / kPeakFlops *
                                                 state.iterations(), benchmark::Counter::kIsRate);
  state.counters["peak_GiB"] = double(peak) / double(1ull << 30);
  state.counters["activation_GiB"] = double(engine->activation_bytes()) / double(1ull << 30);
  state.counters["params_M"] = double(c.parameter_count()) / 1e6;
}

template <class S>
void BM_Prefill(benchmark::State& state) {
  int const batch = static_cast<int>(state.range(0)), L = static_cast<int>(state.range(1));
  auto const be = make_be();
  ModelConfig const c = bench_config();
  mcu::DeviceWeights<S> w(host_weights(), be);
  mcu::Model<S> m(be);
  mcu::DeviceState st(c, batch, be);
  auto const tokens = random_bytes(static_cast<std::size_t>(batch) * L, 9);
  (void)m.forward(w, tokens, batch, L, st);
  time_loop(state, be, [&] {
    st.reset();
    (void)m.forward(w, tokens, batch, L, st);
  });
  state.counters["bytes_per_second"] =
      benchmark::Counter(double(batch) * L * state.iterations(), benchmark::Counter::kIsRate);
}

template <class S, bool kNoPdl = false, bool kUnfused = false, bool kNoPersistent = false, bool kDtGemm = false,
          bool kCxSplit = false>
void BM_Decode(benchmark::State& state) {
  int const batch = static_cast<int>(state.range(0));
  auto const be = make_be();
  ModelConfig const c = bench_config();
  mcu::DeviceWeights<S> w(host_weights(), be);
  if (kNoPdl) setenv("MAMBABYTE_NO_PDL", "1", 1);  // read when the model is constructed
  mcu::Model<S> m(be);
  if (kNoPdl) unsetenv("MAMBABYTE_NO_PDL");
  if (kUnfused) m.set_fused_decode(false);
  if (kNoPersistent || kNoPdl) m.set_persistent_decode(false);
  if (kDtGemm) m.set_step_dt_projection(false);
  if (kCxSplit) m.set_step_conv_xproj(false);
  mcu::DeviceState st(c, batch, be);
  auto const tokens = random_bytes(static_cast<std::size_t>(batch), 11);
  for (int i = 0; i < 3; ++i) (void)m.step(w, tokens, st);  // capture + warm-up
  time_loop(state, be, [&] { (void)m.step(w, tokens, st); });
  state.counters["persistent"] = m.persistent_decode() ? 1 : 0;
  state.counters["fused"] = m.fused_decode() ? 1 : 0;
  double const weight_bytes = double(c.parameter_count()) * sizeof(S);
  state.counters["bytes_per_second"] = benchmark::Counter(double(batch) * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["floor_frac"] =
      benchmark::Counter(weight_bytes / kHbm * state.iterations(), benchmark::Counter::kIsRate);
}

void register_all() {
  std::vector<std::pair<int, int>> train = g_quick ? std::vector<std::pair<int, int>>{{1, 256}, {2, 256}}
                                                   : std::vector<std::pair<int, int>>{{1, 8192}, {4, 8192}};
  std::vector<std::pair<int, int>> prefill = g_quick ? std::vector<std::pair<int, int>>{{1, 512}}
                                                     : std::vector<std::pair<int, int>>{{1, 8192}, {8, 8192}};
  std::vector<int> decode = {1, 4, 5, 8, 16, 32, 64};
  int const it_train = g_quick ? 2 : 5, it_pre = g_quick ? 2 : 10, it_dec = g_quick ? 5 : 300;
  for (auto [b, l] : train) {
    benchmark::RegisterBenchmark("TrainStep/bf16", BM_TrainStep<mcu::bf16>)->Args({b, l})->UseManualTime()->Iterations(it_train)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("TrainStep/fp32", BM_TrainStep<float>)->Args({b, l})->UseManualTime()->Iterations(it_train)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("TrainStepRecompute/bf16", BM_TrainStep<mcu::bf16, false>)->Args({b, l})->UseManualTime()->Iterations(it_train)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("TrainStepKeepStates/bf16", BM_TrainStep<mcu::bf16, true, true>)->Args({b, l})->UseManualTime()->Iterations(it_train)->Unit(benchmark::kMillisecond);
  }
  for (auto [b, l] : prefill) {
    benchmark::RegisterBenchmark("Prefill/bf16", BM_Prefill<mcu::bf16>)->Args({b, l})->UseManualTime()->Iterations(it_pre)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("Prefill/fp32", BM_Prefill<float>)->Args({b, l})->UseManualTime()->Iterations(it_pre)->Unit(benchmark::kMillisecond);
  }
  for (int b : decode) {
    benchmark::RegisterBenchmark("Decode/bf16", BM_Decode<mcu::bf16>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("Decode/fp32", BM_Decode<float>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  }
  // decode.cuh's fused kernels (3 per layer, PDL) where the persistent step is the default
  for (int b : {1, 4, 5, 8})
    benchmark::RegisterBenchmark("DecodeFusedPDL/bf16", BM_Decode<mcu::bf16, false, false, true>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  // the fused decode step without programmatic dependent launch (plain kernel boundaries)
  benchmark::RegisterBenchmark("DecodeNoPDL/bf16", BM_Decode<mcu::bf16, true>)->Arg(1)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  // the layer-by-layer step (cuBLAS GEMMs + state update) where the fused one is the default
  for (int b : {1, 4})
    benchmark::RegisterBenchmark("DecodeUnfused/bf16", BM_Decode<mcu::bf16, false, true>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  // the layer-by-layer step with dt_proj as a separate GEMM (set_step_dt_projection(false))
  for (int b : {16, 64})
    benchmark::RegisterBenchmark("DecodeDtGemm/bf16", BM_Decode<mcu::bf16, false, false, false, true>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("DecodeDtGemm/fp32", BM_Decode<float, false, false, false, true>)->Arg(1)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  // the layer-by-layer step with the conv kernel and the x_proj GEMM (set_step_conv_xproj(false))
  for (int b : {16, 32})  // (above 32 the bf16 step keeps the split: Model::kStepConvXprojMaxBatchBf16)
    benchmark::RegisterBenchmark("DecodeConvXprojSplit/bf16", BM_Decode<mcu::bf16, false, false, false, false, true>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
  for (int b : {1, 64})
    benchmark::RegisterBenchmark("DecodeConvXprojSplit/fp32", BM_Decode<float, false, false, false, false, true>)->Arg(b)->UseManualTime()->Iterations(it_dec)->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  return mambabyte::bench::cuda_bench_main(argc, argv, "bench_cuda_model", g_quick, register_all);
}
