/*! \file
 *  \brief Shared helpers for the Google Benchmark programs: a fast RNG, random model weights,
 *         the machine probes (memory bandwidth, GEMM rate, exp rate) that every floor is
 *         computed from, the floor formulas, and a wall-clock timer for per-iteration times.
 *
 *  Floors (docs/performance.md explains them): a benchmark's floor is the time the machine
 *  needs for the work it cannot avoid, at the rates the probes measured in this very process:
 *      bandwidth floor   = bytes that must move / probe bandwidth  (best of copy and triad)
 *      GEMM floor        = 2 * multiply-adds / probe GEMM rate      (Eigen fp32 GEMM 1024^3)
 *      transcendental    = exp-like evaluations / probe exp rate    (Eigen vectorised exp)
 *  and the counter floor_frac = floor time / measured time (1.0 = at the floor).
 *
 *  Environment:
 *    MAMBABYTE_BENCH_QUICK=1          small probes and shapes, the command line's min time (the
 *                                     bench_smoke ctest): numbers meaningless, proves they run
 *    MAMBABYTE_BENCH_WAIT_QUIET=0.15  wait for other processes to go quiet before the probes
 *                                     and before each timed loop (bench/run_benchmarks.py)
 *    OMP_NUM_THREADS                  threads for OpenMP and Eigen alike (default: all cores)
 *  Linux only for the contention counter (foreign_cpu, from /proc/stat); elsewhere it is absent.
 */
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#include "mambabyte/backend/cpu/parallel.hpp"
#include "mambabyte/model/config.hpp"
#include "mambabyte/model/weights.hpp"

