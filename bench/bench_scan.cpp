// bench_scan: the CPU selective scan, every policy, over a grid of shapes; plus the machine
// probes. Results and how to read them: docs/performance.md.
//
//   scan/<dtype>/<policy>/batch:B/L:L/d_inner:D/d_state:N/threads:P
//       the (batch, L, d_inner, d_state) grid of docs/performance.md, threads = all cores
//   autorule/f32/<policy>/...
//       the sweep behind scan::Auto's rule: few channel tiles, L around the threshold,
//       1 thread and all threads
//
// Counters: bytes_per_second = the scan's own input + output traffic; elem/s = batch*L*d_inner
// per second; floor_frac = floor time / measured time with floor = max(bytes / probe bandwidth,
// transcendentals / probe exp rate); label = the bound that sets the floor (and, for
// scan::Auto, the algorithm it resolved to).
#include <string>
#include <type_traits>
#include <vector>

#include "bench_util.hpp"
#include "mambabyte/backend/cpu/selective_scan.hpp"

namespace {

using namespace mambabyte;
using namespace mbbench;

/// Inputs of one shape, kept between benchmarks of the same shape (they run consecutively).
template <class T>
struct ScanData {
  int batch = -1, length = -1, d_inner = -1, d_state = -1;
  std::vector<T> u, delta, z, out, B, C, A, D, dbias;

  void ensure(int b, int l, int di, int n) {
    if (b == batch && l == length && di == d_inner && n == d_state) return;
    batch = b; length = l; d_inner = di; d_state = n;
    std::size_t const rows = static_cast<std::size_t>(b) * l;
    auto make = [](std::vector<T>& v, std::size_t count, double lo, double hi, std::uint64_t seed) {
      v.clear(); v.shrink_to_fit();  // release the previous shape first
      v.resize(count);
      fill_uniform(v.data(), count, lo, hi, seed);
    };
    make(u, rows * di, -1, 1, 1);
    make(delta, rows * di, -3, 0, 2);  // before bias and softplus
    make(z, rows * di, -2, 2, 3);
    make(out, rows * di, 0, 0, 4);
    make(B, rows * n, -1, 1, 5);
    make(C, rows * n, -1, 1, 6);
    make(D, di, 0.9, 1.1, 7);
    make(dbias, di, -4.6, -2.3, 8);
    A.resize(static_cast<std::size_t>(di) * n);
    for (std::size_t i = 0; i < A.size(); ++i) A[i] = -static_cast<T>(i % n + 1);  // -exp(log(1..N))
  }

