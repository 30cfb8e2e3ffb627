// bench_cuda_scan: the CUDA selective scan (fp32) per policy at the mamba_ssm comparison shapes
// (docs/cuda.md), timed with CUDA events: median of --reps runs after warm-ups. Prints a table
// with the two floors (HBM bytes at 4.8 TB/s, exponentials at the SFU rate) and the ratio to
// mamba_ssm 2.3.2's fp32 forward on one H200 (REFERENCE.md section 0).
//   bench_cuda_scan [--quick] [--reps R] [--shape I] [--policy NAME] [--backward]
//                   [--bf16 | --dtype bf16|fp32] [--step] [--train-shapes] [--checkpoints]
// --backward: time SelectiveScanBackward<Cuda, float, Sequential> instead (same inputs plus
// dout; writes du, ddelta, dz, dB, dC into x_proj-shaped rows; dA, dD, ddelta_bias accumulated),
// against mamba_ssm 2.3.2's fp32 backward (REFERENCE.md section 0).
// --shape I: only the I-th shape (0-based); --policy NAME: only policies whose name starts
// with NAME (e.g. "chunked<2048>", "seq"); both for profiling one kernel under ncu.
// --checkpoints: also the forward writing the backward's checkpoints (MixedScanArguments::
// checkpoints: rows "<policy>+ck") and, with --backward, the backward reading them instead of
// running its own checkpoint pass (its rows "+ck"; the forward that wrote them runs once first).
// --shapes B:D:L:N[,B:D:L:N...]: these shapes instead (no mamba_ssm figures; for sweeps).
// --train-shapes: the scans of the MambaByte-353M training step instead of the comparison
// shapes: (4, 2048, 8192, 16) and (1, 2048, 8192, 16) (no mamba_ssm figures for these).
// --quick: tiny shapes, 2 reps (keeps the program from rotting; ctest label `cuda`).
// --bf16 (or --dtype bf16): the bf16-storage operators (SelectiveScan[Backward]<Cuda,
// __nv_bfloat16, P>: u, delta, z, B, C, out and the activation gradients in bf16; A, D, bias,
// states and parameter gradients float), floors from the bf16 byte counts, ratios against
// mamba_ssm 2.3.2's bf16 figures (REFERENCE.md section 0).
// --step: the decode step backend::cuda::selective_state_update<T> (T from --dtype) at batch 1
// and 64, d_inner 2048, d_state 16: microseconds per call, launched one by one on a stream and
// replayed from a CUDA graph of 100 calls, against the bytes-moved floor (state read + written,
// A, D, bias, u, delta, z, B, C read, out written, at 4.8 TB/s); mamba_ssm's Triton
// selective_state_update measured 1.5 us in a graph at batch 1 (REFERENCE.md section 0).
// Inputs are random (a counter hash on the device), never zeros; B and C sit inside x_proj
// rows (ld = dt_rank + 2N, dt_rank 64) as the model passes them.
#include <mambabyte/cuda.hpp>

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
namespace ssm = mambabyte::ssm;
namespace scan = mambabyte::scan;
using bf = __nv_bfloat16;

template <class T>
__global__ void fill_uniform(T* p, std::size_t n, std::uint64_t seed, float lo, float hi) {
  std::size_t const stride = std::size_t(blockDim.x) * gridDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    std::uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 27; x *= 0x94D049BB133111EBull; x ^= x >> 31;
    float const r = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
    float const v = lo + (hi - lo) * r;
    if constexpr (std::is_same_v<T, float>) p[i] = v;
    else p[i] = __float2bfloat16_rn(v);
  }
}

__global__ void make_A(float* A, int d_inner, int N) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < d_inner * N) A[i] = -static_cast<float>(i % N + 1);  // S4D-real init
}

template <class T>
void fill(T* p, std::size_t n, std::uint64_t seed, float lo, float hi) {
  fill_uniform<T><<<1024, 256>>>(p, n, seed, lo, hi);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
}

struct Shape { int B, D, L, N; double mamba_fwd_ms; };

