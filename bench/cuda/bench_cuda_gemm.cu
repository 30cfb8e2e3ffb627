// bench_cuda_gemm: the GEMMs of one MambaByte-353M layer's training step (d_model 1024, d_inner
// 2048, dt_rank 64, x_proj width 96; M = batch x length rows, 4 x 8192 by default), bf16 inputs,
// fp32 accumulation, as backend/cuda/gemm.cuh issues them (Google Benchmark, manual time from CUDA
// events, one GEMM per iteration):
//   - Default/<gemm>: gemm.cuh (cublasGemmEx: cuBLAS's heuristic choice), what the model runs.
//   - LtBest/<gemm>: the fastest of cuBLASLt's heuristic candidates for the same problem (up to
//     kCandidates, each timed over 10 launches after a warm-up; the winner's index in `algo`).
// Counters: TFLOP_per_s (2 M N K / time) and frac_790 (of the 790 TFLOP/s that MFU is measured
// against). The question it answers: how far the model's GEMMs are from the best cuBLAS can do
// on these shapes (docs/cuda.md).
// --quick on the command line (first argument): M = 512 (ctest).
#include <mambabyte/cuda.hpp>

#include <benchmark/benchmark.h>

#include "bench_cuda_main.hpp"

#include <cublasLt.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace mambabyte;
namespace bc = mambabyte::backend::cuda;
using bc::DeviceBuffer;
using bf16 = __nv_bfloat16;

bool g_quick = false;
constexpr double kPeak = 790e12;
constexpr int kCandidates = 8;
constexpr std::size_t kWorkspace = std::size_t(32) << 20;  // as bc::Blas

#define LT_CHECK(expr)                                                                               \
  do {                                                                                               \
    cublasStatus_t const s_ = (expr);                                                                \
    if (s_ != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error ", cublasGetStatusName(s_), " from " #expr); \
  } while (0)

/// One column-major GEMM as gemm.cuh's gemm_cm issues it: C(m, n) = op(A) op(B) (+ C).
struct Gemm {
  char const* name;
  bool ta, tb;
  int m, n, k;
  long lda, ldb, ldc;
  bool beta_one;  ///< accumulate into C
  bool c_float;   ///< C is the fp32 gradient accumulator (else bf16)
};

/// The layer's GEMMs at M rows (row-major nn.Linear y = x W^T; see gemm.cuh's layout notes).
std::vector<Gemm> layer_gemms(int M) {
  int const dm = 1024, di = 2048, R = 64, X = 96;
  auto fwd = [&](char const* nm, int N, int K, long ldx, long ldy) {
    return Gemm{nm, true, false, N, M, K, K, ldx, ldy, false, false};
  };
  auto dx = [&](char const* nm, int N, int K, long lddy, long lddx, bool acc) {
    return Gemm{nm, false, false, K, M, N, K, lddy, lddx, acc, false};
  };
  auto dw = [&](char const* nm, int N, int K, long ldx, long lddy) {
    return Gemm{nm, false, true, K, N, M, ldx, lddy, K, true, true};
  };
  return {
      fwd("in_proj.fwd", 2 * di, dm, dm, 2 * di),       dx("in_proj.dx", 2 * di, dm, 2 * di, dm, false),
      dw("in_proj.dw", 2 * di, dm, dm, 2 * di),         fwd("x_proj.fwd", X, di, di, X),
      dx("x_proj.dx", X, di, X, di, true),              dw("x_proj.dw", X, di, di, X),
      fwd("dt_proj.fwd", di, R, X, di),                 dx("dt_proj.dx", di, R, di, X, false),
      dw("dt_proj.dw", di, R, X, di),                   fwd("out_proj.fwd", dm, di, di, dm),
      dx("out_proj.dx", dm, di, dm, di, false),         dw("out_proj.dw", dm, di, di, dm),
  };
}

backend::Cuda make_be() { return bench::cuda_bench_backend(); }

/// Operands of one problem (contents irrelevant to the timing: a fixed small value).
struct Operands {
  DeviceBuffer<bf16> A, B;
  DeviceBuffer<bf16> Ch;
  DeviceBuffer<float> Cf;
  explicit Operands(Gemm const& g)
      : A(static_cast<std::size_t>(g.lda) * (g.ta ? g.m : g.k)),
        B(static_cast<std::size_t>(g.ldb) * (g.tb ? g.k : g.n)),
        Ch(g.c_float ? 0 : static_cast<std::size_t>(g.ldc) * g.n),
        Cf(g.c_float ? static_cast<std::size_t>(g.ldc) * g.n : 0) {
    auto const be = make_be();
    bc::device_fill(be, A.data(), A.size(), __float2bfloat16_rn(0.01f));
    bc::device_fill(be, B.data(), B.size(), __float2bfloat16_rn(0.02f));
    if (g.c_float) bc::device_fill(be, Cf.data(), Cf.size(), 0.f);
    else bc::device_fill(be, Ch.data(), Ch.size(), __float2bfloat16_rn(0.f));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
  }
};

template <class Fn>
double time_ms(cudaStream_t s, int reps, Fn&& fn) {
  cudaEvent_t a, b;
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&a));
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(a, s));
    fn();
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(b, s));
    MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MAMBABYTE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  (void)cudaEventDestroy(a);
  (void)cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void counters(benchmark::State& state, Gemm const& g, double sec_total) {
  double const flops = 2.0 * g.m * double(g.n) * g.k;
  double const per = sec_total / static_cast<double>(state.iterations());
  state.counters["TFLOP_per_s"] = flops / per / 1e12;
  state.counters["frac_790"] = flops / per / kPeak;
}

