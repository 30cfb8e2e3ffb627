// Shared by the CUDA benchmark programs (bench_cuda_model, bench_cuda_layers, bench_cuda_gemm):
// the stream they time on and their main().
#pragma once

#include <mambabyte/cuda.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>

namespace mambabyte::bench {

/// The backend every benchmark of the program runs on: one non-blocking stream, created on
/// first use (CUDA events are recorded on it).
inline backend::Cuda cuda_bench_backend() {
  static cudaStream_t s = [] {
    cudaStream_t x = nullptr;
    MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
    return x;
  }();
  backend::Cuda be;
  be.stream = s;
  return be;
}

/// Times fn on be.stream with CUDA events, one call per benchmark iteration (manual time);
/// returns the seconds summed over the iterations.
template <class Fn>
double cuda_time_loop(benchmark::State& state, backend::Cuda const& be, Fn&& fn) {
  cudaEvent_t a, b;
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&a));
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&b));
  double total = 0;
  for (auto _ : state) {
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(a, be.stream));
    fn();
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(b, be.stream));
    MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MAMBABYTE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    state.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
  }
  (void)cudaEventDestroy(a);
  (void)cudaEventDestroy(b);
  return total;
}

/// main() of a CUDA benchmark program: a first argument --quick sets `quick` and is removed
/// (the small shapes ctest runs); without a CUDA device the program says so and succeeds;
/// otherwise register_all() and Google Benchmark with the remaining arguments.
inline int cuda_bench_main(int argc, char** argv, char const* name, bool& quick, void (*register_all)()) {
  if (argc > 1 && std::strcmp(argv[1], "--quick") == 0) {
    quick = true;
    for (int i = 1; i + 1 < argc; ++i) argv[i] = argv[i + 1];
    --argc;
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("%s: no CUDA device, nothing to measure\n", name);
    return 0;
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace mambabyte::bench