/// T: activation storage (float or bf16); the operators' Arguments for T.
template <class T>
struct Buffers {
  DeviceBuffer<T> u, delta, z, out, xproj;
  DeviceBuffer<float> bias, A, Dv, hT;
  typename ssm::SelectiveScan<Cuda, T, scan::Sequential>::Arguments a{};
  explicit Buffers(Shape const& s) {
    std::size_t const rows = std::size_t(s.B) * s.L;
    std::size_t const x = rows * s.D;
    int const dt_rank = 64;
    int const ldx = dt_rank + 2 * s.N;
    u = DeviceBuffer<T>(x); delta = DeviceBuffer<T>(x); z = DeviceBuffer<T>(x);
    out = DeviceBuffer<T>(x); xproj = DeviceBuffer<T>(rows * ldx);
    bias = DeviceBuffer<float>(s.D); A = DeviceBuffer<float>(std::size_t(s.D) * s.N);
    Dv = DeviceBuffer<float>(s.D); hT = DeviceBuffer<float>(std::size_t(s.B) * s.D * s.N);
    fill(u.data(), x, 1, -1, 1);
    fill(delta.data(), x, 2, -3, 1);
    fill(z.data(), x, 3, -2, 2);
    fill(out.data(), x, 4, -1, 1);
    fill(xproj.data(), rows * ldx, 5, -1, 1);
    fill(bias.data(), s.D, 6, -4, -2);
    fill(Dv.data(), s.D, 7, 0.9f, 1.1f);
    make_A<<<(s.D * s.N + 255) / 256, 256>>>(A.data(), s.D, s.N);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    a.batch = s.B; a.length = s.L; a.d_inner = s.D; a.d_state = s.N;
    a.u = u.data(); a.ld_u = s.D;
    a.delta = delta.data(); a.ld_delta = s.D;
    a.delta_bias = bias.data(); a.delta_softplus = true;
    a.A = A.data();
    a.B = xproj.data() + dt_rank; a.ld_B = ldx;
    a.C = xproj.data() + dt_rank + s.N; a.ld_C = ldx;
    a.D = Dv.data();
    a.z = z.data(); a.ld_z = s.D;
    a.out = out.data(); a.ld_out = s.D;
    a.final_state = hT.data();
  }
};

template <class P, class T, class Args>
double time_policy(Args const& a, int warmups, int reps, double* exps_factor) {
  Cuda const be{};
  using Op = ssm::SelectiveScan<Cuda, T, P>;
  DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be));
  cudaEvent_t e0, e1;
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e0));
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < warmups; ++i) Op::run(a, ws.data(), be);
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(e0, be.stream));
    Op::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(e1, be.stream));
    MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(e1));
    MAMBABYTE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], e0, e1));
  }
  MAMBABYTE_CUDA_CHECK(cudaEventDestroy(e0));
  MAMBABYTE_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  // Exponentials of the state update relative to one per (b, t, d, n): chunked scans do phase 1
  // on all chunks but the last, then phase 3 on all.
  *exps_factor = ws.size() ? 2.0 : 1.0;
  return reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

/// Backward: gradient buffers for the forward arguments of `buf`, timed like time_policy.
template <class T>
struct BwdBuffers {
  using Args = typename ssm::SelectiveScanBackward<Cuda, T, scan::Sequential>::Arguments;
  DeviceBuffer<T> dout, du, ddelta, dz, dxproj;
  DeviceBuffer<float> dA, dD, dbias;
  Args a{};
  template <class FwdArgs>
  BwdBuffers(Shape const& s, FwdArgs const& f) {
    std::size_t const rows = std::size_t(s.B) * s.L, x = rows * s.D;
    int const dt_rank = 64, ldx = dt_rank + 2 * s.N;
    dout = DeviceBuffer<T>(x); du = DeviceBuffer<T>(x); ddelta = DeviceBuffer<T>(x);
    dz = DeviceBuffer<T>(x); dxproj = DeviceBuffer<T>(rows * ldx);
    dA = DeviceBuffer<float>(std::size_t(s.D) * s.N); dD = DeviceBuffer<float>(s.D);
    dbias = DeviceBuffer<float>(s.D);
    fill(dout.data(), x, 11, -1, 1);
    fill(dA.data(), dA.size(), 12, 0, 0);
    fill(dD.data(), s.D, 13, 0, 0);
    fill(dbias.data(), s.D, 14, 0, 0);
    a = Args::from_forward(f);
    a.dout = dout.data(); a.ld_dout = s.D;
    a.du = du.data(); a.ld_du = s.D;
    a.ddelta = ddelta.data(); a.ld_ddelta = s.D;
    a.dz = dz.data(); a.ld_dz = s.D;
    a.dB = dxproj.data() + dt_rank; a.ld_dB = ldx;
    a.dC = dxproj.data() + dt_rank + s.N; a.ld_dC = ldx;
    a.dA = dA.data(); a.dD = dD.data(); a.ddelta_bias = dbias.data();
  }
};