void BM_Default(benchmark::State& state, Gemm g) {
  auto const be = make_be();
  Operands o(g);
  bc::Blas blas(be);
  auto run = [&] {
    if (g.c_float)
      bc::gemm_cm(blas, be, g.ta, g.tb, g.m, g.n, g.k, o.A.data(), g.lda, o.B.data(), g.ldb, o.Cf.data(), g.ldc, 1.f,
                  g.beta_one ? 1.f : 0.f);
    else
      bc::gemm_cm(blas, be, g.ta, g.tb, g.m, g.n, g.k, o.A.data(), g.lda, o.B.data(), g.ldb, o.Ch.data(), g.ldc, 1.f,
                  g.beta_one ? 1.f : 0.f);
  };
  (void)time_ms(be.stream, 3, run);
  double total = 0;
  for (auto _ : state) {
    double const ms = time_ms(be.stream, 1, run);
    state.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
  }
  counters(state, g, total);
}

void BM_LtBest(benchmark::State& state, Gemm g) {
  auto const be = make_be();
  Operands o(g);
  cublasLtHandle_t lt = nullptr;
  LT_CHECK(cublasLtCreate(&lt));
  DeviceBuffer<std::uint8_t> ws(kWorkspace);
  cublasLtMatmulDesc_t desc = nullptr;
  LT_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t const opa = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  LT_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, g.ta ? g.k : g.m, g.ta ? g.m : g.k, g.lda));
  LT_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, g.tb ? g.n : g.k, g.tb ? g.k : g.n, g.ldb));
  LT_CHECK(cublasLtMatrixLayoutCreate(&lc, g.c_float ? CUDA_R_32F : CUDA_R_16BF, g.m, g.n, g.ldc));
  cublasLtMatmulPreference_t pref = nullptr;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  std::size_t const wsb = kWorkspace;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
  cublasLtMatmulHeuristicResult_t res[kCandidates] = {};
  int found = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, kCandidates, res, &found));
  float const alpha = 1.f, beta = g.beta_one ? 1.f : 0.f;
  void* C = g.c_float ? static_cast<void*>(o.Cf.data()) : static_cast<void*>(o.Ch.data());
  auto run = [&](int i) {
    LT_CHECK(cublasLtMatmul(lt, desc, &alpha, o.A.data(), la, o.B.data(), lb, &beta, C, lc, C, lc, &res[i].algo,
                            ws.data(), kWorkspace, be.stream));
  };
  int best = -1;
  double best_ms = 1e30;
  for (int i = 0; i < found; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    (void)time_ms(be.stream, 2, [&] { run(i); });
    double const ms = time_ms(be.stream, 10, [&] { run(i); });
    if (ms < best_ms) {
      best_ms = ms;
      best = i;
    }
  }
  if (best < 0) {
    state.SkipWithError("no cuBLASLt candidate");
  } else {
    double total = 0;
    for (auto _ : state) {
      double const ms = time_ms(be.stream, 1, [&] { run(best); });
      state.SetIterationTime(ms * 1e-3);
      total += ms * 1e-3;
    }
    counters(state, g, total);
    state.counters["algo"] = best;
    state.counters["candidates"] = found;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
}

void register_all() {
  int const M = g_quick ? 512 : 4 * 8192;
  int const it = g_quick ? 3 : 30;
  for (Gemm const& g : layer_gemms(M)) {
    benchmark::RegisterBenchmark((std::string("Default/") + g.name).c_str(), BM_Default, g)
        ->UseManualTime()->Iterations(it)->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark((std::string("LtBest/") + g.name).c_str(), BM_LtBest, g)
        ->UseManualTime()->Iterations(it)->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return mambabyte::bench::cuda_bench_main(argc, argv, "bench_cuda_gemm", g_quick, register_all);
}
