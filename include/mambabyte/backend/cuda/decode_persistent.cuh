/*! \file
 *  \brief The persistent decode step: one kernel runs a whole single-token step of a bf16 Mamba
 *         LM (every layer and the head), its blocks resident on all SMs. The blocks exchange
 *         activations through flagged words in global memory: no grid barrier. It replaces
 *         decode.cuh's chain of 3 kernels per layer where it applies (bf16, batch <= 4) and the
 *         layer-by-layer step at batch 5-8 (one kernel for those batches, the batch a runtime value).
 *
 *  Work split (G blocks, one per SM; block g):
 *   - channels c0 = g * cpb .. c0 + cpb (cpb = ceil(d_inner / G) rounded up to 8) for the phases
 *     A and B, whose data never leaves the block except through the exchanges below;
 *   - out_proj rows m0 = g * rpb .. (rpb = ceil(d_model / G) rounded up to 8) for phase C;
 *   - the (batch row, x_proj column) pairs g, g + G, ... of the x_proj reduction;
 *   - head rows g * hpb .. for the final phase.
 *  Per layer l:
 *   A  the residual rows of every batch row (exchange R of layer l-1), norm (each block recomputes
 *      it: d_model wide), in_proj rows of its channels (x and z) on the tensor cores, the causal
 *      conv step + SiLU -> u, z kept in shared memory, the x_proj partial sums over its channels
 *      (exchange P); then the block sums its x_proj columns over the channel blocks (exchange X).
 *   B  xdbl = round_S(X), then per channel dt_proj, softplus, the state update, D skip and
 *      SiLU(z) gate -> y (exchange Y).
 *   C  y of all channels (exchange Y), out_proj rows of the block, residual r[b][m] +=
 *      round_S(. + bias) (the block keeps its rows in shared memory) -> exchange R. In the
 *      warp-specialised kernel each warp fetches only the y columns of its own k steps of the
 *      out_proj GEMV and multiplies them (gemv_mma_y): no block-wide fetch and barrier first.
 *  Head: norm_f(r) times the block's rows of lm_head -> fp32 logits.
 *
 *  Exchanges (P, X, Y, R; NCCL's "LL" idea): every value travels in a 64-bit word whose high
 *  half is a flag, epoch * 1024 + 4 l + e + 1, written by one relaxed 64-bit store; readers poll
 *  the words with relaxed 64-bit loads until the flag matches (a thread's words of a fetch all
 *  polled together: ll_wait_all). A value is thus read one L2 round trip after it was written,
 *  with no fence, counter or barrier round trips in between. Buffers
 *  are double-buffered by layer parity: a writer can be at most one layer ahead of a reader of
 *  the same buffer (each exchange needs the previous one's values from every block that takes
 *  part in it). The epoch (one per launch) lives in device memory: every block reads it at the
 *  start; the last block to finish increments it. The words of a step are all rewritten every
 *  step, so an old word never carries a current flag. A poll that waits longer than
 *  kPollTimeoutNs traps (a block that is not resident must not hang the GPU).
 *
 *  Weight streaming: each block copies the slices of the next layer's weights, its per-channel
 *  fp32 parameters and its slice of the recurrent state into shared memory as soon as the current
 *  layer's phase has consumed the previous copy, i.e. a phase ahead: at batch 1 the in_proj /
 *  out_proj rows, norm weights, dt_proj rows, A_log and the state by bulk copies (cp.async.bulk,
 *  the copy engine; completion counted in bytes on a "full" mbarrier per phase), the small pieces
 *  by 16-byte cp.async. Two variants:
 *   - warp specialised (sm_90a, blocks of 640 threads): 16 consumer warps compute, a producer
 *     warpgroup issues every copy of a phase of layer l as soon as the consumers' "empty"
 *     mbarrier of that phase says they are done with layer l - 1 (its cp.async land on the full
 *     mbarrier too: cp.async.mbarrier.arrive). A copy instruction waits while the copy engine is
 *     busy (the issue time follows the bytes); here that holds no computing warp. setmaxnreg
 *     moves registers from the producers (64) to the consumers (104).
 *   - otherwise (512 threads) the computing threads issue the copies themselves while they wait
 *     for an exchange (between its loads and the wait for their flags): three cp.async commit
 *     groups per layer (A, B, C), cp.async.wait_group 2 at the start of each phase.
 *  The host launches the block size the loaded binary was compiled for (its launch bound). The
 *  layers' parameter pointers are copied into shared memory once (parameter-space loads with a
 *  runtime layer index are slow).
 *
 *  Numerics: the rounding points of decode.cuh and the layer-by-layer path are kept (normed
 *  input, xz, u, xdbl, y and the out_proj output rounded to bf16; fp32 state, residual and
 *  accumulators); fp32 summation orders differ, and the conv's SiLU, delta's softplus and the
 *  norm's 1 / sqrt take the one-special-function forms of prefill and the forward scans (a few
 *  ulp from decode.cuh's). Every sum has a fixed order: results are bitwise reproducible run to
 *  run.
 *
 *  The grid is launched with the cooperative attribute (co-residency guaranteed or the launch
 *  fails); without it (graph capture that refuses it) the grid of at most one block per SM is
 *  co-resident on an otherwise idle GPU.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/decode.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/core/error.hpp"

namespace mambabyte::backend::cuda {

namespace persistent_detail {

inline constexpr int kThreads = 512;                 ///< the threads that compute (16 warps)
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kProducerThreads = 128;        ///< the copy warpgroup of the warp-specialised kernel
inline constexpr int kWsThreads = kThreads + kProducerThreads;
/// Registers per thread of the warp-specialised kernel's two roles (setmaxnreg): the block starts
/// with kWsLaunchRegs (65536 / 640 rounded down to 8); the producers give back what the consumers
/// take (128 * (96 - 64) = 512 * (104 - 96)). ptxas (CUDA 13.0, sm_90a) reports a small spill in
/// the batch-1 kernel (16-56 bytes depending on the build; compiled with the producers at 96, no
/// setmaxnreg.dec, it does not spill, so it is the producers') and, since out_proj fetches its own
/// y (both phase C paths compiled), 12-16 bytes stored / 28-48 loaded at batch 2-4, mostly outside
/// the layer loop (at 32 / 112 the producers spilled 168 bytes).
inline constexpr int kWsLaunchRegs = 65536 / kWsThreads / 8 * 8;
inline constexpr int kWsConsumerRegs = 104;
inline constexpr int kWsProducerRegs = 64;
static_assert(kProducerThreads * (kWsLaunchRegs - kWsProducerRegs) == kThreads * (kWsConsumerRegs - kWsLaunchRegs),
              "setmaxnreg: the consumers take exactly what the producers give back");
inline constexpr int kMaxBatch = 8;       ///< batch rows of the persistent step (exchange traffic grows with it)
/// Batches up to kExactBatch compile a kernel each (every loop over batch rows a compile-time
/// trip count); kExactBatch + 1 .. kMaxBatch share the kernel for kMaxBatch with the batch a
/// runtime value (lo.B).
inline constexpr int kExactBatch = 4;
inline constexpr int kMaxLayers = 128;    ///< layers whose parameter pointers fit in the kernel parameters
inline constexpr int kNormVec = 8;        ///< float4 per thread of a norm row
inline constexpr unsigned kFlagsPerEpoch = 1024;  ///< > 4 * kMaxLayers: the flags of one launch are distinct
inline constexpr int kReduceGroup = 128;          ///< threads that sum one x_proj column (exchange X)
inline constexpr unsigned long long kPollTimeoutNs = 60ull * 1000 * 1000 * 1000;  // sanitizers are slow

using bf16_t = __nv_bfloat16;

/// Per-layer pointers (as DecodeLayer<bf16>), in the kernel's parameter space.
struct LayerPtrs {
  float const* norm_w;
  float const* norm_b;
  bf16_t const* in_w;
  float const* in_b;
  float const* conv_w;
  float const* conv_b;
  bf16_t const* x_w;
  bf16_t const* dt_w;
  float const* dt_b;
  float const* A_log;
  float const* D;
  bf16_t const* out_w;
  float const* out_b;
  float* conv_state;
  float* ssm_state;
};

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr int ceil_div(int x, int m) { return (x + m - 1) / m; }

/// Work split and shared-memory layout (byte offsets), computed identically on both sides.
struct Layout {
  int nl = 0;  ///< layers (their LayerPtrs are copied into shared memory)
  int G = 0, B = 0, dm = 0, di = 0, N = 0, R = 0, X = 0, dc = 0, classes = 0;
  int cpb = 0, nxb = 0;  ///< channels per block (multiple of 8), blocks owning channels
  int rpb = 0, ncb = 0;  ///< out_proj rows per block (multiple of 8), blocks owning rows
  int hpb = 0, nhb = 0;  ///< head rows per block, blocks owning head rows
  int sA = 0, sC = 0;    ///< smem row strides (bytes) of d_model- and d_inner-wide bf16 rows
  float inv_dm = 0.f;    ///< 1 / d_model (the norm's mean: a division off the device's chain)
  int ksA = 1, ksC = 1, ksH = 1;  ///< k splits of the three GEMVs
  int redA = 0, redC = 0, redH = 0;
  std::size_t oWA = 0, oWX = 0, oNW = 0, oNB = 0, oCW = 0, oCB = 0, oIB = 0, oCS = 0;  // group A
  std::size_t oWD = 0, oDB = 0, oAL = 0, oDD = 0, oSS = 0;                            // group B
  std::size_t oWC = 0, oOB = 0;                                                        // group C
  std::size_t oWH = 0, oFW = 0, oFB = 0;                                               // head
  std::size_t oXN = 0, oY = 0, oRed = 0, oOut = 0, oU = 0, oZ = 0, oXD = 0, oStat = 0;
  std::size_t oRO = 0;   ///< the block's out_proj rows of the residual (B x rpb fp32), kept across layers
  std::size_t oRS = 0;   ///< the whole residual (B x dm fp32), from exchange R (= oY above kExactBatch)
  std::size_t oMB = 0;  ///< six mbarriers: phases A, C, B landed; (warp-specialised) A, C, B consumed
  std::size_t oLP = 0;  ///< the LayerPtrs of every layer (parameter-space loads with a runtime index are slow)
  std::size_t bytes = 0;
  /// Exchange words (64-bit: value | flag << 32) in global memory, 2 parities each: P (B x nxb x
  /// X fp32 partials), X (B x X fp32 sums), Y (B x di / 2 bf16 pairs), R (B x dm fp32).
  std::size_t wP = 0, wX = 0, wY = 0, wR = 0, words = 0;

  __host__ __device__ static int row_stride(int K) { return round_up(2 * K, 128) + 64; }  // 64 mod 128

  __host__ __device__ static int ksplit(int rows_pad, int K) {
    int const groups = rows_pad / 16;
    int ks = kWarps / groups;
    ks = ks < 1 ? 1 : ks;
    return ks > K / 32 ? K / 32 : ks;
  }

  __host__ __device__ Layout(int G_, int B_, int dm_, int di_, int N_, int R_, int dc_, int classes_, int nl_ = 0)
      : nl(nl_), G(G_), B(B_), dm(dm_), di(di_), N(N_), R(R_), X(R_ + 2 * N_), dc(dc_), classes(classes_) {
    cpb = round_up(ceil_div(di, G), 8);
    nxb = ceil_div(di, cpb);
    rpb = round_up(ceil_div(dm, G), 8);
    ncb = ceil_div(dm, rpb);
    hpb = round_up(ceil_div(classes, G), 8);
    nhb = ceil_div(classes, hpb);
    sA = row_stride(dm);
    sC = row_stride(di);
    inv_dm = 1.f / static_cast<float>(dm);
    ksA = ksplit(round_up(2 * cpb, 16), dm);
    ksC = ksplit(round_up(rpb, 16), di);
    ksH = ksplit(round_up(hpb, 16), dm);
    redA = ksA * round_up(2 * cpb, 16) * 8;
    redC = ksC * round_up(rpb, 16) * 8;
    redH = ksH * round_up(hpb, 16) * 8;
    std::size_t o = 0;
    auto take = [&o](std::size_t bytes_) {
      std::size_t const at = o;
      o += (bytes_ + 127) / 128 * 128;
      return at;
    };
    oWA = take(static_cast<std::size_t>(2 * cpb) * sA);
    oWX = take(static_cast<std::size_t>(X) * cpb * 2);
    oNW = take(static_cast<std::size_t>(dm) * 4);
    oNB = take(static_cast<std::size_t>(dm) * 4);
    oCW = take(static_cast<std::size_t>(cpb) * dc * 4);
    oCB = take(static_cast<std::size_t>(cpb) * 4);
    oIB = take(static_cast<std::size_t>(2 * cpb) * 4);
    oCS = take(static_cast<std::size_t>(B) * (dc - 1 > 0 ? dc - 1 : 1) * cpb * 4);
    oWD = take(static_cast<std::size_t>(cpb) * R * 2);
    oDB = take(static_cast<std::size_t>(cpb) * 4);
    oAL = take(static_cast<std::size_t>(cpb) * N * 4);
    oDD = take(static_cast<std::size_t>(cpb) * 4);
    oSS = take(static_cast<std::size_t>(B) * cpb * N * 4);
    oWC = take(static_cast<std::size_t>(rpb) * sC);
    oOB = take(static_cast<std::size_t>(rpb) * 4);
    oWH = take(static_cast<std::size_t>(hpb) * sA);
    oFW = take(static_cast<std::size_t>(dm) * 4);
    oFB = take(static_cast<std::size_t>(dm) * 4);
    oXN = take(static_cast<std::size_t>(B) * sA);
    // above kExactBatch, the y rows share their bytes with the residual rows RS (below): RS is
    // live from the R fetch to the end of the norm, Y from the SSM step to the end of out_proj,
    // with block barriers in between (batch 8 at the 353M shape: 248 KB -> 216 KB, under the
    // H200's 227 KB per block)
    bool const y_shares_rs = B > kExactBatch;
    if (!y_shares_rs) oY = take(static_cast<std::size_t>(B) * sC);
    int const red = redA > redC ? (redA > redH ? redA : redH) : (redC > redH ? redC : redH);
    oRed = take(static_cast<std::size_t>(red) * 4);
    int const outr = round_up(2 * cpb, 16) > round_up(rpb, 16) ? round_up(2 * cpb, 16) : round_up(rpb, 16);
    oOut = take(static_cast<std::size_t>(outr > round_up(hpb, 16) ? outr : round_up(hpb, 16)) * 8 * 4);
    oU = take(static_cast<std::size_t>(B) * cpb * 4);
    oZ = take(static_cast<std::size_t>(B) * cpb * 4);
    oXD = take(static_cast<std::size_t>(B) * X * 4);
    oStat = take(2 * kWarps * 4);
    oRO = take(static_cast<std::size_t>(B) * rpb * 4);
    oLP = take(static_cast<std::size_t>(nl) * sizeof(LayerPtrs));
    oMB = take(48);
    std::size_t const rs_bytes = static_cast<std::size_t>(B) * dm * 4, y_bytes = static_cast<std::size_t>(B) * sC;
    oRS = take(y_shares_rs && y_bytes > rs_bytes ? y_bytes : rs_bytes);
    if (y_shares_rs) oY = oRS;
    bytes = o;
    wP = 0;
    wX = wP + static_cast<std::size_t>(2) * B * nxb * X;
    wY = wX + static_cast<std::size_t>(2) * B * X;
    wR = wY + static_cast<std::size_t>(2) * B * (di / 2);
    words = wR + static_cast<std::size_t>(2) * B * dm;
  }
};

struct Params {
  int n_layer = 0;
  float eps = 1e-5f;
  bool rms = false;
  std::int32_t const* tokens = nullptr;  ///< (B)
  float const* table = nullptr;          ///< (vocab, d_model) fp32
  float const* norm_f_w = nullptr;
  float const* norm_f_b = nullptr;
  bf16_t const* head = nullptr;          ///< (>= classes, d_model)
  float* resid = nullptr;                ///< (B, d_model): the last layer's residual
  float* logits = nullptr;               ///< (B, classes)
  unsigned long long* words = nullptr;   ///< Layout::words exchange words (zeroed when allocated)
  unsigned* sync = nullptr;              ///< [0] epoch, [1] blocks finished (zeroed when allocated)
  LayerPtrs layers[kMaxLayers];
};

// ---- device helpers ----------------------------------------------------------------------------

/// Threads that issue the 16-byte weight copies in the kernel without a copy warpgroup: all but
/// warp 0 (which issues the bulk copies of the in_proj / out_proj rows at batch 1).
inline constexpr int kCopyThreads = kThreads - 32;

/// rows x row_bytes (multiples of 16, and row_bytes >= 16: the loop divides by row_bytes / 16; every
/// caller's rows hold >= 8 elements of >= 2 bytes) from global (row stride gstride bytes) into
/// shared memory (row stride sstride) with cp.async (16 bytes per copy, L2 only): copy i by the thread of the
/// copy team with first == i mod stride (first < 0: the thread copies nothing); completed by the
/// commit group the caller closes or by cp_async_arrive.
__device__ __forceinline__ void stage_rows(unsigned char* dst, int sstride, void const* src, std::size_t gstride,
                                           int rows, int row_bytes, int first, int stride) {
  if (first < 0) return;
  int const per = row_bytes / 16;
  auto const* s8 = static_cast<unsigned char const*>(src);
  // copy i = r per + c; i += stride advances (r, c) by (dr, dc) with one carry: no division in the
  // loop, and the loop not unrolled (the producer's code: batch 4 662-666 -> 594-599 us with
  // `unroll 1` alone, run 83; 16.4k -> 12.6k instructions in the batch-4 kernel)
  int const dr = stride / per, dc = stride - dr * per;
  int r = first / per, c = first - r * per;
#pragma unroll 1
  while (r < rows) {
    decode_detail::cp_async16(dst + static_cast<std::size_t>(r) * sstride + 16 * c,
                              s8 + static_cast<std::size_t>(r) * gstride + 16 * c);
    r += dr;
    c += dc;
    if (c >= per) {
      c -= per;
      ++r;
    }
  }
}
__device__ __forceinline__ void stage(unsigned char* dst, void const* src, int bytes, int first, int stride) {
  stage_rows(dst, bytes, src, static_cast<std::size_t>(bytes), 1, bytes, first, stride);
}
/// Block barrier of the computing threads (named barrier 1, kThreads threads): the whole block
/// in the kernel without a copy warpgroup, the consumer warps in the warp-specialised one.
__device__ __forceinline__ void csync() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }
/// Waits for all but the two most recent cp.async groups of this thread. Defining
/// MAMBABYTE_DECODE_PERSISTENT_WAIT_ALL (a diagnostic build, e.g. for compute-sanitizer's
/// racecheck) waits for all of them instead: the same results, less copy/compute overlap (the
/// kernel without a copy warpgroup only: the warp-specialised one waits on mbarriers).
__device__ __forceinline__ void cp_async_wait_2() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#if defined(MAMBABYTE_DECODE_PERSISTENT_WAIT_ALL)
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#else
  asm volatile("cp.async.wait_group 2;\n" ::: "memory");
#endif
#endif
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

#if defined(MAMBABYTE_DECODE_PERSISTENT_STAMPS)
/// Diagnostic builds only (bench/cuda/decode_anatomy.cu): thread 0 of every block writes
/// the SM clock (clock64, cycles) at kStampSlots points of every layer to stamps[(l * G + g) *
/// kStampSlots + k].
inline constexpr int kStampSlots = 20;
__device__ unsigned long long* g_decode_stamps = nullptr;
#define MAMBABYTE_PSTAMP(l, k)                                                                        \
  do {                                                                                              \
    if (threadIdx.x == 0 && g_decode_stamps)                                                        \
      g_decode_stamps[((static_cast<std::size_t>(l) * gridDim.x + blockIdx.x) * kStampSlots) + (k)] = \
          clock64();                                                                                \
  } while (0)
#else
#define MAMBABYTE_PSTAMP(l, k) \
  do {                         \
  } while (0)
#endif

/// Exchange words: value | flag << 32, written by one relaxed 64-bit store (single-copy atomic),
/// read by relaxed 64-bit loads (coherent at GPU scope: served by L2, never a stale L1 line).
__device__ __forceinline__ void ll_store(unsigned long long* a, unsigned value, unsigned flag) {
  unsigned long long const w = static_cast<unsigned long long>(value) | (static_cast<unsigned long long>(flag) << 32);
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(a), "l"(w) : "memory");
}
__device__ __forceinline__ unsigned long long ll_load(unsigned long long const* a) {
  unsigned long long w;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(a) : "memory");
  return w;
}
/// Polls word a until its flag is `flag` (the slow path of ll_wait, out of line: small code).
__device__ __noinline__ unsigned ll_poll(unsigned long long const* a, unsigned flag) {
  unsigned long long const t0 = globaltimer();
  for (unsigned spin = 1;; ++spin) {
    unsigned long long const w = ll_load(a);
    if (static_cast<unsigned>(w >> 32) == flag) return static_cast<unsigned>(w);
    if ((spin & 255u) == 0 && globaltimer() - t0 > kPollTimeoutNs) __trap();  // a block is not resident
  }
}
/// The value of word a (loaded as w) once its flag is `flag`.
__device__ __forceinline__ unsigned ll_wait(unsigned long long const* a, unsigned long long w, unsigned flag) {
  return static_cast<unsigned>(w >> 32) == flag ? static_cast<unsigned>(w) : ll_poll(a, flag);
}
/// Waits until the words w[u < n] carry `flag`; load(u) loads word u again. Every round loads the
/// words that are not yet current together: one round trip per round, where waiting for the
/// words one after another costs a round trip per word that was not there at the first load.
template <int kN, class Load>
__device__ __forceinline__ void ll_wait_all(unsigned long long (&w)[kN], int n, unsigned flag, Load&& load) {
  unsigned long long t0 = 0;
  for (unsigned spin = 0;; ++spin) {
    bool all = true;
#pragma unroll
    for (int u = 0; u < kN; ++u) all = all && (u >= n || static_cast<unsigned>(w[u] >> 32) == flag);
    if (all) return;
    if (spin == 0) t0 = globaltimer();
    else if ((spin & 255u) == 0 && globaltimer() - t0 > kPollTimeoutNs) __trap();  // a block is not resident
#pragma unroll
    for (int u = 0; u < kN; ++u)
      if (u < n && static_cast<unsigned>(w[u] >> 32) != flag) w[u] = load(u);
  }
}

/// sink(i, value) for the words src[0 .. n) once their flags are `flag`; the threads take kLL words
/// each per round, all loads of a round in flight together; between() runs once, after the first
/// round's loads are issued and before their values are waited for (work that hides the round
/// trip). All computing threads (tid < kThreads) must call it (uniform).
template <int kLL, class Between, class Sink>
__device__ __forceinline__ void ll_fetch(unsigned long long const* src, int n, unsigned flag, Between&& between,
                                         Sink&& sink) {
  int const tid = static_cast<int>(threadIdx.x);
  bool first = true;
  for (int i0 = 0; i0 < n; i0 += kThreads * kLL) {
    unsigned long long w[kLL];
#pragma unroll
    for (int u = 0; u < kLL; ++u) {
      int const i = i0 + u * kThreads + tid;
      w[u] = i < n ? ll_load(src + i) : 0ull;
    }
    if (first) between();
    first = false;
    // the thread's words of the round: u < nu (i = i0 + u kThreads + tid < n)
    int const nu = n - i0 - tid <= 0 ? 0 : min(kLL, (n - i0 - tid + kThreads - 1) / kThreads);
    ll_wait_all(w, nu, flag, [&](int u) { return ll_load(src + i0 + u * kThreads + tid); });
#pragma unroll
    for (int u = 0; u < kLL; ++u)
      if (u < nu) sink(i0 + u * kThreads + tid, static_cast<unsigned>(w[u]));
  }
}

/// k step s (32 columns) of a GEMV task: two m16n8k16 products into acc (rows ra / rb of W at pa /
/// pb, batch row g of X at px; invalid ones read as zeros).
__device__ __forceinline__ void gemv_step(float (&acc)[4], unsigned char const* pa, unsigned char const* pb,
                                          unsigned char const* px, int s, bool va, bool vb, bool vx) {
  uint4 const zero = make_uint4(0u, 0u, 0u, 0u);
  uint4 const a = va ? *reinterpret_cast<uint4 const*>(pa + 64 * s) : zero;
  uint4 const b = vb ? *reinterpret_cast<uint4 const*>(pb + 64 * s) : zero;
  uint4 const x = vx ? *reinterpret_cast<uint4 const*>(px + 64 * s) : zero;
  decode_detail::mma_bf16(acc, a.x, b.x, a.y, b.y, x.x, x.y);
  decode_detail::mma_bf16(acc, a.z, b.z, a.w, b.w, x.z, x.w);
}
/// A task's accumulators (k slice ks, rows ra and ra + 8, columns 2t, 2t + 1) into red.
__device__ __forceinline__ void gemv_partial(float* red, int ks, int rows_pad, int ra, int t, float const (&acc)[4]) {
  float* r0 = red + (static_cast<std::size_t>(ks) * rows_pad + ra) * 8 + 2 * t;
  r0[0] = acc[0];
  r0[1] = acc[1];
  r0[64] = acc[2];
  r0[65] = acc[3];
}
/// After a barrier, out = the first `slices` k slices of red summed in slice order; a barrier ends it.
__device__ __forceinline__ void gemv_reduce(float const* red, float* out, int rows_pad, int slices) {
  int const tid = static_cast<int>(threadIdx.x);
  csync();
  for (int i = tid; i < rows_pad * 8; i += kThreads) {
    float s = 0.f;
    for (int q = 0; q < slices; ++q) s += red[static_cast<std::size_t>(q) * rows_pad * 8 + i];
    out[i] = s;
  }
  csync();
}

/// out[row * 8 + n] = sum_k W[row, k] X[n, k] for row < rows_pad (a multiple of 16), n < 8: rows
/// >= rows_st of W and n >= nx of X read as zeros. W, X: bf16 rows in shared memory (strides ws, xs
/// bytes, = 64 mod 128: conflict-free 16-byte loads). A warp task is a 16-row group and the k
/// steps ks, ks + ks_n, ...; the slices of a row are summed in slice order (deterministic). Ends
/// with a barrier of the computing threads (csync); all of them must call it.
__device__ __forceinline__ void gemv_mma(unsigned char const* W, int ws, int rows_st, int rows_pad,
                                         unsigned char const* X, int xs, int nx, int K, int ks_n, float* red,
                                         float* out) {
  int const tid = static_cast<int>(threadIdx.x);
  int const warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  int const groups = rows_pad / 16;
  int const steps = K / 32;
  for (int task = warp; task < groups * ks_n; task += kWarps) {
    // (the division by the runtime group count skipped for the common 1 and 2 groups: it sits at
    // the head of every GEMV's dependent chain)
    int const grp = groups == 1 ? 0 : (groups == 2 ? (task & 1) : task % groups);
    int const ks = groups == 1 ? task : (groups == 2 ? (task >> 1) : task / groups);
    int const ra = grp * 16 + g, rb = ra + 8;
    bool const va = ra < rows_st, vb = rb < rows_st, vx = g < nx;
    unsigned char const* pa = W + static_cast<std::size_t>(va ? ra : 0) * ws + 16 * t;
    unsigned char const* pb = W + static_cast<std::size_t>(vb ? rb : 0) * ws + 16 * t;
    unsigned char const* px = X + static_cast<std::size_t>(vx ? g : 0) * xs + 16 * t;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int s = ks; s < steps; s += ks_n) gemv_step(acc, pa, pb, px, s, va, vb, vx);
    gemv_partial(red, ks, rows_pad, ra, t, acc);
  }
  gemv_reduce(red, out, rows_pad, ks_n);
}

/// Steps per warp and batch rows for which out_proj fetches its own y (gemv_mma_y).
inline constexpr int kYSteps = 4;
inline constexpr int kYMaxBatch = 4;
/// Whether gemv_mma_y applies to out_proj: one 16-row group with one k slice per warp (ks_n =
/// kWarps: at least kWarps steps of 32 columns), at most kYSteps steps per warp. (gemv_mma_y would
/// also match gemv_mma with fewer steps, but admitting them made ptxas spill 104-136 bytes in
/// the batch 2-4 kernels, and batch 4 slower by 8%: measured, run 74.)
__host__ __device__ inline bool y_fused_fits(int rows_pad, int ks_n, int K) {
  return rows_pad == 16 && ks_n == kWarps && K % 32 == 0 && K / 32 <= kYSteps * kWarps;
}

/// gemv_mma for out_proj with y taken straight from exchange Y (src: the layer's words, h2 = di / 2
/// words per batch row, `flag` the layer's): each warp loads the words of its own k steps (16
/// bf16 pairs of each batch row per step; all of the warp's words in flight together), waits for
/// them, stages them in its own columns of X and multiplies. No block-wide fetch and barrier
/// between the exchange and the GEMV: a warp waits only for the blocks whose channels its steps
/// cover (the block still ends at the barrier after every warp's words have arrived). Same
/// arithmetic and order as gemv_mma with its k split min(kWarps, K / 32) (bitwise the same out).
/// Preconditions: y_fused_fits(16, kWarps, K), kB <= kYMaxBatch. Ends with a barrier of the
/// computing threads; all of them must call it.
template <int kB>
__device__ __forceinline__ void gemv_mma_y(unsigned char const* W, int ws, int rows_st, unsigned char* X, int xs,
                                           int K, float* red, float* out, unsigned long long const* src, int h2,
                                           unsigned flag) {
  static_assert(kB >= 1 && kB <= kYMaxBatch, "batch rows per warp step: 16 kB words");
  constexpr int rows_pad = 16, ks_n = kWarps;
  constexpr int kPer = kYSteps * kB * 16 / 32;  // words per lane (at most)
  int const tid = static_cast<int>(threadIdx.x);
  int const warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  int const steps = K / 32, ks = warp;
  int const nj = ks < steps ? (steps - ks + ks_n - 1) / ks_n : 0;
  // word q of the warp: step j = q / (16 kB), batch row b, pair k of that step's 16
  auto word = [&](int q, int& j, int& b, int& k) {
    j = q / (16 * kB);
    int const rem = q - j * 16 * kB;
    b = rem >> 4;
    k = rem & 15;
  };
  unsigned long long w[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    int j, b, k;
    word(u * 32 + lane, j, b, k);
    w[u] = j < nj ? ll_load(src + static_cast<std::size_t>(b) * h2 + 16 * (ks + j * ks_n) + k) : 0ull;
  }
  // every word of the warp waited for and staged before the multiplies (waiting step by step
  // between the multiplies spilled their accumulators around the poll); the lane's words are
  // u < nu (q = 32 u + lane < 16 kB nj), polled together (ll_wait_all)
  int const nq = 16 * kB * nj, nu = nq - lane <= 0 ? 0 : (nq - lane + 31) / 32;
  ll_wait_all(w, nu, flag, [&](int u) {
    int j, b, k;
    word(u * 32 + lane, j, b, k);
    return ll_load(src + static_cast<std::size_t>(b) * h2 + 16 * (ks + j * ks_n) + k);
  });
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    int j, b, k;
    word(u * 32 + lane, j, b, k);
    if (u < nu) {
      int const c = 16 * (ks + j * ks_n) + k;  // the word's pair within its row
      *reinterpret_cast<unsigned*>(X + static_cast<std::size_t>(b) * xs + 4 * c) = static_cast<unsigned>(w[u]);
    }
  }
  __syncwarp();
  int const ra = g, rb = g + 8;
  bool const va = ra < rows_st, vb = rb < rows_st, vx = g < kB;
  unsigned char const* pa = W + static_cast<std::size_t>(va ? ra : 0) * ws + 16 * t;
  unsigned char const* pb = W + static_cast<std::size_t>(vb ? rb : 0) * ws + 16 * t;
  unsigned char const* px = X + static_cast<std::size_t>(vx ? g : 0) * xs + 16 * t;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < kYSteps; ++j)
    if (j < nj) gemv_step(acc, pa, pb, px, ks + j * ks_n, va, vb, vx);  // warp-uniform
  if (ks < steps) gemv_partial(red, ks, rows_pad, ra, t, acc);
  gemv_reduce(red, out, rows_pad, steps < ks_n ? steps : ks_n);  // the slices written
}

/// norm(src rows b < B) -> XN (bf16 rows, stride sA); src = table[tokens[b]] or the residual rows
/// in shared memory (RS, from exchange R). Threads split into row teams of kThreads / Bp (Bp: B
/// rounded up to a power of two); a thread holds <= kNormVec float4 of its row. Block barriers
/// inside; all computing threads must call it.
template <int kB, int V>
__device__ __forceinline__ void norm_rows_v(Params const& p, Layout const& lo, bool from_table, float const* w,
                                            float const* bsm, bool has_b, unsigned char* smem) {
  int const tid = static_cast<int>(threadIdx.x);
  int const B = kB <= kExactBatch ? kB : lo.B;  // above kExactBatch: the runtime batch, <= kB
  int const dm = lo.dm;
  int constexpr Bp = kB <= 1 ? 1 : (kB <= 2 ? 2 : (kB <= 4 ? 4 : 8));
  int constexpr tpr = kThreads / Bp;
  int const b = tid / tpr, j = tid - b * tpr;
  bool const active = b < B;
  int const q4 = dm / 4;
  float* stat = reinterpret_cast<float*>(smem + lo.oStat);
  // one pass: sums of (x - K) and (x - K)^2 with K the row's first element (LayerNorm; K = 0 for
  // RMSNorm), then var = E[(x - K)^2] - E[x - K]^2: one block reduction instead of two, and the
  // shift keeps the difference well conditioned (|mean - K| is of the order of the spread)
  float4 v[V];
  float sum = 0.f, sq = 0.f;
  float const* src = nullptr;
  if (active)
    src = from_table ? p.table + static_cast<std::size_t>(p.tokens[b]) * dm
                     : reinterpret_cast<float const*>(smem + lo.oRS) + static_cast<std::size_t>(b) * dm;
  float const K = active && !p.rms ? src[0] : 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    int const k4 = j + i * tpr;
    v[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (active && k4 < q4) {
      float4 const* s4 = reinterpret_cast<float4 const*>(src) + k4;
      v[i] = from_table ? __ldg(s4) : *s4;
      float const a = v[i].x - K, c = v[i].y - K, d = v[i].z - K, e = v[i].w - K;
      sum += (a + c) + (d + e);
      sq += (a * a + c * c) + (d * d + e * e);
    }
  }
  int const warp = tid >> 5, wpr = tpr / 32, lane = tid & 31;  // warps per row team
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
    sq += __shfl_xor_sync(0xffffffffu, sq, o);
  }
  if (lane == 0) {
    stat[warp] = sum;
    stat[kWarps + warp] = sq;
  }
  csync();
  float s1 = lane < wpr ? stat[(active ? b : 0) * wpr + lane] : 0.f;
  float s2 = lane < wpr ? stat[kWarps + (active ? b : 0) * wpr + lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    s2 += __shfl_xor_sync(0xffffffffu, s2, o);
  }
  float const inv = lo.inv_dm;
  float const m1 = s1 * inv;
  float const mean = p.rms ? 0.f : K + m1;
  float const var = p.rms ? s2 * inv : fmaxf(s2 * inv - m1 * m1, 0.f);
  float const rstd = rsqrtf(var + p.eps);  // MUFU.RSQ: a short chain (1 / sqrtf is ~2 ulp closer)
  if (active) {
    unsigned char* row = smem + lo.oXN + static_cast<std::size_t>(b) * lo.sA;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      int const k4 = j + i * tpr;
      if (k4 < q4) {
        float4 const ww = reinterpret_cast<float4 const*>(w)[k4];
        float4 const bb = has_b ? reinterpret_cast<float4 const*>(bsm)[k4] : make_float4(0.f, 0.f, 0.f, 0.f);
        __nv_bfloat162 const lo2 = __floats2bfloat162_rn((v[i].x - mean) * rstd * ww.x + bb.x,
                                                         (v[i].y - mean) * rstd * ww.y + bb.y);
        __nv_bfloat162 const hi2 = __floats2bfloat162_rn((v[i].z - mean) * rstd * ww.z + bb.z,
                                                         (v[i].w - mean) * rstd * ww.w + bb.w);
        uint2 pk;
        pk.x = *reinterpret_cast<unsigned const*>(&lo2);
        pk.y = *reinterpret_cast<unsigned const*>(&hi2);
        *reinterpret_cast<uint2*>(row + 8 * k4) = pk;
      }
    }
  }
  csync();
}

/// norm_rows_v with V = the float4 a thread holds (compile time: a fixed loop without a predicated
/// branch per possible float4; batch 1 at d_model 1024 takes V = 1 where the loop had 8 steps).
template <int kB>
__device__ __forceinline__ void norm_rows(Params const& p, Layout const& lo, bool from_table, float const* w,
                                          float const* bsm, bool has_b, unsigned char* smem) {
  int constexpr Bp = kB <= 1 ? 1 : (kB <= 2 ? 2 : (kB <= 4 ? 4 : 8));
  int const v = ceil_div(lo.dm / 4, kThreads / Bp);
  if (v <= 1) norm_rows_v<kB, 1>(p, lo, from_table, w, bsm, has_b, smem);
  else if (v <= 2) norm_rows_v<kB, 2>(p, lo, from_table, w, bsm, has_b, smem);
  else if (v <= 4) norm_rows_v<kB, 4>(p, lo, from_table, w, bsm, has_b, smem);
  else norm_rows_v<kB, kNormVec>(p, lo, from_table, w, bsm, has_b, smem);
}

// ---- bulk copies of weight rows (sm_90: the tensor memory accelerator) ----------------------------
// The in_proj and out_proj rows of a layer (the bulk of its bytes) are copied by cp.async.bulk
// (one instruction per row, issued by one warp's lanes: the producer warpgroup's first warp when
// warp-specialised, else warp 0; completion counted in bytes on an
// mbarrier): unlike ~4000 16-byte cp.async per block and layer they do not queue in front of the
// exchanges' latency-critical loads in the SM's load/store path. Before sm_90, cp.async.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MAMBABYTE_PERSISTENT_BULK 1
#endif

__device__ __forceinline__ unsigned smem_u32(void const* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count = 1) {
#if defined(MAMBABYTE_PERSISTENT_BULK)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#else
  (void)bar; (void)count;
#endif
}
/// One arrival on `bar` (release at block scope: the caller's earlier shared-memory reads are
/// ordered before a waiter's later writes).
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
#if defined(MAMBABYTE_PERSISTENT_BULK)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
#else
  (void)bar;
#endif
}
/// An arrival on `bar` once the calling thread's earlier cp.async copies have landed (counted in
/// the barrier's expected arrivals: noinc).
__device__ __forceinline__ void cp_async_arrive(unsigned long long* bar) {
#if defined(MAMBABYTE_PERSISTENT_BULK)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar)) : "memory");
#else
  (void)bar;
#endif
}
/// Arms `bar` for `bytes` (its one arrival of the phase; thread-level).
__device__ __forceinline__ void mbar_arm(unsigned long long* bar, unsigned bytes) {
#if defined(MAMBABYTE_PERSISTENT_BULK)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#else
  (void)bar; (void)bytes;
#endif
}
/// rows x row_bytes (multiples of 16, 16-byte aligned) global -> shared, one bulk copy per row by
/// the calling warp's lanes, completing on `bar` (armed by mbar_arm for the phase's bytes).
__device__ __forceinline__ void bulk_rows(unsigned char* dst, int sstride, void const* src, std::size_t gstride,
                                          int rows, int row_bytes, unsigned long long* bar) {
#if defined(MAMBABYTE_PERSISTENT_BULK)
  int const lane = static_cast<int>(threadIdx.x) & 31;
  auto const* s8 = static_cast<unsigned char const*>(src);
  // the block's earlier generic reads of these bytes (ordered by a block barrier) before the
  // async-proxy writes
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  for (int r = lane; r < rows; r += 32)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(dst + static_cast<std::size_t>(r) * sstride)),
                 "l"(s8 + static_cast<std::size_t>(r) * gstride), "r"(static_cast<unsigned>(row_bytes)),
                 "r"(smem_u32(bar))
                 : "memory");
#else
  (void)dst; (void)sstride; (void)src; (void)gstride; (void)rows; (void)row_bytes; (void)bar;
#endif
}
/// Whether the phase of `bar` with the given parity has completed (one try_wait: it may suspend
/// the thread for a while before answering).
__device__ __forceinline__ bool mbar_try_wait(unsigned long long* bar, unsigned parity) {
#if defined(MAMBABYTE_PERSISTENT_BULK)
  unsigned done = 0;
  asm volatile(
      "{\n .reg .pred p;\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0;
#else
  (void)bar; (void)parity;
  return true;
#endif
}
/// The slow path of mbar_wait: traps after kPollTimeoutNs, like the exchange polls, instead of
/// hanging the GPU should an arrival never come. Inline: a call out of a setmaxnreg region made
/// ptxas fail to allocate the consumers' 104 registers (CUDA 13.0).
__device__ __forceinline__ void mbar_wait_slow(unsigned long long* bar, unsigned parity) {
  unsigned long long const t0 = globaltimer();
  for (unsigned spin = 1; !mbar_try_wait(bar, parity); ++spin)
    if ((spin & 63u) == 0 && globaltimer() - t0 > kPollTimeoutNs) __trap();
}
/// Waits for the phase of `bar` with the given parity (all threads that read the rows).
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  if (!mbar_try_wait(bar, parity)) mbar_wait_slow(bar, parity);
}

// ---- the kernel -----------------------------------------------------------------------------------

/// The batch row of item it < kB * n of a (batch row, index < n) item space: kB - 1 comparisons
/// instead of an integer division by the runtime n on a phase's dependent chain (0 at batch 1).
template <int kB>
__device__ __forceinline__ int row_of(int it, int n) {
  int b = 0;
#pragma unroll
  for (int k = 1; k < kB; ++k) b += it >= k * n ? 1 : 0;
  return b;
}

// The warp-specialised kernel (sm_90a: setmaxnreg): 16 consumer warps compute as below, a
// producer warpgroup issues every weight copy (see the file comment). Elsewhere the computing
// threads issue the copies themselves, inside the exchanges' fetches.
#if defined(MAMBABYTE_PERSISTENT_BULK) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MAMBABYTE_PERSISTENT_WS 1
#define MAMBABYTE_PERSISTENT_BLOCK 640
#else
#define MAMBABYTE_PERSISTENT_BLOCK 512
#endif
static_assert(MAMBABYTE_PERSISTENT_BLOCK == kThreads || MAMBABYTE_PERSISTENT_BLOCK == kWsThreads);

/// kB: the batch (lo.B), a template parameter so that each batch size compiles only its own paths
/// (batch 1: the bulk copies; the loops over batch rows unrolled).
template <int kB>
MAMBABYTE_KERNEL void __launch_bounds__(MAMBABYTE_PERSISTENT_BLOCK, 1)
    persistent_decode_kernel(__grid_constant__ Params const p, Layout const lo) {
  using decode_detail::round_s;
  extern __shared__ __align__(128) unsigned char smem[];
  int const tid = static_cast<int>(threadIdx.x);
  int const g = static_cast<int>(blockIdx.x);
  int const G = static_cast<int>(gridDim.x);
  // the batch: kB itself up to kExactBatch; above, the kernel for kMaxBatch runs batches
  // kExactBatch + 1 .. kMaxBatch with B = lo.B (row_of<kB>'s comparisons past B are false)
  int const B = kB <= kExactBatch ? kB : lo.B;
  int const dm = lo.dm, di = lo.di, N = lo.N, R = lo.R, X = lo.X, dc = lo.dc;
  int const c0 = g * lo.cpb, cv = g < lo.nxb ? min(lo.cpb, di - c0) : 0;
  int const m0 = g * lo.rpb, rv = g < lo.ncb ? min(lo.rpb, dm - m0) : 0;
  int const h0 = g * lo.hpb, hv = g < lo.nhb ? min(lo.hpb, lo.classes - h0) : 0;
  int const rpadA = round_up(2 * lo.cpb, 16), rpadC = round_up(lo.rpb, 16), rpadH = round_up(lo.hpb, 16);
#if defined(MAMBABYTE_PERSISTENT_WS)
  bool constexpr ws = true;
#else
  bool constexpr ws = false;
#endif
  int constexpr nthreads = MAMBABYTE_PERSISTENT_BLOCK;
  // words per thread and round of the R and Y fetches (B x d_model, B x d_inner / 2 words): more
  // in flight above kExactBatch, where they are 2x to 8x the batch-1 fetch
  int constexpr kFetchWords = kB > kExactBatch ? 8 : 4;
#if defined(MAMBABYTE_PERSISTENT_GATE)
  int constexpr kGate = MAMBABYTE_PERSISTENT_GATE;
#else
  int constexpr kGate = 1;
#endif
  static_assert(kGate >= 0 && kGate <= 2, "MAMBABYTE_PERSISTENT_GATE: 0 (none), 1 (after the X fetch), 2 (after the Y fetch)");
  // out_proj fetches its own y columns per warp (gemv_mma_y): the warp-specialised kernel
  // (MAMBABYTE_PERSISTENT_NO_YFUSE: the block-wide fetch, for A/B measurements)
#if defined(MAMBABYTE_PERSISTENT_NO_YFUSE)
  bool const yfused = false;
#else
  bool const yfused = ws && kGate != 2 && kB <= kYMaxBatch && y_fused_fits(rpadC, lo.ksC, di);
#endif
  if (blockDim.x != nthreads) __trap();  // the host launched the other variant's block size
  // the copy team: 16-byte cp.async by the threads first, first + stride, ...; bulk copies by the
  // lanes of one warp, the barrier armed by one thread (the producer warpgroup when ws, else the
  // computing threads: warp 0 for the bulk copies, the others for cp.async)
  int const cfirst = ws ? tid - kThreads : tid - 32;
  int constexpr cstride = ws ? kProducerThreads : kCopyThreads;
  bool const cbulk = ws ? (tid >= kThreads && tid < kThreads + 32) : tid < 32;
  bool const carm = ws ? tid == kThreads : tid == 0;

  // zero shared memory once: parameters of a partial channel block read as zeros
  for (int i = tid * 16; i < static_cast<int>(lo.bytes); i += nthreads * 16)
    *reinterpret_cast<uint4*>(smem + i) = make_uint4(0u, 0u, 0u, 0u);
  // mbarriers: [0..2] the copies of phases A, C, B have landed ("full"; ws: the producer thread
  // that arms it + one cp.async arrival per producer thread); ws: [3..5] the computing threads
  // are done with phase A, C, B's shared memory ("empty")
  auto* const mbar = reinterpret_cast<unsigned long long*>(smem + lo.oMB);
#if defined(MAMBABYTE_PERSISTENT_BULK)
  // in_proj / out_proj rows by bulk copies (see bulk_rows) at batch 1, by cp.async above: H200,
  // 353M shape, same session: batch 1 734 -> 702 us with bulk copies, batch 4 980 -> 1033 (bulk
  // at every batch; 980 either way with this choice)
  bool constexpr bulk = kB == 1;  // also with the producer warpgroup: bulk at batch 2-4 848-857 vs 791-793 us (run 62)
#else
  bool constexpr bulk = false;
#endif
  __syncthreads();
  if (tid == 0) {
    for (int k = 0; k < 3; ++k) mbar_init(mbar + k, ws ? 1u + kProducerThreads : 1u);
    if (ws)
      for (int k = 3; k < 6; ++k) mbar_init(mbar + k, static_cast<unsigned>(kThreads));
  }
#if defined(MAMBABYTE_PERSISTENT_BULK)
  // the zeros above (generic proxy) before the bulk copies (async proxy) into the same bytes
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
  LayerPtrs* const lp = reinterpret_cast<LayerPtrs*>(smem + lo.oLP);
  {
    auto const* src = reinterpret_cast<unsigned long long const*>(p.layers);
    auto* dst = reinterpret_cast<unsigned long long*>(lp);
    int const n = p.n_layer * static_cast<int>(sizeof(LayerPtrs) / 8);
    for (int i = tid; i < n; i += nthreads) dst[i] = src[i];
  }
  unsigned const epoch = *reinterpret_cast<unsigned const volatile*>(p.sync);
  __syncthreads();
  // exchange e (0 P, 1 X, 2 Y, 3 R) of layer l: flag and the words of its parity
  auto flag = [&](int l, int e) { return epoch * kFlagsPerEpoch + static_cast<unsigned>(4 * l + e + 1); };
  auto wp = [&](int l) { return p.words + lo.wP + static_cast<std::size_t>(l & 1) * B * lo.nxb * X; };
  auto wx = [&](int l) { return p.words + lo.wX + static_cast<std::size_t>(l & 1) * B * X; };
  auto wy = [&](int l) { return p.words + lo.wY + static_cast<std::size_t>(l & 1) * B * (di / 2); };
  auto wr = [&](int l) { return p.words + lo.wR + static_cast<std::size_t>(l & 1) * B * dm; };

  auto f32 = [&](std::size_t off) { return reinterpret_cast<float*>(smem + off); };

  // ---- weight streaming: each block copies its slices of a layer into shared memory a phase
  // ahead, per phase (A, B, C) one cp.async commit group (+ the head's with A(0)) and at batch 1
  // one phase of the phase's "full" mbarrier for the bulk copies; a phase starts with
  // cp.async.wait_group 2 (the two later groups may still be in flight). ws: the producer issues
  // them and completes the full mbarrier (cp.async arrivals instead of commit groups).
  auto done_phase = [&](unsigned long long* bar) {
    if (ws) cp_async_arrive(bar);
    else decode_detail::cp_async_commit();
  };
  auto issue_a = [&](int l) {
    if (l < p.n_layer && cv > 0) {
      LayerPtrs const& L = lp[l];
      if (bulk) {
        if (cbulk) {  // the x and z rows of the block's channels and the norm weights: one phase of mbar[0]
          if (carm) mbar_arm(mbar, static_cast<unsigned>(2 * cv * dm * 2 + (L.norm_b ? 2 : 1) * dm * 4));
          bulk_rows(smem + lo.oWA, lo.sA, L.in_w + static_cast<std::size_t>(c0) * dm, std::size_t(dm) * 2, cv,
                    dm * 2, mbar);
          bulk_rows(smem + lo.oWA + static_cast<std::size_t>(lo.cpb) * lo.sA, lo.sA,
                    L.in_w + static_cast<std::size_t>(di + c0) * dm, std::size_t(dm) * 2, cv, dm * 2, mbar);
          bulk_rows(smem + lo.oNW, 0, L.norm_w, 0, 1, dm * 4, mbar);
          if (L.norm_b) bulk_rows(smem + lo.oNB, 0, L.norm_b, 0, 1, dm * 4, mbar);
        }
      } else {
        if (ws && carm) mbar_arm(mbar, 0u);
        stage_rows(smem + lo.oWA, lo.sA, L.in_w + static_cast<std::size_t>(c0) * dm, std::size_t(dm) * 2, cv, dm * 2,
                   cfirst, cstride);
        stage_rows(smem + lo.oWA + static_cast<std::size_t>(lo.cpb) * lo.sA, lo.sA,
                   L.in_w + static_cast<std::size_t>(di + c0) * dm, std::size_t(dm) * 2, cv, dm * 2, cfirst, cstride);
        stage(smem + lo.oNW, L.norm_w, dm * 4, cfirst, cstride);
        if (L.norm_b) stage(smem + lo.oNB, L.norm_b, dm * 4, cfirst, cstride);
      }
      stage_rows(smem + lo.oWX, lo.cpb * 2, L.x_w + c0, std::size_t(di) * 2, X, cv * 2, cfirst, cstride);
      stage(smem + lo.oCW, L.conv_w + static_cast<std::size_t>(c0) * dc, cv * dc * 4, cfirst, cstride);
      if (L.conv_b) stage(smem + lo.oCB, L.conv_b + c0, cv * 4, cfirst, cstride);
      if (L.in_b) {
        stage(smem + lo.oIB, L.in_b + c0, cv * 4, cfirst, cstride);
        stage(smem + lo.oIB + lo.cpb * 4, L.in_b + di + c0, cv * 4, cfirst, cstride);
      }
      if (dc > 1)
        stage_rows(smem + lo.oCS, lo.cpb * 4, L.conv_state + c0, std::size_t(di) * 4, B * (dc - 1), cv * 4, cfirst,
                   cstride);
    }
    done_phase(mbar);
  };
  auto issue_b = [&](int l) {
    if (l < p.n_layer && cv > 0) {
      LayerPtrs const& L = lp[l];
      if (bulk) {
        if (cbulk) {  // dt_proj rows, A_log, the state: one phase of mbar[2]
          if (carm) mbar_arm(mbar + 2, static_cast<unsigned>(cv * R * 2 + cv * N * 4 + B * cv * N * 4));
          bulk_rows(smem + lo.oWD, 0, L.dt_w + static_cast<std::size_t>(c0) * R, 0, 1, cv * R * 2, mbar + 2);
          bulk_rows(smem + lo.oAL, 0, L.A_log + static_cast<std::size_t>(c0) * N, 0, 1, cv * N * 4, mbar + 2);
          bulk_rows(smem + lo.oSS, lo.cpb * N * 4, L.ssm_state + static_cast<std::size_t>(c0) * N,
                    std::size_t(di) * N * 4, B, cv * N * 4, mbar + 2);
        }
      } else {
        if (ws && carm) mbar_arm(mbar + 2, 0u);
        stage(smem + lo.oWD, L.dt_w + static_cast<std::size_t>(c0) * R, cv * R * 2, cfirst, cstride);
        stage(smem + lo.oAL, L.A_log + static_cast<std::size_t>(c0) * N, cv * N * 4, cfirst, cstride);
        stage_rows(smem + lo.oSS, lo.cpb * N * 4, L.ssm_state + static_cast<std::size_t>(c0) * N,
                   std::size_t(di) * N * 4, B, cv * N * 4, cfirst, cstride);
      }
      if (L.dt_b) stage(smem + lo.oDB, L.dt_b + c0, cv * 4, cfirst, cstride);
      if (L.D) stage(smem + lo.oDD, L.D + c0, cv * 4, cfirst, cstride);
    }
    done_phase(mbar + 2);
  };
  auto issue_c = [&](int l) {
    if (l < p.n_layer && rv > 0) {
      LayerPtrs const& L = lp[l];
      if (bulk) {
        if (cbulk) {  // one phase of mbar[1]
          if (carm) mbar_arm(mbar + 1, static_cast<unsigned>(rv * di * 2));
          bulk_rows(smem + lo.oWC, lo.sC, L.out_w + static_cast<std::size_t>(m0) * di, std::size_t(di) * 2, rv,
                    di * 2, mbar + 1);
        }
      } else {
        if (ws && carm) mbar_arm(mbar + 1, 0u);
        stage_rows(smem + lo.oWC, lo.sC, L.out_w + static_cast<std::size_t>(m0) * di, std::size_t(di) * 2, rv, di * 2,
                   cfirst, cstride);
      }
      if (L.out_b) stage(smem + lo.oOB, L.out_b + m0, rv * 4, cfirst, cstride);
    }
    done_phase(mbar + 1);
  };
  // the residual of layer l (exchange R) -> RS rows in shared memory; between(): see ll_fetch
  auto fetch_resid = [&](int l, auto&& between) {
    float* rs = f32(lo.oRS);
    ll_fetch<kFetchWords>(wr(l), B * dm, flag(l, 3), between, [&](int i, unsigned v) { rs[i] = __uint_as_float(v); });
  };

  float* out = f32(lo.oOut);
  float* red = f32(lo.oRed);
  float* U = f32(lo.oU);
  float* Z = f32(lo.oZ);
  float* XD = f32(lo.oXD);
  // the SSM phase's lanes per (channel, batch row) item: a power of two <= 32, as many as the block
  // has threads for (the same every layer: off the phase's dependent chain)
  int ssm_lanes = 1;
  while (ssm_lanes < 32 && cv * B * ssm_lanes * 2 <= kThreads) ssm_lanes *= 2;
  if (ws && tid >= kThreads) {
    // the producer warpgroup: a phase's copies of layer l as soon as the computing threads are
    // done with that phase's shared memory of layer l - 1 (its "empty" mbarrier), in the order
    // the phases are consumed; it waits for nothing else, so a copy instruction that waits for
    // the copy engine holds no computing warp
#if defined(MAMBABYTE_PERSISTENT_WS)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kWsProducerRegs));
#endif
    for (int l = 0; l < p.n_layer; ++l) {
      unsigned const prev = static_cast<unsigned>((l - 1) & 1);
      if (cv > 0) {
        if (l > 0) mbar_wait(mbar + 3, prev);
        issue_a(l);
        if (l > 0) mbar_wait(mbar + 5, prev);
        issue_b(l);
      }
      if (rv > 0) {
        if (l > 0) mbar_wait(mbar + 4, prev);
        issue_c(l);
      }
    }
    decode_detail::cp_async_wait_all();
    return;
  }
#if defined(MAMBABYTE_PERSISTENT_WS)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kWsConsumerRegs));
#endif
  if (hv > 0) {  // the head's rows (ws: by the computing threads, waited for before the head)
    int const hfirst = ws ? tid : cfirst, hstride = ws ? kThreads : cstride;
    stage_rows(smem + lo.oWH, lo.sA, p.head + static_cast<std::size_t>(h0) * dm, std::size_t(dm) * 2, hv, dm * 2,
               hfirst, hstride);
    stage(smem + lo.oFW, p.norm_f_w, dm * 4, hfirst, hstride);
    if (p.norm_f_b) stage(smem + lo.oFB, p.norm_f_b, dm * 4, hfirst, hstride);
  }
  // without ws, commit groups: A(l) is issued while phase B(l-1) waits for exchange X, B(l) while
  // C(l-1) waits for Y, C(l) while A(l) waits for R (every issue overwrites shared memory its
  // phase of the previous layer consumed); a phase waits for its group with two later groups in
  // flight
  if (ws) {
    decode_detail::cp_async_commit();
  } else {
    issue_a(0);
    issue_b(0);
  }
  for (int l = 0; l < p.n_layer; ++l) {
    LayerPtrs const& L = lp[l];
    // ---- A: residual, norm, in_proj, conv, x_proj partials
    MAMBABYTE_PSTAMP(l, 0);
    if (cv > 0 && l > 0)
      fetch_resid(l - 1, [&] {
        if (!ws) issue_c(l);
        MAMBABYTE_PSTAMP(l, 17);
      });
    else if (!ws) issue_c(l);
    MAMBABYTE_PSTAMP(l, 1);
    if (!ws) cp_async_wait_2();
    csync();
    MAMBABYTE_PSTAMP(l, 2);
    if (ws && kGate > 0 && rv > 0 && l > 0) mbar_arrive(mbar + 4);  // C(l - 1)'s, after the R fetch
    if (cv > 0) {
      if (bulk || ws) mbar_wait(mbar, static_cast<unsigned>(l & 1));  // layer l's in_proj rows and norm (phase l of mbar[0])
      MAMBABYTE_PSTAMP(l, 3);
      norm_rows<kB>(p, lo, l == 0, f32(lo.oNW), f32(lo.oNB), L.norm_b != nullptr, smem);
      MAMBABYTE_PSTAMP(l, 4);
      gemv_mma(smem + lo.oWA, lo.sA, 2 * lo.cpb, rpadA, smem + lo.oXN, lo.sA, B, dm, lo.ksA, red, out);
      MAMBABYTE_PSTAMP(l, 5);
      float const* cw = f32(lo.oCW);
      float const* cb = f32(lo.oCB);
      float const* ib = f32(lo.oIB);
      float const* cs = f32(lo.oCS);
      // conv step + SiLU of item it = (b, i) -> U, Z, the conv state
      auto conv_item = [&](int it) {
        int const b = row_of<kB>(it, cv), i = it - b * cv;
        float const xz = round_s<bf16_t>(L.in_b ? out[i * 8 + b] + round_s<bf16_t>(ib[i]) : out[i * 8 + b]);
        float const zz = round_s<bf16_t>(L.in_b ? out[(lo.cpb + i) * 8 + b] + round_s<bf16_t>(ib[lo.cpb + i])
                                                : out[(lo.cpb + i) * 8 + b]);
        float win[decode_detail::kMaxConv - 1];
#pragma unroll
        for (int k = 0; k < decode_detail::kMaxConv - 1; ++k)
          win[k] = k < dc - 1 ? cs[(b * (dc - 1) + k) * lo.cpb + i] : 0.f;
        float const* cwi = cw + i * dc;
        float acc = L.conv_b ? cb[i] : 0.f;
#pragma unroll
        for (int k = 0; k < decode_detail::kMaxConv - 1; ++k)
          if (k < dc - 1) acc += cwi[k] * win[k];
        acc += cwi[dc - 1] * xz;
        float* st = L.conv_state + static_cast<std::size_t>(b) * (dc - 1) * di + c0 + i;
#pragma unroll
        for (int k = 0; k < decode_detail::kMaxConv - 2; ++k)
          if (k < dc - 2) st[static_cast<std::size_t>(k) * di] = win[k + 1];
        if (dc > 1) st[static_cast<std::size_t>(dc - 2) * di] = xz;
        U[b * lo.cpb + i] = round_s<bf16_t>(acc * fast::sigmoid_fast(acc));  // as prefill's conv (layers.cuh)
        Z[b * lo.cpb + i] = zz;
      };
      // x_proj partial of item it = (b, j) over the block's channels -> exchange P; 16-byte
      // loads (cv and cpb are multiples of 8), the products summed in 4 chains as (0+1)+(2+3)
      unsigned char const* wxp = smem + lo.oWX;
      auto xproj_item = [&](int it) {
        int const b = row_of<kB>(it, X), j = it - b * X;
        float s4[4] = {0.f, 0.f, 0.f, 0.f};
        for (int i = 0; i < cv; i += 8) {
          uint4 const w8 = *reinterpret_cast<uint4 const*>(wxp + 2 * (static_cast<std::size_t>(j) * lo.cpb + i));
          float4 const u0 = *reinterpret_cast<float4 const*>(U + b * lo.cpb + i);
          float4 const u1 = *reinterpret_cast<float4 const*>(U + b * lo.cpb + i + 4);
          s4[0] = fmaf(__uint_as_float(w8.x << 16), u0.x, s4[0]);
          s4[1] = fmaf(__uint_as_float(w8.x & 0xffff0000u), u0.y, s4[1]);
          s4[2] = fmaf(__uint_as_float(w8.y << 16), u0.z, s4[2]);
          s4[3] = fmaf(__uint_as_float(w8.y & 0xffff0000u), u0.w, s4[3]);
          s4[0] = fmaf(__uint_as_float(w8.z << 16), u1.x, s4[0]);
          s4[1] = fmaf(__uint_as_float(w8.z & 0xffff0000u), u1.y, s4[1]);
          s4[2] = fmaf(__uint_as_float(w8.w << 16), u1.z, s4[2]);
          s4[3] = fmaf(__uint_as_float(w8.w & 0xffff0000u), u1.w, s4[3]);
        }
        ll_store(wp(l) + (static_cast<std::size_t>(b) * lo.nxb + g) * X + j,
                 __float_as_uint((s4[0] + s4[1]) + (s4[2] + s4[3])), flag(l, 0));
      };
      for (int it = tid; it < cv * B; it += kThreads) conv_item(it);
      csync();
      MAMBABYTE_PSTAMP(l, 6);
      for (int it = tid; it < X * B; it += kThreads) xproj_item(it);
    }
    MAMBABYTE_PSTAMP(l, 7);
    csync();
    if (ws && kGate == 0 && cv > 0) mbar_arrive(mbar + 3);  // A's shared memory is consumed
    // exchange X: the block's (b, j) columns c = g, g + G, ... summed over the channel blocks;
    // kReduceGroup threads per column, up to kThreads / kReduceGroup columns at a time; a thread
    // sums the blocks q, q + kReduceGroup, ... in order, then the warp butterfly and the group's
    // warps in order (a fixed order)
    {
      int const cols = B * X, mine = ceil_div(cols, G);
      int const gi = tid / kReduceGroup, li = tid - gi * kReduceGroup, warp = tid >> 5;
      float* stat = f32(lo.oStat);
      unsigned const fp = flag(l, 0), fx = flag(l, 1);
      for (int k0 = 0; k0 < mine; k0 += kThreads / kReduceGroup) {  // uniform trip count
        int const k = k0 + gi, c = g + k * G;
        bool const act = k < mine && c < cols;
        float sv = 0.f;
        if (act) {
          int const b = row_of<kB>(c, X), j = c - b * X;
          unsigned long long const* base = wp(l) + static_cast<std::size_t>(b) * lo.nxb * X + j;
          for (int q0 = li; q0 < lo.nxb; q0 += 2 * kReduceGroup) {
            int const q1 = q0 + kReduceGroup;
            unsigned long long const w0 = ll_load(base + static_cast<std::size_t>(q0) * X);
            unsigned long long const w1 = q1 < lo.nxb ? ll_load(base + static_cast<std::size_t>(q1) * X) : 0ull;
            sv += __uint_as_float(ll_wait(base + static_cast<std::size_t>(q0) * X, w0, fp));
            if (q1 < lo.nxb) sv += __uint_as_float(ll_wait(base + static_cast<std::size_t>(q1) * X, w1, fp));
          }
        }
        sv = decode_detail::warp_sum(sv);
        if ((tid & 31) == 0) stat[warp] = sv;
        csync();
        if (act && li == 0) {
          float t = 0.f;
          for (int w = 0; w < kReduceGroup / 32; ++w) t += stat[warp + w];
          ll_store(wx(l) + c, __float_as_uint(t), fx);
        }
        csync();
      }
    }
    MAMBABYTE_PSTAMP(l, 8);

    // ---- B: xdbl, dt, state update, y
    // xdbl[b][j] = round(exchange X); without a producer, A(l + 1) is issued meanwhile (A's shared
    // memory is consumed); with one, its copies start after this fetch (kGate 1)
    if (cv > 0)
      ll_fetch<1>(
          wx(l), B * X, flag(l, 1),
          [&] {
            if (!ws) issue_a(l + 1);
            MAMBABYTE_PSTAMP(l, 18);
          },
          [&](int i, unsigned v) { XD[i] = round_s<bf16_t>(__uint_as_float(v)); });
    else if (!ws) issue_a(l + 1);
    if (!ws) cp_async_wait_2();
    csync();
    MAMBABYTE_PSTAMP(l, 9);
    if (ws && kGate == 1 && cv > 0) mbar_arrive(mbar + 3);  // A(l)'s, after the X fetch
    if (cv > 0) {
      if (bulk || ws) mbar_wait(mbar + 2, static_cast<unsigned>(l & 1));  // dt_proj rows, A_log, state (mbar[2])
      MAMBABYTE_PSTAMP(l, 10);
      bf16_t const* wd = reinterpret_cast<bf16_t const*>(smem + lo.oWD);
      float const* db = f32(lo.oDB);
      float const* al = f32(lo.oAL);
      float const* dd = f32(lo.oDD);
      float const* ss = f32(lo.oSS);
      bf16_t* ys = reinterpret_cast<bf16_t*>(smem + lo.oY);  // y of the block's channels, (B, cpb)
      // lpi lanes per (channel, batch row) item (ssm_lanes, before the layer loop): each sums a
      // strided share of the dt_proj row and of the states, then xor butterflies over the lanes
      // (fixed order).
      int const items = cv * B, lpi = ssm_lanes;
      // the lanes per item as a compile-time constant (unrolled butterflies, no loop overhead on
      // this phase's dependent chain); the same summation order for every LPI path
      auto ssm_items = [&]<int LPI>() {
        int const sub = tid & (LPI - 1);
        for (int it0 = 0; it0 < items; it0 += kThreads / LPI) {  // uniform trip count: shuffles below
          int const item = it0 + tid / LPI;
          bool const act = item < items;
          int const b = act ? row_of<kB>(item, cv) : 0, i = act ? item - b * cv : 0;
          float const* xd = XD + b * X;
          float const u = U[b * lo.cpb + i];
          float const zz = Z[b * lo.cpb + i];
          float const dbias = L.dt_b ? db[i] : 0.f;
          float const Dd = L.D ? dd[i] : 0.f;
          float dtp = 0.f;
          // (both loops not unrolled: six LPI copies of this body; unrolled, their code missed the
          // instruction cache on every layer's entry: Nsight Compute's no-instruction stalls)
#pragma unroll 1
          for (int r = sub; r < R; r += LPI) dtp = fmaf(__bfloat162float(wd[i * R + r]), xd[r], dtp);
#pragma unroll
          for (int o = 1; o < LPI; o <<= 1) dtp += __shfl_xor_sync(0xffffffffu, dtp, o);
          float const dt = scan_detail::softplus_fma(round_s<bf16_t>(dtp) + dbias);  // as the forward scans
          float const du = dt * u;
          float y = 0.f;
          float* sg = L.ssm_state + (static_cast<std::size_t>(b) * di + c0 + i) * N;
#pragma unroll 1
          for (int n = sub; n < N; n += LPI) {
            float const A2 = -expf(al[i * N + n]) * decode_detail::kLog2e;
            float const h = fmaf(decode_detail::ex2_approx(dt * A2), ss[(b * lo.cpb + i) * N + n], du * xd[R + n]);
            if (act) sg[n] = h;
            y = fmaf(h, xd[R + N + n], y);
          }
#pragma unroll
          for (int o = 1; o < LPI; o <<= 1) y += __shfl_xor_sync(0xffffffffu, y, o);
          y = fmaf(Dd, u, y);
          y = __fdividef(y * zz, 1.f + __expf(-zz));
          if (act && sub == 0) ys[b * lo.cpb + i] = __float2bfloat16_rn(y);
        }
      };
      switch (lpi) {
        case 32: ssm_items.template operator()<32>(); break;
        case 16: ssm_items.template operator()<16>(); break;
        case 8: ssm_items.template operator()<8>(); break;
        case 4: ssm_items.template operator()<4>(); break;
        case 2: ssm_items.template operator()<2>(); break;
        default: ssm_items.template operator()<1>(); break;
      }
      csync();
      // exchange Y: bf16 pairs of channels (cv is even)
      unsigned const fy = flag(l, 2);
      int const pairs = cv / 2;
      for (int it = tid; it < B * pairs; it += kThreads) {
        int const b = row_of<kB>(it, pairs), k = it - b * pairs;
        unsigned const v = *reinterpret_cast<unsigned const*>(ys + b * lo.cpb + 2 * k);
        ll_store(wy(l) + static_cast<std::size_t>(b) * (di / 2) + c0 / 2 + k, v, fy);
      }
    }
    MAMBABYTE_PSTAMP(l, 11);
    csync();  // B's shared memory (and the y staging) is consumed
    if (ws && cv > 0) mbar_arrive(mbar + 5);

    // ---- C: out_proj rows + residual; y of all channels (exchange Y), B(l + 1) issued meanwhile.
    // Warp-specialised: each warp fetches the y columns of its own k steps inside the GEMV
    // (gemv_mma_y), no block-wide fetch and barrier first; the Y wait is then part of stamps
    // 14 -> 15.
    if (yfused) {
      MAMBABYTE_PSTAMP(l, 19);
      MAMBABYTE_PSTAMP(l, 12);
      MAMBABYTE_PSTAMP(l, 13);
      if (rv > 0) {
        mbar_wait(mbar + 1, static_cast<unsigned>(l & 1));  // layer l's out_proj rows
        MAMBABYTE_PSTAMP(l, 14);
        if constexpr (kB <= kYMaxBatch)
          gemv_mma_y<kB>(smem + lo.oWC, lo.sC, rv, smem + lo.oY, lo.sC, di, red, out, wy(l), di / 2, flag(l, 2));
      }
    } else if (rv > 0) {
      int const h2 = di / 2;  // bf16 pairs of a y row
      unsigned char* yrows = smem + lo.oY;
      ll_fetch<kFetchWords>(wy(l), B * h2, flag(l, 2), [&] {
        if (!ws) issue_b(l + 1);
        MAMBABYTE_PSTAMP(l, 19);
      }, [&](int i, unsigned v) {
        int const b = row_of<kB>(i, h2), k = i - b * h2;
        *reinterpret_cast<unsigned*>(yrows + static_cast<std::size_t>(b) * lo.sC + 4 * k) = v;
      });
    } else if (!ws) {
      issue_b(l + 1);
    }
    if (!yfused) {
      MAMBABYTE_PSTAMP(l, 12);
      if (!ws) cp_async_wait_2();
      csync();
      MAMBABYTE_PSTAMP(l, 13);
      if (ws && kGate == 2 && cv > 0) mbar_arrive(mbar + 3);  // A(l)'s, after the Y fetch
      if (rv > 0) {
        if (bulk || ws) mbar_wait(mbar + 1, static_cast<unsigned>(l & 1));  // layer l's out_proj rows
        MAMBABYTE_PSTAMP(l, 14);
        gemv_mma(smem + lo.oWC, lo.sC, rv, rpadC, smem + lo.oY, lo.sC, B, di, lo.ksC, red, out);
      }
    }
    if (rv > 0) {
      MAMBABYTE_PSTAMP(l, 15);
      float const* ob = f32(lo.oOB);
      unsigned const fr = flag(l, 3);
      bool const last = l + 1 == p.n_layer;
      for (int it = tid; it < rv * B; it += kThreads) {
        int const b = row_of<kB>(it, rv), r = it - b * rv;
        float const s = out[r * 8 + b];
        float const h = round_s<bf16_t>(L.out_b ? s + round_s<bf16_t>(ob[r]) : s);
        float* ro = f32(lo.oRO) + b * lo.rpb + r;  // only this block writes these rows
        float const v = (l == 0 ? __ldg(p.table + static_cast<std::size_t>(p.tokens[b]) * dm + m0 + r) : *ro) + h;
        *ro = v;
        ll_store(wr(l) + static_cast<std::size_t>(b) * dm + m0 + r, __float_as_uint(v), fr);
        if (last) p.resid[static_cast<std::size_t>(b) * dm + m0 + r] = v;
      }
    }
    MAMBABYTE_PSTAMP(l, 16);
    csync();  // C's shared memory (Y rows, out_proj weights) is consumed
    if (ws && kGate == 0 && rv > 0) mbar_arrive(mbar + 4);
  }

  // ---- head: norm_f + lm_head rows -> fp32 logits
  decode_detail::cp_async_wait_all();
  csync();
  if (hv > 0) {
    if (p.n_layer > 0) fetch_resid(p.n_layer - 1, [] {});
    csync();
    norm_rows<kB>(p, lo, p.n_layer == 0, f32(lo.oFW), f32(lo.oFB), p.norm_f_b != nullptr, smem);
    gemv_mma(smem + lo.oWH, lo.sA, hv, rpadH, smem + lo.oXN, lo.sA, B, dm, lo.ksH, red, out);
    for (int it = tid; it < hv * B; it += kThreads) {
      int const b = row_of<kB>(it, hv), r = it - b * hv;
      p.logits[static_cast<std::size_t>(b) * lo.classes + h0 + r] = out[r * 8 + b];
    }
  }
  // the last block to finish starts the next epoch (every block read this one at its start)
  if (tid == 0) {
    unsigned const done = atomicAdd(p.sync + 1, 1u);
    if (done + 1 == static_cast<unsigned>(G)) {
      p.sync[1] = 0u;
      __threadfence();
      atomicExch(p.sync, epoch + 1u);
    }
  }
}

/// The block size the kernel was compiled for on the current device: kWsThreads where the
/// binary is the warp-specialised one (sm_90a), else kThreads (its launch bound says which).
template <class Kernel>
inline int block_threads(Kernel kernel) {
  cudaFuncAttributes fa{};
  MAMBABYTE_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  return fa.maxThreadsPerBlock >= kWsThreads ? kWsThreads : kThreads;
}

inline int sm_count(int device) {
  int n = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

/// The grid: one block per SM, fewer when the model has fewer channel / row blocks.
inline Layout make_layout(DecodeDims const& d, int device) {
  int const sms = sm_count(device);
  Layout lo(sms, d.batch, d.d_model, d.d_inner, d.d_state, d.dt_rank, d.d_conv, d.classes);
  int const G = std::max({lo.nxb, lo.ncb, lo.nhb});
  return Layout(G, d.batch, d.d_model, d.d_inner, d.d_state, d.dt_rank, d.d_conv, d.classes, d.n_layer);
}

}  // namespace persistent_detail

/// Whether the persistent step handles these dimensions on `device` (bf16 only; else the
/// caller uses decode.cuh's kernels or the layer-by-layer path). Pointer alignment is checked
/// again by persistent_decode_aligned.
inline bool persistent_decode_supported(DecodeDims const& d, int device) {
  using namespace persistent_detail;
  if (d.batch < 1 || d.batch > kMaxBatch || d.n_layer < 0 || d.n_layer > kMaxLayers) return false;
  if (d.d_model < 32 || d.d_model % 32 != 0 || d.d_inner < 32 || d.d_inner % 32 != 0 || d.dt_rank < 1) return false;
  if (d.d_conv < 1 || d.d_conv > decode_detail::kMaxConv || d.d_state < 1 || d.d_state > decode_detail::kMaxState)
    return false;
  if (d.classes < 1) return false;
  int const bp = d.batch <= 1 ? 1 : (d.batch <= 2 ? 2 : (d.batch <= 4 ? 4 : 8));
  if (d.d_model / 4 > kNormVec * (kThreads / bp)) return false;  // norm row in registers
  int major = 0, coop = 0, optin = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (major < 8 || !coop) return false;
  Layout const lo = make_layout(d, device);
  return lo.bytes <= static_cast<std::size_t>(optin) && lo.G <= sm_count(device);
}

/// Every pointer the kernel copies with cp.async is 16-byte aligned.
inline bool persistent_decode_aligned(DecodeArgs<__nv_bfloat16> const& a) {
  using decode_detail::aligned16;
  auto ok = [](void const* p) { return p == nullptr || aligned16(p); };
  if (!ok(a.embedding) || !ok(a.norm_f_w) || !ok(a.norm_f_b) || !ok(a.lm_head) || !ok(a.resid)) return false;
  for (auto const& L : a.layers)
    if (!ok(L.norm_w) || !ok(L.norm_b) || !ok(L.in_proj_w) || !ok(L.in_proj_b) || !ok(L.conv_w) || !ok(L.conv_b) ||
        !ok(L.x_proj_w) || !ok(L.dt_proj_w) || !ok(L.dt_proj_b) || !ok(L.A_log) || !ok(L.D) || !ok(L.out_proj_w) ||
        !ok(L.out_proj_b) || !ok(L.conv_state) || !ok(L.ssm_state))
      return false;
  return true;
}

/// 64-bit exchange words of the persistent step (its `words` buffer).
inline std::size_t persistent_decode_words(DecodeDims const& d, int device) {
  return persistent_detail::make_layout(d, device).words;
}

/// Raises the kernel's dynamic shared-memory limit (outside graph capture, before the step).
inline void persistent_decode_setup(Cuda const& be) {
  ScopedDevice guard(be.device);
  int optin = 0;
  MAMBABYTE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, be.device));
  auto raise = [optin](auto kernel) {
    MAMBABYTE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  };
  raise(persistent_detail::persistent_decode_kernel<1>);
  raise(persistent_detail::persistent_decode_kernel<2>);
  raise(persistent_detail::persistent_decode_kernel<3>);
  raise(persistent_detail::persistent_decode_kernel<4>);
  raise(persistent_detail::persistent_decode_kernel<persistent_detail::kMaxBatch>);
}

/// Threads per block of the persistent step on be.device: kWsThreads (640) where the loaded
/// binary is the warp-specialised one (built for sm_90a), else kThreads (512).
inline int persistent_decode_block_threads(Cuda const& be) {
  ScopedDevice guard(be.device);
  return persistent_detail::block_threads(persistent_detail::persistent_decode_kernel<1>);
}

/// Zeroes the exchange words and the epoch/counter pair (on be.stream): needed once after
/// allocating them and whenever the dimensions (hence the words' layout) change.
inline void persistent_decode_reset(Cuda const& be, unsigned long long* words, std::size_t n_words, unsigned* sync) {
  ScopedDevice guard(be.device);
  if (n_words) MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(words, 0, n_words * sizeof(unsigned long long), be.stream));
  MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(sync, 0, 2 * sizeof(unsigned), be.stream));
}

/// One decode step of every sequence in one kernel (see the file comment). a.u, a.z, a.xdbl,
/// a.y and a.xpart are not used; words: persistent_decode_words() 64-bit words and sync: two
/// unsigned, both zeroed by persistent_decode_reset after allocation and after a change of
/// dimensions, then left to the kernel (they carry the epoch from step to step). Asynchronous on
/// be.stream, graph-capturable. cooperative: launch with the cooperative attribute.
inline void persistent_decode_step(Cuda const& be, DecodeArgs<__nv_bfloat16> const& a, unsigned long long* words,
                                   unsigned* sync, bool cooperative = true) {
  using namespace persistent_detail;
  DecodeDims const& d = a.dims;
  require(static_cast<int>(a.layers.size()) == d.n_layer, "persistent_decode_step: ", a.layers.size(),
          " layers for n_layer ", d.n_layer);
  require(d.n_layer <= kMaxLayers, "persistent_decode_step: ", d.n_layer, " layers (at most ", kMaxLayers, ")");
  require(a.tokens && a.embedding && a.norm_f_w && a.lm_head && a.resid && a.logits && words && sync,
          "persistent_decode_step: null buffer or parameter");
  require(persistent_decode_aligned(a), "persistent_decode_step: a pointer is not 16-byte aligned");
  require(d.batch >= 1 && d.batch <= kMaxBatch, "persistent_decode_step: batch ", d.batch, " (1 to ", kMaxBatch, ")");
  ScopedDevice guard(be.device);
  Layout const lo = make_layout(d, be.device);
  Params p{.n_layer = d.n_layer, .eps = d.eps, .rms = d.rms, .tokens = a.tokens, .table = a.embedding,
           .norm_f_w = a.norm_f_w, .norm_f_b = a.norm_f_b, .head = a.lm_head, .resid = a.resid,
           .logits = a.logits, .words = words, .sync = sync, .layers = {}};
  for (int l = 0; l < d.n_layer; ++l) {
    auto const& L = a.layers[static_cast<std::size_t>(l)];
    p.layers[l] = LayerPtrs{L.norm_w, L.norm_b,   L.in_proj_w, L.in_proj_b,  L.conv_w,     L.conv_b,
                            L.x_proj_w, L.dt_proj_w, L.dt_proj_b, L.A_log, L.D, L.out_proj_w, L.out_proj_b,
                            L.conv_state, L.ssm_state};
  }
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  auto launch = [&](auto kernel) {
    decode_detail::launch_with(be, cooperative ? &attr : nullptr, kernel, dim3(static_cast<unsigned>(lo.G)),
                               dim3(static_cast<unsigned>(block_threads(kernel))), lo.bytes, p, lo);
  };
  static_assert(kExactBatch == 4 && kMaxBatch > kExactBatch, "one kernel per batch 1-4, one for 5..kMaxBatch");
  switch (d.batch) {
    case 1: launch(persistent_decode_kernel<1>); break;
    case 2: launch(persistent_decode_kernel<2>); break;
    case 3: launch(persistent_decode_kernel<3>); break;
    case 4: launch(persistent_decode_kernel<4>); break;
    default: launch(persistent_decode_kernel<kMaxBatch>); break;
  }
}

}  // namespace mambabyte::backend::cuda