template <class P, class T, class Args>
double time_backward(Args const& a, int warmups, int reps, std::size_t* ws_bytes) {
  Cuda const be{};
  using Op = ssm::SelectiveScanBackward<Cuda, T, P>;
  *ws_bytes = Op::workspace_bytes(a, be);
  DeviceBuffer<std::byte> ws(*ws_bytes);
  cudaEvent_t e0, e1;
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e0));
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < warmups; ++i) Op::run(a, ws.data(), be);
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(e0, be.stream));
    Op::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(e1, be.stream));
    MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(e1));
    MAMBABYTE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], e0, e1));
  }
  MAMBABYTE_CUDA_CHECK(cudaEventDestroy(e0));
  MAMBABYTE_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

double copy_bandwidth_tbs() {
  std::size_t const n = std::size_t(1) << 30;  // 1 GiB each way
  DeviceBuffer<char> src(n), dst(n);
  MAMBABYTE_CUDA_CHECK(cudaMemset(src.data(), 1, n));
  cudaEvent_t e0, e1;
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e0));
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms(10);
  for (int i = 0; i < 12; ++i) {
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(e0));
    MAMBABYTE_CUDA_CHECK(cudaMemcpy(dst.data(), src.data(), n, cudaMemcpyDeviceToDevice));
    MAMBABYTE_CUDA_CHECK(cudaEventRecord(e1));
    MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(e1));
    if (i >= 2) MAMBABYTE_CUDA_CHECK(cudaEventElapsedTime(&ms[i - 2], e0, e1));
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * n / (ms[5] * 1e-3) / 1e12;
}