  ssm::SelectiveScanArguments<T> args() {
    ssm::SelectiveScanArguments<T> a;
    a.batch = batch; a.length = length; a.d_inner = d_inner; a.d_state = d_state;
    a.u = u.data(); a.ld_u = d_inner;
    a.delta = delta.data(); a.ld_delta = d_inner; a.delta_bias = dbias.data(); a.delta_softplus = true;
    a.A = A.data();
    a.B = B.data(); a.ld_B = d_state;
    a.C = C.data(); a.ld_C = d_state;
    a.D = D.data();
    a.z = z.data(); a.ld_z = d_inner;
    a.out = out.data(); a.ld_out = d_inner;
    return a;
  }
};

template <class T>
ScanData<T>& scan_data() {
  static ScanData<T> d;
  return d;
}

template <class P> constexpr bool is_auto_v = std::is_same_v<P, scan::Auto>;

template <class T, class Policy>
void BM_Scan(benchmark::State& state) {
  int const batch = static_cast<int>(state.range(0)), L = static_cast<int>(state.range(1));
  int const D = static_cast<int>(state.range(2)), N = static_cast<int>(state.range(3));
  int const threads = static_cast<int>(state.range(4));
  ScanData<T>& data = scan_data<T>();
  data.ensure(batch, L, D, N);
  auto const a = data.args();
  backend::Cpu const be{threads};
  using Scan = ssm::SelectiveScan<backend::Cpu, T, Policy>;
  std::vector<std::byte> ws(Scan::workspace_bytes(a, be));  // zeroed: its pages are touched
  ScanCost const cost = scan_cost(batch, L, D, N, sizeof(T));
  if (cost.transcendentals < 1e8) Scan::run(a, ws.data(), be);  // warm (cheap shapes only)

  wait_for_quiet();
  LoopTimer timer;
  for (auto _ : state) {
    Scan::run(a, ws.data(), be);
    benchmark::ClobberMemory();
  }
  double const t = timer.per_iter(state);
  timer.report_contention(state);

  double const it = static_cast<double>(state.iterations());
  Floor const f = scan_floor<T>(cost);
  state.SetBytesProcessed(static_cast<std::int64_t>(it * cost.bytes));
  state.counters["elem/s"] = benchmark::Counter(it * batch * L * D, benchmark::Counter::kIsRate);
  state.counters["floor_frac"] = f.seconds / t;
  std::string label = std::string("floor:") + f.bound;
  if constexpr (is_auto_v<Policy>) {
    auto const algo = Scan::choose(a, be);
    label += algo == ssm::CpuScanAlgo::kChunked ? " auto:chunked256"
             : algo == ssm::CpuScanAlgo::kAssociative ? " auto:associative" : " auto:sequential";
  }
  state.SetLabel(label);
}

template <class T> char const* dtype_name() { return sizeof(T) == 4 ? "f32" : "f64"; }

struct PolicyEntry {
  char const* name;
  void (*f32)(benchmark::State&);
  void (*f64)(benchmark::State&);
};

template <class P>
PolicyEntry entry(char const* name) {
  return {name, &BM_Scan<float, P>, &BM_Scan<double, P>};
}

std::vector<PolicyEntry> const& policies() {
  static std::vector<PolicyEntry> const p = {
      entry<scan::Sequential>("sequential"), entry<scan::Chunked<64>>("chunked64"),
      entry<scan::Chunked<256>>("chunked256"), entry<scan::Associative>("associative"),
      entry<scan::Auto>("auto")};
  return p;
}

void add(std::string const& prefix, PolicyEntry const& p, bool f64, std::vector<std::int64_t> args,
         double min_time) {
  auto* b = benchmark::RegisterBenchmark((prefix + "/" + (f64 ? "f64/" : "f32/") + p.name).c_str(),
                                         f64 ? p.f64 : p.f32);
  b->ArgNames({"batch", "L", "d_inner", "d_state", "threads"})->Args(args)->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  if (!quick_mode()) b->MinTime(min_time);  // bench_smoke: the command line's min time
}

void register_scan_benchmarks() {
  int const P = max_threads();
  // The main grid, fp32. Shapes outermost so that the policies of one shape run together
  // (and share its inputs).
  for (int batch : {1, 4})
    for (int L : {1, 64, 1024, 8192})
      for (int D : {64, 2048})
        for (auto const& p : policies()) add("scan", p, false, {batch, L, D, 16, P}, 0.5);
  // fp64, one shape.
  for (auto const& p : policies()) add("scan", p, true, {1, 1024, 2048, 16, P}, 0.5);
  // The Auto rule: 1..4 channel tiles of 16 (d_inner 16..64) at batch 1, L around 512.
  for (int D : {16, 32, 48, 64})
    for (int L : {128, 256, 512, 1024, 2048, 8192})
      for (int threads : {1, P}) {
        for (auto const& p : policies()) {
          if (threads == 1 && std::string(p.name) == "associative") continue;
          add("autorule", p, false, {1, L, D, 16, threads}, 0.1);
        }
        if (P == 1) break;
      }
}

}  // namespace

int main(int argc, char** argv) {
  mbbench::init(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  mbbench::register_probe_benchmarks();
  register_scan_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
