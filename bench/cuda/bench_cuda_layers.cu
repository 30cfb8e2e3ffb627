// bench_cuda_layers: the element-wise layer kernels of the training step at the MambaByte-353M
// shape (d_model 1024, d_inner 2048, d_conv 4), batch x length = 4 x 8192 by default
// (Google Benchmark, manual time from CUDA events, one launch of the operation per iteration):
//   - ConvForward/<dtype>: causal conv1d + SiLU, x read from the (rows, 2 d_inner) in_proj
//     output as the model lays it out, out (rows, d_inner).
//   - ConvBackward/<dtype>: the backward (recomputes the pre-activation; dx into the (rows,
//     2 d_inner) gradient, dweight / dbias through the workspace partials + column sums).
//   - AddNormForward/<dtype>: residual (fp32) + hidden (dtype) -> residual (fp32), LayerNorm ->
//     normed (dtype).
//   - AddNormBackward/<dtype>: d(normed) (dtype) -> dresidual += (fp32), dh (dtype), dweight /
//     dbias.
// Counters: GB_per_s = the bytes a kernel must move (every input read once, every output written
// once; listed per benchmark) / time; floor_frac = (those bytes / 4.8 TB/s) / time.
// --quick on the command line (first argument): 1 x 512 rows (ctest).
#include <mambabyte/cuda.hpp>

#include <benchmark/benchmark.h>

#include "bench_cuda_main.hpp"

#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