/// Decode step: microseconds per selective_state_update<T> call at batch B, d_inner D, d_state N
/// (one token per sequence; u, delta, z rows of D, B / C inside x_proj rows).
template <class T>
void bench_step(int B, int D, int N, int reps, bool quick) {
  int const dt_rank = 64, ldx = dt_rank + 2 * N;
  DeviceBuffer<T> u(std::size_t(B) * D), delta(std::size_t(B) * D), z(std::size_t(B) * D),
      out(std::size_t(B) * D), xproj(std::size_t(B) * ldx);
  DeviceBuffer<float> state(std::size_t(B) * D * N), A(std::size_t(D) * N), Dv(D), bias(D);
  fill(u.data(), u.size(), 21, -1, 1);
  fill(delta.data(), delta.size(), 22, -3, 1);
  fill(z.data(), z.size(), 23, -2, 2);
  fill(xproj.data(), xproj.size(), 24, -1, 1);
  fill(state.data(), state.size(), 25, -1, 1);
  fill(bias.data(), bias.size(), 26, -4, -2);
  fill(Dv.data(), Dv.size(), 27, 0.9f, 1.1f);
  make_A<<<(D * N + 255) / 256, 256>>>(A.data(), D, N);
  MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  cudaStream_t stream = nullptr;
  MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Cuda const be{stream, 0};
  auto call = [&] {
    mambabyte::backend::cuda::selective_state_update<T>(
        be, B, D, N, state.data(), u.data(), D, delta.data(), D, bias.data(), true, A.data(),
        xproj.data() + dt_rank, ldx, xproj.data() + dt_rank + N, ldx, Dv.data(), z.data(), D, out.data(), D);
  };
  int const calls = quick ? 10 : 100;  // per timed sample
  cudaEvent_t e0, e1;
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e0));
  MAMBABYTE_CUDA_CHECK(cudaEventCreate(&e1));
  auto median_us = [&](auto&& body) {
    for (int w = 0; w < 3; ++w) body();
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; ++i) {
      MAMBABYTE_CUDA_CHECK(cudaEventRecord(e0, stream));
      body();
      MAMBABYTE_CUDA_CHECK(cudaEventRecord(e1, stream));
      MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(e1));
      MAMBABYTE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    std::sort(ms.begin(), ms.end());
    double const m = reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
    return m * 1e3 / calls;
  };
  // Launched one by one (includes the launch rate of the host thread).
  double const us_stream = median_us([&] { for (int i = 0; i < calls; ++i) call(); });
  // The same calls captured once into a graph and replayed.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MAMBABYTE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < calls; ++i) call();
  MAMBABYTE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MAMBABYTE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  double const us_graph = median_us([&] { MAMBABYTE_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  MAMBABYTE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MAMBABYTE_CUDA_CHECK(cudaGraphDestroy(graph));
  MAMBABYTE_CUDA_CHECK(cudaEventDestroy(e0));
  MAMBABYTE_CUDA_CHECK(cudaEventDestroy(e1));
  MAMBABYTE_CUDA_CHECK(cudaStreamDestroy(stream));
  double const bytes = 2.0 * B * D * N * 4                      // state read + written
                       + double(D) * N * 4 + 2.0 * D * 4        // A, D, bias
                       + 4.0 * B * D * sizeof(T)                // u, delta, z read, out written
                       + 2.0 * B * N * sizeof(T);               // B, C read
  double const floor_us = bytes / 4.8e12 * 1e6;
  std::printf("STEP %-4s (B=%d,D=%d,N=%d) us/call stream %7.3f graph %7.3f floor_mem %6.3f "
              "x_floor(graph) %6.1f MB %.3f%s\n",
              std::is_same_v<T, float> ? "fp32" : "bf16", B, D, N, us_stream, us_graph, floor_us,
              us_graph / floor_us, bytes / 1e6, B == 1 ? " mamba_ssm(triton, graph) 1.5 us" : "");
}

/// What the shape loop needs from main().
struct Ctx {
  std::vector<Shape> shapes;
  std::vector<double> mamba_bwd_ms;
  int warmups = 3, reps = 20, sms = 0, only_shape = -1;
  double sfu_per_s = 0;
  bool quick = false, backward = false, checkpoints = false;
  std::string only_policy;
};

/// The forward or backward table for activation storage T (float or bf16).
template <class T>
void run_shapes(Ctx const& cx) {
  constexpr double kAct = sizeof(T);  // bytes per activation element
  char const* dtype = std::is_same_v<T, float> ? "fp32" : "bf16";
  for (std::size_t si = 0; si < cx.shapes.size(); ++si) {
    if (cx.only_shape >= 0 && static_cast<std::size_t>(cx.only_shape) != si) continue;
    Shape const& s = cx.shapes[si];
    Buffers<T> buf(s);
    auto want = [&](char const* name) {
      return cx.only_policy.empty() || std::string(name).rfind(cx.only_policy, 0) == 0;
    };
    if (cx.backward) {
      // Floors: HBM = u, delta, z, dout read, du, ddelta, dz written, B, C read and dB, dC
      // written once per (b, t), at 4.8 TB/s (activations of sizeof(T) bytes); exponentials:
      // one per (b, t, d, n) at the SFU rate (this implementation does 3 with one segment:
      // checkpoint pass, recompute, reverse sweep; 4 with segments: + the local adjoint).
      BwdBuffers<T> g(s, buf.a);
      double const bytes = 7.0 * s.B * double(s.L) * s.D * kAct + 4.0 * s.B * double(s.L) * s.N * kAct;
      double const t_mem = bytes / 4.8e12 * 1e3;
      double const t_exp = double(s.B) * s.L * s.D * s.N / cx.sfu_per_s * 1e3;
      double const mb = cx.quick ? 0.0 : cx.mamba_bwd_ms[si];
      auto brow = [&](auto policy, char const* name) {
        using P = decltype(policy);
        if (!want(name)) return;
        std::size_t ws = 0;
        double const ms = time_backward<P, T>(g.a, cx.warmups, cx.reps, &ws);
        std::printf("BWD %s (%d,%d,%d,%d) %-14s ms %8.3f floor_mem %.3f floor_exp %.3f x_floor %6.2f "
                    "mamba_ssm_bwd %.3f speedup %.2f workspace_MB %.1f\n",
                    dtype, s.B, s.D, s.L, s.N, name, ms, t_mem, t_exp, ms / std::max(t_mem, t_exp), mb,
                    mb > 0 ? mb / ms : 0.0, ws / 1e6);
      };
      brow(scan::Sequential{}, "sequential");
      brow(scan::Chunked<256>{}, "chunked<256>");
      brow(scan::Chunked<512>{}, "chunked<512>");
      brow(scan::Chunked<1024>{}, "chunked<1024>");
      brow(scan::Chunked<2048>{}, "chunked<2048>");
      brow(scan::Chunked<4096>{}, "chunked<4096>");
      brow(scan::Chunked<8192>{}, "chunked<8192>");
      if (cx.checkpoints) {
        // the forward's checkpoints (written once by Auto's forward), then the backward reading them
        namespace mcu = mambabyte::backend::cuda;
        DeviceBuffer<float> ck(mcu::checkpoint_floats(s.B, s.L, s.D, s.N));
        mcu::MixedScanArguments<T> fm = mcu::to_mixed(buf.a);
        fm.checkpoints = ck.data();
        Cuda const be{};
        ssm::SelectiveScan<Cuda, T, scan::Auto>::run(fm, be);
        mcu::MixedScanBackwardArguments<T> gm = mcu::to_mixed(g.a);
        gm.checkpoints = ck.data();
        auto brow_ck = [&](auto policy, char const* name) {
          using P = decltype(policy);
          if (!want(name)) return;
          std::size_t ws = 0;
          double const ms = time_backward<P, T>(gm, cx.warmups, cx.reps, &ws);
          std::printf("BWD %s (%d,%d,%d,%d) %-14s ms %8.3f floor_mem %.3f floor_exp %.3f x_floor %6.2f "
                      "mamba_ssm_bwd %.3f speedup %.2f workspace_MB %.1f checkpoints_MB %.1f\n",
                      dtype, s.B, s.D, s.L, s.N, (std::string(name) + "+ck").c_str(), ms, t_mem, t_exp,
                      ms / std::max(t_mem, t_exp), mb, mb > 0 ? mb / ms : 0.0, ws / 1e6, ck.size() * 4.0 / 1e6);
        };
        brow_ck(scan::Sequential{}, "sequential");
        brow_ck(scan::Chunked<256>{}, "chunked<256>");
        brow_ck(scan::Chunked<512>{}, "chunked<512>");
        brow_ck(scan::Chunked<1024>{}, "chunked<1024>");
        brow_ck(scan::Chunked<2048>{}, "chunked<2048>");
        brow_ck(scan::Chunked<4096>{}, "chunked<4096>");
        brow_ck(scan::Auto{}, "auto");
      }
      if (want("auto")) {
        namespace sbd = mambabyte::backend::cuda::scan_bwd_detail;
        int const sc = ssm::resolve_auto_cuda_backward(s.B, s.L, s.D, cx.sms,
                                                       sbd::bwd_blocks_per_sm<T>(s.N, 0));
        std::string const name =
            "auto(" + (sc ? std::to_string(sc * sbd::kBwdChunk) : std::string("seq")) + ")";
        brow(scan::Auto{}, name.c_str());
      }
      continue;
    }
    double const bytes = 4.0 * s.B * double(s.L) * s.D * kAct + 2.0 * s.B * double(s.L) * s.N * kAct;
    double const t_mem = bytes / 4.8e12 * 1e3;
    double const exps = double(s.B) * s.L * s.D * s.N;
    auto row = [&](char const* name, double ms, double factor) {
      double const t_exp = exps * factor / cx.sfu_per_s * 1e3;
      double const floor = std::max(t_mem, t_exp);
      char shape[64];
      std::snprintf(shape, sizeof shape, "%s (%d,%d,%d,%d)", dtype, s.B, s.D, s.L, s.N);
      std::printf("%-22s %-16s %9.3f %9.0f %9.3f %9.3f %8.2f %9.3f %8.2f\n", shape, name, ms,
                  bytes / (ms * 1e-3) / 1e9, t_mem, t_exp, ms / floor, s.mamba_fwd_ms,
                  s.mamba_fwd_ms > 0 ? s.mamba_fwd_ms / ms : 0.0);
    };
    auto bench = [&](auto policy, char const* name) {
      using P = decltype(policy);
      if (!want(name)) return;
      double f = 1;
      double const t = time_policy<P, T>(buf.a, cx.warmups, cx.reps, &f);
      row(name, t, f);
    };
    bench(scan::Sequential{}, "sequential");
    bench(scan::Associative{}, "associative");
    bench(scan::Chunked<256>{}, "chunked<256>");
    bench(scan::Chunked<512>{}, "chunked<512>");
    bench(scan::Chunked<1024>{}, "chunked<1024>");
    bench(scan::Chunked<2048>{}, "chunked<2048>");
    bench(scan::Chunked<4096>{}, "chunked<4096>");
    if (cx.checkpoints) {
      namespace mcu = mambabyte::backend::cuda;
      DeviceBuffer<float> ck(mcu::checkpoint_floats(s.B, s.L, s.D, s.N));
      mcu::MixedScanArguments<T> fm = mcu::to_mixed(buf.a);
      fm.checkpoints = ck.data();
      auto bench_ck = [&](auto policy, char const* name) {
        using P = decltype(policy);
        if (!want(name)) return;
        double f = 1;
        double const t = time_policy<P, T>(fm, cx.warmups, cx.reps, &f);
        row((std::string(name) + "+ck").c_str(), t, f);
      };
      bench_ck(scan::Sequential{}, "sequential");
      bench_ck(scan::Chunked<256>{}, "chunked<256>");
      bench_ck(scan::Chunked<1024>{}, "chunked<1024>");
      bench_ck(scan::Auto{}, "auto");
    }
    if (want("auto")) {
      Cuda const be{};
      int const chunk = ssm::SelectiveScan<Cuda, T, scan::Auto>::choose(buf.a, be);
      double f = 1;
      double const t = time_policy<scan::Auto, T>(buf.a, cx.warmups, cx.reps, &f);
      std::string const name = "auto(" + (chunk ? std::to_string(chunk) : std::string("seq")) + ")";
      row(name.c_str(), t, f);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, backward = false, bf16 = false, step = false, train_shapes = false, checkpoints = false;
  std::string shape_list;
  int reps = 20, only_shape = -1;
  std::string only_policy;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--backward")) backward = true;
    else if (!std::strcmp(argv[i], "--bf16")) bf16 = true;
    else if (!std::strcmp(argv[i], "--step")) step = true;
    else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc) {
      std::string const t = argv[++i];
      if (t == "bf16") bf16 = true;
      else if (t == "fp32" || t == "float") bf16 = false;
      else {
        std::printf("bench_cuda_scan: unknown --dtype %s (bf16 or fp32)\n", t.c_str());
        return 2;
      }
    }
    else if (!std::strcmp(argv[i], "--shape") && i + 1 < argc) only_shape = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--policy") && i + 1 < argc) only_policy = argv[++i];
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--train-shapes")) train_shapes = true;
    else if (!std::strcmp(argv[i], "--checkpoints")) checkpoints = true;
    else if (!std::strcmp(argv[i], "--shapes") && i + 1 < argc) shape_list = argv[++i];
    else {
      std::printf("bench_cuda_scan: unknown or incomplete argument %s\n", argv[i]);
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_cuda_scan: no CUDA device, nothing to time\n");
    return 0;
  }
  try {
    cudaDeviceProp prop{};
    MAMBABYTE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    int clock_khz = 0;
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0) != cudaSuccess || clock_khz == 0) {
      (void)cudaGetLastError();
      clock_khz = 1980000;
    }
    Ctx cx;
    cx.sms = prop.multiProcessorCount;
    cx.sfu_per_s = double(cx.sms) * 16.0 * clock_khz * 1e3;  // MUFU.EX2: 16/clk/SM
    cx.quick = quick;
    cx.backward = backward;
    cx.checkpoints = checkpoints;
    cx.only_shape = only_shape;
    cx.only_policy = only_policy;
    // mamba_ssm 2.3.2 on one H200 (REFERENCE.md section 0): fp32 and bf16 forward / backward ms.
    if (bf16) {
      cx.shapes = {{8, 2048, 8192, 16, 2.569}, {1, 2048, 65536, 16, 2.940}, {16, 1536, 2048, 16, 0.883}};
      cx.mamba_bwd_ms = {9.375, 11.310, 3.496};
    } else {
      cx.shapes = {{8, 2048, 8192, 16, 4.911}, {1, 2048, 65536, 16, 5.624}, {16, 1536, 2048, 16, 1.733}};
      cx.mamba_bwd_ms = {10.9, 12.6, 4.0};
    }
    if (train_shapes) {
      cx.shapes = {{4, 2048, 8192, 16, 0}, {1, 2048, 8192, 16, 0}};
      cx.mamba_bwd_ms = {0, 0};
    }
    if (!shape_list.empty()) {
      cx.shapes.clear();
      std::size_t pos = 0;
      while (pos <= shape_list.size()) {
        std::size_t const end = std::min(shape_list.find(',', pos), shape_list.size());
        Shape sh{0, 0, 0, 0, 0};
        if (std::sscanf(shape_list.substr(pos, end - pos).c_str(), "%d:%d:%d:%d", &sh.B, &sh.D, &sh.L, &sh.N) != 4 ||
            sh.B <= 0 || sh.D <= 0 || sh.L <= 0 || sh.N <= 0) {
          std::printf("bench_cuda_scan: bad --shapes entry \"%s\" (B:D:L:N, positive)\n",
                      shape_list.substr(pos, end - pos).c_str());
          return 2;
        }
        cx.shapes.push_back(sh);
        pos = end + 1;
      }
      cx.mamba_bwd_ms.assign(cx.shapes.size(), 0.0);
    }
    cx.warmups = 3;
    if (reps <= 1) cx.warmups = 0;
    if (quick) {
      cx.shapes = {{2, 256, 1024, 16, 0}, {1, 128, 4096, 16, 0}};
      reps = 2;
      cx.warmups = 1;
    }
    cx.reps = reps;
    bool const copy = !(quick || only_shape >= 0 || step);
    double const copy_tbs = copy ? copy_bandwidth_tbs() : 0.0;
    std::printf("device %s, %d SMs, %.0f MHz; device copy %.2f TB/s (read+write); reps %d (median); %s\n",
                prop.name, cx.sms, clock_khz / 1e3, copy_tbs, reps, bf16 ? "bf16 storage" : "fp32");
    if (step) {
      for (int B : {1, 64}) {
        if (bf16) bench_step<bf>(B, 2048, 16, reps, quick);
        else bench_step<float>(B, 2048, 16, reps, quick);
      }
      return 0;
    }
    if (!backward)
      std::printf("%-22s %-16s %9s %9s %9s %9s %8s %9s %8s\n", "shape (B,D,L,N)", "policy", "ms",
                  "GB/s", "floor_mem", "floor_exp", "x_floor", "mamba_ssm", "speedup");
    if (bf16) run_shapes<bf>(cx);
    else run_shapes<float>(cx);
  } catch (std::exception const& e) {
    std::printf("FAIL %s\n", e.what());
    return 1;
  }
  return 0;
}