namespace mbbench {

// ---- basics --------------------------------------------------------------------------------

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline bool quick_mode() {
  char const* e = std::getenv("MAMBABYTE_BENCH_QUICK");
  return e && *e && *e != '0';
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Seconds of CPU time the whole machine spent busy since boot (/proc/stat; Linux only; -1
/// where unavailable). Resolution: one clock tick (10 ms on this kernel).
inline double system_busy_s() {
  static long const tick = sysconf(_SC_CLK_TCK);
  std::FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return -1;
  unsigned long long v[8] = {};
  int const got = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                              &v[5], &v[6], &v[7]);
  std::fclose(f);
  if (got < 8 || tick <= 0) return -1;
  // user nice system [idle] [iowait] irq softirq steal
  return static_cast<double>(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / static_cast<double>(tick);
}

/// CPU seconds this process has used (all its threads).
inline double process_cpu_s() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

/// With MAMBABYTE_BENCH_WAIT_QUIET=<cores> in the environment, wait (outside any timed loop)
/// until other processes have used less than that many cores for 2 s in a row (at most 15
/// minutes); when they stayed below it ever since the previous call, return at once. The
/// development machines are shared: a compile on the other core halves every parallel loop
/// and stalls OpenMP barriers. Returns the seconds waited.
inline double wait_for_quiet() {
  char const* e = std::getenv("MAMBABYTE_BENCH_WAIT_QUIET");
  if (!e || !*e) return 0;
  double const limit = std::atof(e) > 0 ? std::atof(e) : 0.15;
  static double last_t = -1, last_sys = 0, last_proc = 0;  // the last moment known quiet
  double const start = now_s();
  double sys = system_busy_s(), proc = process_cpu_s();
  if (sys < 0) return 0;
  if (last_t >= 0) {
    double const dt = start - last_t;
    if (dt < 0.25) return 0;  // too short to measure in clock ticks
    if (((sys - last_sys) - (proc - last_proc)) / dt < limit) {
      last_t = start; last_sys = sys; last_proc = proc;
      return 0;
    }
  }
  int calm = 0;
  while (calm < 4 && now_s() - start < 900) {
    struct timespec const half{0, 500000000};
    nanosleep(&half, nullptr);
    double const sys1 = system_busy_s(), proc1 = process_cpu_s();
    double const foreign = ((sys1 - sys) - (proc1 - proc)) / 0.5;
    sys = sys1; proc = proc1;
    calm = foreign < limit ? calm + 1 : 0;
  }
  last_t = now_s(); last_sys = system_busy_s(); last_proc = process_cpu_s();
  return last_t - start;
}

/// Wall time of the timed loop, read after it: seconds per iteration; and how many cores
/// other processes kept busy meanwhile (contention: the machine is shared).
struct LoopTimer {
  double t0 = now_s(), sys0 = system_busy_s(), proc0 = process_cpu_s();
  double per_iter(benchmark::State const& s) const {
    return s.iterations() > 0 ? (now_s() - t0) / static_cast<double>(s.iterations()) : 0.0;
  }
  /// Sets the counter foreign_cpu = cores used by other processes during the loop (approximate:
  /// /proc/stat counts in ticks). Call right after the loop.
  void report_contention(benchmark::State& s) const {
    double const wall = now_s() - t0, sys1 = system_busy_s();
    if (sys0 < 0 || sys1 < 0 || wall <= 0) return;
    s.counters["foreign_cpu"] = std::max(0.0, (sys1 - sys0) - (process_cpu_s() - proc0)) / wall;
  }
};

/// splitmix64: fast and good enough for benchmark inputs.
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
};

/// Fill p[0, n) with U(lo, hi), in parallel (blocks seeded from `seed` and the block index).
template <class T>
void fill_uniform(T* p, std::size_t n, double lo, double hi, std::uint64_t seed) {
  std::size_t const block = std::size_t(1) << 16;
  long const blocks = static_cast<long>((n + block - 1) / block);
#pragma omp parallel for schedule(static)
  for (long k = 0; k < blocks; ++k) {
    Rng r(seed ^ (static_cast<std::uint64_t>(k) << 20));
    std::size_t const b = static_cast<std::size_t>(k) * block, e = std::min(n, b + block);
    for (std::size_t i = b; i < e; ++i) p[i] = static_cast<T>(r.uniform(lo, hi));
  }
}

/// Random weights with mamba_ssm-like scales (uniform with the variance of the usual normal
/// init: performance does not depend on the distribution, and this fills 353M values in
/// well under a second).
template <class T>
mambabyte::ModelWeights<T> random_weights(mambabyte::ModelConfig cfg, std::uint64_t seed) {
  mambabyte::ModelWeights<T> w(std::move(cfg));
  auto const& c = w.config();
  std::uint64_t k = 0;
  for (auto const& p : w.parameters()) {
    auto t = w.tensor(p);
    std::string const& n = p.name;
    ++k;
    auto fill = [&](double mean, double sd) {
      double const h = sd * std::sqrt(3.0);
      fill_uniform(t.data(), t.size(), mean - h, mean + h, seed * 1000003 + k);
    };
    if (n.ends_with("A_log")) {
      for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(std::log(double(i % c.d_state + 1)));
    } else if (n.ends_with("mixer.D")) {
      fill(1.0, 0.1);
    } else if (n.ends_with("dt_proj.bias")) {  // inverse softplus of log-uniform dt in [1e-3, 1e-1]
      Rng r(seed + k);
      for (auto& x : t) {
        double const dt = std::exp(r.uniform(std::log(1e-3), std::log(1e-1)));
        x = static_cast<T>(dt + std::log(-std::expm1(-dt)));
      }
    } else if (n.ends_with("dt_proj.weight")) {
      fill(0, 1.0 / std::sqrt(c.dt_rank));
    } else if (n.ends_with("norm.weight") || n.ends_with("norm_f.weight")) {
      fill(1.0, 0.1);
    } else if (n.ends_with(".bias")) {
      fill(0, 0.1);
    } else if (n.ends_with("conv1d.weight")) {
      fill(0, 0.3);
    } else if (n == "backbone.embedding.weight") {
      fill(0, 0.02);
    } else if (p.shape.size() == 2) {
      fill(0, 1.0 / std::sqrt(static_cast<double>(p.shape[1])));
    } else {
      fill(0, 0.3);
    }
  }
  return w;
}

/// Multiply-adds per token of every GEMM in the model (in_proj, x_proj, dt_proj, out_proj per
/// layer, then the head). Twice this is the GEMM flops per byte of text.
inline double matmul_params(mambabyte::ModelConfig const& c) {
  double const dm = c.d_model, di = c.d_inner(), X = c.x_proj_out(), R = c.dt_rank, V = c.vocab_size;
  return c.n_layer * (dm * 2 * di + di * X + R * di + di * dm) + V * dm;
}

// ---- probes --------------------------------------------------------------------------------

/// Streams over arrays far larger than the caches (three arrays of `bytes_per_array`).
class BandwidthProbe {
 public:
  explicit BandwidthProbe(std::size_t bytes_per_array)
      : n_(bytes_per_array / sizeof(float)), a_(new float[n_]), b_(new float[n_]), c_(new float[n_]) {
    float* a = a_.get(); float* b = b_.get(); float* c = c_.get();
    long const n = static_cast<long>(n_);
#pragma omp parallel for schedule(static)  // first touch by the threads that stream later
    for (long i = 0; i < n; ++i) { a[i] = 1.0f; b[i] = 2.0f; c[i] = 0.5f; }
  }
  std::size_t n() const { return n_; }
  /// c = a; returns bytes moved (read + write; write-allocate traffic not counted, as STREAM).
  double copy() {
    float const* a = a_.get(); float* c = c_.get();
    long const n = static_cast<long>(n_);
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) c[i] = a[i];
    benchmark::DoNotOptimize(c[n / 2]);
    return 2.0 * sizeof(float) * static_cast<double>(n_);
  }
  /// a = b + s * c; returns bytes moved (two reads, one write).
  double triad() {
    float* a = a_.get(); float const* b = b_.get(); float const* c = c_.get();
    long const n = static_cast<long>(n_);
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) a[i] = b[i] + 0.75f * c[i];
    benchmark::DoNotOptimize(a[n / 2]);
    return 3.0 * sizeof(float) * static_cast<double>(n_);
  }