namespace {

using namespace mambabyte;
namespace bc = mambabyte::backend::cuda;
using bc::DeviceBuffer;

bool g_quick = false;
constexpr double kHbm = 4.8e12;
constexpr int kDModel = 1024, kDInner = 2048, kWidth = 4;

backend::Cuda make_be() { return bench::cuda_bench_backend(); }

template <class T>
DeviceBuffer<T> random_buffer(std::size_t n, std::uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<T> h(n);
  for (auto& x : h) {
    if constexpr (std::is_same_v<T, float>) x = d(g);
    else x = __float2bfloat16_rn(d(g));
  }
  DeviceBuffer<T> b(n);
  b.copy_from_host(h.data(), n);
  return b;
}

/// Times fn (warmed up once) with CUDA events; sets the bandwidth counters for `bytes`.
template <class Fn>
void time_loop(benchmark::State& state, backend::Cuda const& be, double bytes, Fn&& fn) {
  fn();
  MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
  double const total = bench::cuda_time_loop(state, be, fn);
  double const per = total / static_cast<double>(state.iterations());
  state.counters["GB_per_s"] = bytes / per / 1e9;
  state.counters["floor_frac"] = bytes / kHbm / per;
  state.counters["MB_moved"] = bytes / 1e6;
}

int batch() { return g_quick ? 1 : 4; }
int length() { return g_quick ? 512 : 8192; }

// Bytes: x (rows, d_inner) read, out (rows, d_inner) written.
template <class T>
void BM_ConvForward(benchmark::State& state) {
  auto const be = make_be();
  int const B = batch(), L = length(), C = kDInner;
  std::size_t const rows = static_cast<std::size_t>(B) * L;
  auto xz = random_buffer<T>(rows * 2 * C, 1, -2.f, 2.f);
  auto w = random_buffer<float>(static_cast<std::size_t>(C) * kWidth, 2, -0.5f, 0.5f);
  auto bias = random_buffer<float>(C, 3, -0.2f, 0.2f);
  DeviceBuffer<T> out(rows * C);
  double const bytes = 2.0 * rows * C * sizeof(T);
  time_loop(state, be, bytes, [&] {
    bc::conv1d_forward<T>(be, B, L, C, kWidth, xz.data(), 2 * C, w.data(), bias.data(), out.data(), C, nullptr, true);
  });
}

// Bytes: x and dout read, dx written (rows, d_inner each); the partials (batch x L / 512 x
// d_inner x 5 floats) written and read back.
template <class T>
void BM_ConvBackward(benchmark::State& state) {
  auto const be = make_be();
  int const B = batch(), L = length(), C = kDInner;
  std::size_t const rows = static_cast<std::size_t>(B) * L;
  auto xz = random_buffer<T>(rows * 2 * C, 4, -2.f, 2.f);
  auto dout = random_buffer<T>(rows * C, 5);
  auto w = random_buffer<float>(static_cast<std::size_t>(C) * kWidth, 6, -0.5f, 0.5f);
  auto bias = random_buffer<float>(C, 7, -0.2f, 0.2f);
  DeviceBuffer<T> dxz(rows * 2 * C);
  DeviceBuffer<float> dw(static_cast<std::size_t>(C) * kWidth), db(C);
  std::size_t const ws_bytes = bc::conv1d_backward_workspace_bytes(B, L, C, kWidth);
  DeviceBuffer<std::byte> ws(ws_bytes);
  bc::device_fill(be, dw.data(), dw.size(), 0.f);
  bc::device_fill(be, db.data(), db.size(), 0.f);
  double const bytes = 3.0 * rows * C * sizeof(T) + 2.0 * static_cast<double>(ws_bytes);
  time_loop(state, be, bytes, [&] {
    bc::conv1d_backward<T>(be, B, L, C, kWidth, xz.data(), 2 * C, w.data(), bias.data(), true, dout.data(), C,
                           dxz.data(), 2 * C, dw.data(), db.data(), ws.data());
  });
}

// Bytes: residual in (fp32) + hidden (T) read, residual out (fp32) + normed (T) written.
template <class T>
void BM_AddNormForward(benchmark::State& state) {
  auto const be = make_be();
  int const rows = batch() * length(), D = kDModel;
  std::size_t const n = static_cast<std::size_t>(rows) * D;
  auto r = random_buffer<float>(n, 8);
  auto h = random_buffer<T>(n, 9);
  auto w = random_buffer<float>(D, 10, 0.5f, 1.5f);
  auto bias = random_buffer<float>(D, 11, -0.1f, 0.1f);
  DeviceBuffer<float> r_out(n);
  DeviceBuffer<T> out(n);
  double const bytes = static_cast<double>(n) * (2 * sizeof(float) + 2 * sizeof(T));
  time_loop(state, be, bytes, [&] {
    bc::add_norm_forward<T, T>(be, rows, D, r.data(), h.data(), r_out.data(), w.data(), bias.data(), out.data(),
                               1e-5f, false);
  });
}

// Bytes: residual (fp32) and d(normed) (T) read, dresidual (fp32) read and written, dh (T)
// written; the partials (min(rows, 2048) x 2 x d_model floats) written and read back.
template <class T>
void BM_AddNormBackward(benchmark::State& state) {
  auto const be = make_be();
  int const rows = batch() * length(), D = kDModel;
  std::size_t const n = static_cast<std::size_t>(rows) * D;
  auto r = random_buffer<float>(n, 12);
  auto dout = random_buffer<T>(n, 13);
  auto dres = random_buffer<float>(n, 14);
  auto w = random_buffer<float>(D, 15, 0.5f, 1.5f);
  DeviceBuffer<T> dh(n);
  DeviceBuffer<float> dw(D), db(D);
  std::size_t const ws_bytes = bc::add_norm_backward_workspace_bytes(rows, D);
  DeviceBuffer<std::byte> ws(ws_bytes);
  bc::device_fill(be, dw.data(), dw.size(), 0.f);
  bc::device_fill(be, db.data(), db.size(), 0.f);
  double const bytes = static_cast<double>(n) * (3 * sizeof(float) + 2 * sizeof(T)) + 2.0 * static_cast<double>(ws_bytes);
  time_loop(state, be, bytes, [&] {
    bc::add_norm_backward<T, T>(be, rows, D, r.data(), w.data(), dout.data(), dres.data(), dh.data(), dw.data(),
                                db.data(), 1e-5f, false, ws.data());
  });
}

void register_all() {
  int const it = g_quick ? 3 : 50;
  auto reg = [&](char const* name, void (*fn)(benchmark::State&)) {
    benchmark::RegisterBenchmark(name, fn)->UseManualTime()->Iterations(it)->Unit(benchmark::kMicrosecond);
  };
  reg("ConvForward/bf16", BM_ConvForward<__nv_bfloat16>);
  reg("ConvForward/fp32", BM_ConvForward<float>);
  reg("ConvBackward/bf16", BM_ConvBackward<__nv_bfloat16>);
  reg("ConvBackward/fp32", BM_ConvBackward<float>);
  reg("AddNormForward/bf16", BM_AddNormForward<__nv_bfloat16>);
  reg("AddNormForward/fp32", BM_AddNormForward<float>);
  reg("AddNormBackward/bf16", BM_AddNormBackward<__nv_bfloat16>);
  reg("AddNormBackward/fp32", BM_AddNormBackward<float>);
}

}  // namespace

int main(int argc, char** argv) {
  return mambabyte::bench::cuda_bench_main(argc, argv, "bench_cuda_layers", g_quick, register_all);
}
