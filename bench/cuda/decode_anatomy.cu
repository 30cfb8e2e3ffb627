// decode_anatomy: where the time of the persistent decode step goes (diagnostic tool, not a
// benchmark of record). Built with MAMBABYTE_DECODE_PERSISTENT_STAMPS: thread 0 of every block
// writes clock64 (SM cycles) at 17 points of every layer (decode_persistent.cuh, MAMBABYTE_PSTAMP).
// Prints, for the MambaByte-353M shape at batch 1 (or --batch B), the mean duration of every
// segment over the layers 2..n-2 and all blocks (the waits for other blocks' values are inside
// the fetch / sum segments).
#define MAMBABYTE_DECODE_PERSISTENT_STAMPS 1
#include <mambabyte/cuda.hpp>
#include <mambabyte/mambabyte.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "bench_config.hpp"

namespace {

using namespace mambabyte;
namespace mcu = mambabyte::cuda;
namespace pd = mambabyte::backend::cuda::persistent_detail;

}  // namespace

int main(int argc, char** argv) {
  int batch = 1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--batch") == 0) batch = std::atoi(argv[i + 1]);
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("decode_anatomy: no CUDA device\n");
    return 0;
  }
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);

  backend::Cuda be;
  MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&be.stream, cudaStreamNonBlocking));
  ModelConfig const c = bench::mambabyte_353m();
  ModelWeights<float> hw(c);
  train::initialize_mamba(hw, 1);
  mcu::DeviceWeights<mcu::bf16> w(hw, be);
  mcu::Model<mcu::bf16> m(be);
  mcu::DeviceState st(c, batch, be);
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(batch), 65);
  for (int i = 0; i < 3; ++i) (void)m.step(w, tokens, st);
  MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be.stream));
  if (!m.persistent_decode()) {
    std::printf("decode_anatomy: the persistent step does not run at batch %d\n", batch);
    return 1;
  }
  int const L = c.n_layer, S = pd::kStampSlots;
  std::size_t const slots = static_cast<std::size_t>(L) * sms * S;
  unsigned long long* dst = nullptr;
  MAMBABYTE_CUDA_CHECK(cudaMalloc(&dst, slots * 8));
  MAMBABYTE_CUDA_CHECK(cudaMemset(dst, 0, slots * 8));
  MAMBABYTE_CUDA_CHECK(cudaMemcpyToSymbol(pd::g_decode_stamps, &dst, sizeof(dst)));
  // time a few steps (with stamps on), keep the last step's stamps
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  for (int r = 0; r < 50; ++r) {
    cudaEventRecord(a, be.stream);
    (void)m.step(w, tokens, st);
    cudaEventRecord(b, be.stream);
    MAMBABYTE_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  std::vector<unsigned long long> h(slots);
  MAMBABYTE_CUDA_CHECK(cudaMemcpy(h.data(), dst, slots * 8, cudaMemcpyDeviceToHost));
  backend::cuda::DecodeDims dd;
  dd.batch = batch;
  dd.d_model = c.d_model;
  dd.d_inner = c.d_inner();
  dd.d_state = c.d_state;
  dd.dt_rank = c.dt_rank;
  dd.d_conv = c.d_conv;
  dd.n_layer = c.n_layer;
  auto const lo = pd::make_layout(dd, 0);
  int const G = lo.G;
  // the kernel indexes stamps with its grid size G
  auto st_ = [&](int l, int g, int k) { return static_cast<double>(h[(static_cast<std::size_t>(l) * G + g) * S + k]); };
  std::printf("step (stamps on): median %.1f us over 50; grid %d blocks; %d layers\n", ms[ms.size() / 2] * 1e3, G, L);
  int const used = 17;  // slots 0..16 (decode_persistent.cuh, MAMBABYTE_PSTAMP)
  char const* names[S] = {"loop top",           "A: R fetch (+issue C)", "A: cp.async ready",   "A: bulk rows ready",
                          "A: norm",            "A: in_proj gemv",       "A: conv",             "A: x_proj -> P",
                          "A: P sums -> X",     "B: X fetch (+iss. A)",  "B: bulk rows ready",  "B: dt/state -> Y",
                          "C: Y fetch (+iss. B)", "C: cp.async ready",   "C: bulk rows ready",  "C: out_proj gemv",
                          "C: residual -> R",   "",                      "",                    ""};
  std::printf("%-24s %10s %10s %10s\n", "segment (ends at)", "mean cyc", "max cyc", "min cyc");
  double total = 0;
  for (int k = 1; k < used; ++k) {
    double sum = 0, mx = 0, mn = 1e18;
    int cnt = 0;
    for (int l = 2; l < L - 1; ++l)
      for (int g = 0; g < G; ++g) {
        double const d = st_(l, g, k) - st_(l, g, k - 1);
        sum += d;
        mx = std::max(mx, d);
        mn = std::min(mn, d);
        ++cnt;
      }
    total += sum / cnt;
    std::printf("%-24s %10.0f %10.0f %10.0f\n", names[k], sum / cnt, mx, mn);
  }
  {
    double sum = 0;
    int cnt = 0;
    for (int l = 2; l < L - 1; ++l)
      for (int g = 0; g < G; ++g) {
        sum += st_(l + 1, g, 0) - st_(l, g, used - 1);
        ++cnt;
      }
    std::printf("%-24s %10.0f\n", "(C -> next top)", sum / cnt);
    total += sum / cnt;
  }
  std::printf("%-24s %10.0f cycles per layer\n", "sum", total);
  // the copies issued inside the exchanges' fetches (thread 0's view): slot 17 from 0, 18 from 8, 19 from 11
  int const from[3] = {0, 8, 11};
  char const* what[3] = {"issue C (in R fetch)", "issue A (in X fetch)", "issue B (in Y fetch)"};
  for (int e = 0; e < 3; ++e) {
    double sum = 0, mx = 0;
    int cnt = 0;
    for (int l = 2; l < L - 1; ++l)
      for (int g = 0; g < G; ++g) {
        double const d = st_(l, g, 17 + e) - st_(l, g, from[e]);
        sum += d;
        mx = std::max(mx, d);
        ++cnt;
      }
    std::printf("%-24s %10.0f %10.0f\n", what[e], sum / cnt, mx);
  }
  // Skew: SM clocks are not comparable across blocks, but a block's wait inside an exchange is
  // (slowest writer's arrival - its own arrival) + the round trip, so the block with the
  // shortest wait in a layer is (about) the last to arrive. Per exchange segment: the spread of
  // the blocks' mean waits over the layers, and the blocks most often last (shortest wait).
  {
    // the blocks that take part in each segment's exchange: R and X fetches the channel blocks
    // (lo.nxb), the Y wait the out_proj row blocks (lo.ncb; stamp 12 without the fused Y fetch, 15
    // with it, where the wait is inside the GEMV), the column sums every block
    int const segs[5] = {1, 8, 9, 12, 15};
    for (int k : segs) {
      int const Gk = (k == 12 || k == 15) ? lo.ncb : (k == 8 ? G : lo.nxb);
      std::vector<double> mean(static_cast<std::size_t>(Gk), 0.0);
      std::vector<int> last(static_cast<std::size_t>(Gk), 0);
      int nl = 0;
      for (int l = 2; l < L - 1; ++l, ++nl) {
        int arg = 0;
        double best = 1e18;
        for (int g = 0; g < Gk; ++g) {
          double const d = st_(l, g, k) - st_(l, g, k - 1);
          mean[static_cast<std::size_t>(g)] += d;
          if (d < best) best = d, arg = g;
        }
        ++last[static_cast<std::size_t>(arg)];
      }
      if (nl == 0 || Gk == 0) continue;
      for (auto& m : mean) m /= nl;
      std::vector<int> idx(static_cast<std::size_t>(Gk));
      for (int g = 0; g < Gk; ++g) idx[static_cast<std::size_t>(g)] = g;
      std::sort(idx.begin(), idx.end(), [&](int a, int b) { return mean[static_cast<std::size_t>(a)] < mean[static_cast<std::size_t>(b)]; });
      std::printf("skew %-22s block mean wait: min %.0f (block %d) p10 %.0f median %.0f p90 %.0f max %.0f; shortest-mean blocks:",
                  names[k], mean[static_cast<std::size_t>(idx[0])], idx[0], mean[static_cast<std::size_t>(idx[static_cast<std::size_t>(Gk / 10)])],
                  mean[static_cast<std::size_t>(idx[static_cast<std::size_t>(Gk / 2)])], mean[static_cast<std::size_t>(idx[static_cast<std::size_t>(Gk * 9 / 10)])],
                  mean[static_cast<std::size_t>(idx[static_cast<std::size_t>(Gk - 1)])]);
      int const shown = std::min(6, Gk);
      for (int i = 0; i < shown; ++i) std::printf(" %d", idx[static_cast<std::size_t>(i)]);
      std::printf("; last most often:");
      std::vector<int> li(idx);
      std::sort(li.begin(), li.end(), [&](int a, int b) { return last[static_cast<std::size_t>(a)] > last[static_cast<std::size_t>(b)]; });
      for (int i = 0; i < shown; ++i) std::printf(" %d(%d)", li[static_cast<std::size_t>(i)], last[static_cast<std::size_t>(li[static_cast<std::size_t>(i)])]);
      std::printf(" of %d layers\n", nl);
    }
    // per-block compute time of the channel blocks (no exchange or weight waits): norm .. x_proj
    // partials (stamps 3 -> 7) and dt / state / y (10 -> 11), means over the layers
    std::vector<double> comp(static_cast<std::size_t>(lo.nxb), 0.0);
    for (int l = 2; l < L - 1; ++l)
      for (int g = 0; g < lo.nxb; ++g) comp[static_cast<std::size_t>(g)] += (st_(l, g, 7) - st_(l, g, 3)) + (st_(l, g, 11) - st_(l, g, 10));
    auto mm = std::minmax_element(comp.begin(), comp.end());
    if (!comp.empty() && L > 3)
    std::printf("per-block compute (norm .. x_proj partials, dt / state / y) mean over layers: min %.0f (block %d) max %.0f (block %d)\n",
                *mm.first / (L - 3), int(mm.first - comp.begin()), *mm.second / (L - 3), int(mm.second - comp.begin()));
  }
  // globaltimer granularity: smallest non-zero difference seen
  double gran = 1e18;
  for (int l = 0; l < L; ++l)
    for (int k = 1; k < used; ++k) {
      double const d = st_(l, 0, k) - st_(l, 0, k - 1);
      if (d > 0) gran = std::min(gran, d);
    }
  std::printf("smallest non-zero stamp difference: %.0f cycles\n", gran);
  cudaFree(dst);
  return 0;
}