 private:
  std::size_t n_;
  std::unique_ptr<float[]> a_, b_, c_;
};

/// exp(x * s) over a per-thread, L1-resident array on every thread (the same Eigen packet exp
/// the scan evaluates for exp(delta * A)). Returns the number of exps done.
template <class T>
double exp_kernel(int inner) {
  int const n = 4096;
  double done = 0;
#pragma omp parallel reduction(+ : done)
  {
    Eigen::Array<T, Eigen::Dynamic, 1> x = Eigen::Array<T, Eigen::Dynamic, 1>::LinSpaced(n, T(-8), T(0)), y(n);
    T acc = 0;
    for (int k = 0; k < inner; ++k) {
      y = (x * T(1 + 1e-7 * k)).exp();
      acc += y(k % n);
    }
    benchmark::DoNotOptimize(acc);
    done += static_cast<double>(inner) * n;
  }
  return done;
}

/// C = A * B, n x n x n, Eigen fp32 with Eigen's own threading. Returns flops.
struct GemmProbe {
  int n;
  Eigen::MatrixXf A, B, C;
  explicit GemmProbe(int n_) : n(n_), A(Eigen::MatrixXf::Random(n_, n_)), B(Eigen::MatrixXf::Random(n_, n_)), C(n_, n_) {}
  double run() {
    C.noalias() = A * B;
    benchmark::DoNotOptimize(C.data());
    return 2.0 * n * n * static_cast<double>(n);
  }
};

/// The rates every floor uses, measured once per process (best of several runs).
struct Probes {
  double bandwidth = 0;      ///< bytes/s, best of copy and triad
  double copy_bw = 0, triad_bw = 0;
  double gemm_flops = 0;     ///< fp32 flops/s
  double exp_f32 = 0, exp_f64 = 0;  ///< exps/s, all threads
  int threads = 1;
  double foreign_cpu = -1;  ///< cores other processes used while the probes ran (-1: unknown)
  template <class T> double exp_rate() const { return sizeof(T) == 4 ? exp_f32 : exp_f64; }
};

/// Best rate of `once()` (which returns the work it did): windows of >= 0.3 s of repeated calls,
/// each after wait_for_quiet(); a window counts only if other processes stayed under the
/// MAMBABYTE_BENCH_WAIT_QUIET limit meanwhile (every window counts without it). `reps` windows
/// are kept (at most 40 tried); `foreign` gets the highest contention among them.
template <class F>
double best_rate(F&& once, int reps, double window, double& foreign) {
  char const* e = std::getenv("MAMBABYTE_BENCH_WAIT_QUIET");
  double const limit = e && std::atof(e) > 0 ? std::atof(e) : -1;
  double best = 0;
  once();  // warm
  for (int kept = 0, tried = 0; kept < reps && tried < 40; ++tried) {
    wait_for_quiet();
    double const w0 = now_s(), sys0 = system_busy_s(), proc0 = process_cpu_s();
    double window_best = 0;
    do {
      double const t = now_s(), work = once();
      window_best = std::max(window_best, work / (now_s() - t));
    } while (now_s() - w0 < window);
    double const sys1 = system_busy_s();
    double const f = sys0 >= 0 && sys1 >= 0 ? std::max(0.0, (sys1 - sys0) - (process_cpu_s() - proc0)) / (now_s() - w0) : 0;
    if (limit > 0 && f >= limit) continue;
    foreign = std::max(foreign, f);
    best = std::max(best, window_best);
    ++kept;
  }
  return best;
}

inline Probes measure_probes() {
  bool const quick = quick_mode();
  Probes p;
  p.threads = max_threads();
  p.foreign_cpu = 0;
  int const reps = quick ? 1 : 3;
  double const window = quick ? 0.01 : 0.3;
  {
    BandwidthProbe bw(quick ? (std::size_t(16) << 20) : (std::size_t(256) << 20));
    p.copy_bw = best_rate([&] { return bw.copy(); }, reps, window, p.foreign_cpu);
    p.triad_bw = best_rate([&] { return bw.triad(); }, reps, window, p.foreign_cpu);
    p.bandwidth = std::max(p.copy_bw, p.triad_bw);
  }
  {
    GemmProbe g(quick ? 256 : 1024);
    p.gemm_flops = best_rate([&] { return g.run(); }, reps, window, p.foreign_cpu);
  }
  int const inner = quick ? 20 : 500;
  p.exp_f32 = best_rate([&] { return exp_kernel<float>(inner); }, reps, window, p.foreign_cpu);
  p.exp_f64 = best_rate([&] { return exp_kernel<double>(inner); }, reps, window, p.foreign_cpu);
  return p;
}

inline Probes const& probes() {
  static Probes const p = measure_probes();
  return p;
}

/// Threads: OMP_NUM_THREADS (or all cores) for OpenMP and Eigen alike; then run the probes and
/// put their results into the benchmark context (JSON "context" and the console header).
inline void init(int* argc, char** argv) {
  mambabyte::backend::cpu::set_default_threads(max_threads());
  benchmark::Initialize(argc, argv);
  Probes const& p = probes();
  auto fmt = [](double v, double scale) { return std::to_string(v / scale); };
  benchmark::AddCustomContext("mambabyte_threads", std::to_string(p.threads));
  benchmark::AddCustomContext("probe_bandwidth_GBps", fmt(p.bandwidth, 1e9));
  benchmark::AddCustomContext("probe_copy_GBps", fmt(p.copy_bw, 1e9));
  benchmark::AddCustomContext("probe_triad_GBps", fmt(p.triad_bw, 1e9));
  benchmark::AddCustomContext("probe_gemm_f32_GFLOPs", fmt(p.gemm_flops, 1e9));
  benchmark::AddCustomContext("probe_exp_f32_Gps", fmt(p.exp_f32, 1e9));
  benchmark::AddCustomContext("probe_exp_f64_Gps", fmt(p.exp_f64, 1e9));
  benchmark::AddCustomContext("probe_foreign_cpu", fmt(p.foreign_cpu, 1));
  if (quick_mode()) benchmark::AddCustomContext("quick_mode", "1 (probe numbers meaningless)");
}

// ---- probe benchmarks (registered by every program) -----------------------------------------

inline void BM_MemoryCopy(benchmark::State& state) {
  static BandwidthProbe bw(quick_mode() ? (std::size_t(16) << 20) : (std::size_t(256) << 20));
  double bytes = 0;
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) bytes += bw.copy();
  timer.report_contention(state);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["array_MiB"] = static_cast<double>(bw.n() * sizeof(float)) / (1 << 20);
}

inline void BM_MemoryTriad(benchmark::State& state) {
  static BandwidthProbe bw(quick_mode() ? (std::size_t(16) << 20) : (std::size_t(256) << 20));
  double bytes = 0;
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) bytes += bw.triad();
  timer.report_contention(state);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["array_MiB"] = static_cast<double>(bw.n() * sizeof(float)) / (1 << 20);
}

inline void BM_GemmF32(benchmark::State& state) {
  GemmProbe g(static_cast<int>(state.range(0)));
  double flops = 0;
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) flops += g.run();
  timer.report_contention(state);
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsRate);
}

template <class T>
void BM_Exp(benchmark::State& state) {
  double exps = 0;
  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) exps += exp_kernel<T>(200);
  timer.report_contention(state);
  state.counters["exps"] = benchmark::Counter(exps, benchmark::Counter::kIsRate);
}

inline void register_probe_benchmarks() {
  benchmark::RegisterBenchmark("probe/memory_copy", BM_MemoryCopy)->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("probe/memory_triad", BM_MemoryTriad)->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("probe/gemm_f32", BM_GemmF32)->ArgName("n")->Arg(quick_mode() ? 256 : 1024)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("probe/exp_f32", BM_Exp<float>)->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("probe/exp_f64", BM_Exp<double>)->UseRealTime()->Unit(benchmark::kMillisecond);
}

// ---- floors --------------------------------------------------------------------------------

struct Floor {
  double seconds = 0;
  char const* bound = "";  ///< which resource sets it
};

/// The larger of a bandwidth time and a compute time.
inline Floor max_floor(double bw_s, char const* bw_name, double compute_s, char const* compute_name) {
  return bw_s >= compute_s ? Floor{bw_s, bw_name} : Floor{compute_s, compute_name};
}

/// Selective scan (u, delta, z, out of (B, L, D); B and C of (B, L, N); A; D; delta_bias):
///   bytes = sizeof(T) * (B*L*(4*D + 2*N) + D*N + 2*D)
///   transcendentals = B*L*D*(N + 3): N exps of delta*A, softplus (exp + log1p) and SiLU's exp.
struct ScanCost {
  double bytes = 0, transcendentals = 0;
};
inline ScanCost scan_cost(double batch, double length, double d_inner, double d_state, double elem_bytes) {
  return {elem_bytes * (batch * length * (4 * d_inner + 2 * d_state) + d_inner * d_state + 2 * d_inner),
          batch * length * d_inner * (d_state + 3)};
}
template <class T>
Floor scan_floor(ScanCost const& c) {
  Probes const& p = probes();
  return max_floor(c.bytes / p.bandwidth, "bandwidth", c.transcendentals / p.exp_rate<T>(), "exp");
}

}  // namespace mbbench
