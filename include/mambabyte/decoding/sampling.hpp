/*! \file
 *  \brief Sampling the next token from logits: SamplingOptions (temperature, top-k, top-p,
 *         seed), a portable random number generator (Rng: xoshiro256** seeded by SplitMix64,
 *         with one independent stream per sequence) and Sampler, which draws one token per
 *         sequence of a batch.
 *
 *  Reproducibility: the draws depend only on the logits, the options and the seed, never on
 *  the compiler, the standard library or the platform. Rng is implemented here (no
 *  std::uniform_real_distribution, whose output is implementation-defined), the uniform
 *  number of a draw is built from the top 53 bits of one 64-bit output, the filtering and
 *  the draw use double arithmetic with a total order on tokens (logit descending, id
 *  ascending), and the draw walks the kept tokens in ascending id. Sequence b of a batch
 *  draws from stream b, seeded from (seed, b) only, so it produces the same tokens whatever
 *  the batch size.
 *
 *  The pipeline of one draw (sampling_distribution, then Sampler::sample):
 *    1. only the first n_valid logits count (a byte model pads its vocabulary past 256);
 *       a NaN logit is an error; -inf logits get probability 0; when some logits are +inf,
 *       they share all the probability equally (the limit of softmax);
 *    2. temperature 0 is greedy: the largest logit, the lowest id among equal ones;
 *    3. otherwise z = (logit - max) / temperature;
 *    4. top-k (k > 0): keep the k largest logits (ties at the cut: lower ids first);
 *    5. softmax over what is kept (stable: exp(z) with z <= 0);
 *    6. top-p (p < 1): keep the smallest set of most probable tokens whose probability adds
 *       up to at least p (always at least the most probable one), and renormalize;
 *    7. draw u in [0, 1) and return the first kept token (ascending id) whose cumulative
 *       probability exceeds u.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "mambabyte/core/error.hpp"

namespace mambabyte {

/// How the next token is chosen. The defaults sample from the model's distribution unchanged.
struct SamplingOptions {
  float temperature = 1.0f;  ///< > 0 divides the logits; 0 = greedy (argmax, lowest id on ties)
  int top_k = 0;             ///< keep the k most likely tokens; 0 = all
  float top_p = 1.0f;        ///< nucleus: keep the smallest set with probability >= p; 1 = all
  std::uint64_t seed = 0;    ///< stream b of a batch is seeded from (seed, b)

  /// Throws mambabyte::Error naming the bad field.
  void validate() const {
    require(std::isfinite(temperature) && temperature >= 0.0f,
            "sampling: temperature must be finite and >= 0 (0 = greedy), got ", temperature);
    require(top_k >= 0, "sampling: top_k must be >= 0 (0 = no top-k), got ", top_k);
    require(top_p > 0.0f && top_p <= 1.0f, "sampling: top_p must be in (0, 1] (1 = no nucleus), got ", top_p);
  }
};

/// SplitMix64 (Steele, Lea, Flood 2014): the seeding generator. mix64 is its output function.
struct SplitMix64 {
  std::uint64_t state = 0;

  static constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  constexpr std::uint64_t next() noexcept {
    state += 0x9E3779B97F4A7C15ull;
    return mix64(state);
  }
};

/// xoshiro256** 1.0 (Blackman, Vigna 2018): a small, fast generator with a 256-bit state,
/// bit-for-bit the same everywhere.
class Rng {
 public:
  /// From explicit state words (not all zero); mostly for checking against the reference.
  constexpr explicit Rng(std::uint64_t s0, std::uint64_t s1, std::uint64_t s2, std::uint64_t s3) noexcept
      : s_{s0, s1, s2, s3} {
    if ((s0 | s1 | s2 | s3) == 0) s_[0] = 1;  // the all-zero state is a fixed point
  }

  /// Stream `stream` of `seed`: the state is four outputs of SplitMix64 started at
  /// mix64(seed) ^ mix64(stream + 0x9E3779B97F4A7C15). Streams of one seed do not overlap
  /// in any practical sense (they start at unrelated points of a period of 2^256 - 1).
  static constexpr Rng stream(std::uint64_t seed, std::uint64_t stream) noexcept {
    SplitMix64 sm{SplitMix64::mix64(seed) ^ SplitMix64::mix64(stream + 0x9E3779B97F4A7C15ull)};
    std::uint64_t const a = sm.next(), b = sm.next(), c = sm.next(), d = sm.next();
    return Rng(a, b, c, d);
  }

  constexpr std::uint64_t next_u64() noexcept {
    std::uint64_t const result = rotl(s_[1] * 5, 7) * 9;
    std::uint64_t const t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  /// Uniform in [0, 1): the top 53 bits of one output, times 2^-53 (exact in double).
  constexpr double uniform_double() noexcept { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  /// Uniform in [0, 1): the top 24 bits of one output, times 2^-24 (exact in float).
  constexpr float uniform_float() noexcept { return static_cast<float>(next_u64() >> 40) * 0x1.0p-24f; }

 private:
  static constexpr std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
};

/// One token of a sampling distribution.
struct TokenProb {
  int id;
  double prob;
};

/// The distribution a draw is taken from: the tokens that survive temperature, top-k and
/// top-p, in ascending id, with probabilities (double) that add up to 1 (up to rounding).
/// Only logits[0, n_valid) count. `out` is overwritten; `scratch` is working space (both
/// kept by the caller so that repeated calls do not allocate).
template <class T>
void sampling_distribution(std::span<T const> logits, int n_valid, SamplingOptions const& opt,
                           std::vector<TokenProb>& out, std::vector<TokenProb>& scratch) {
  require(n_valid > 0, "sampling: n_valid must be positive, got ", n_valid);
  require(logits.size() >= static_cast<std::size_t>(n_valid), "sampling: ", logits.size(),
          " logits given, but the first n_valid = ", n_valid, " are needed");
  out.clear();
  constexpr double inf = std::numeric_limits<double>::infinity();

  // 1. max, NaN check, greedy (first maximum = lowest id among ties)
  int arg = -1;
  double mx = -inf;
  for (int i = 0; i < n_valid; ++i) {
    double const x = static_cast<double>(logits[i]);
    if (std::isnan(x)) fail("sampling: logit ", i, " is NaN (the model produced NaN)");
    if (x > mx) { mx = x; arg = i; }
  }
  require(arg >= 0, "sampling: all ", n_valid, " logits are -inf, no token can be drawn");
  if (opt.temperature == 0.0f) {
    out.push_back({arg, 1.0});
    return;
  }

  // 2. scaled logits z <= 0 (the +inf case: the +inf tokens get z = 0, the others -inf)
  double const temp = static_cast<double>(opt.temperature);
  auto scaled = [&](int i) {
    double const x = static_cast<double>(logits[i]);
    if (mx == inf) return x == inf ? 0.0 : -inf;
    return (x - mx) / temp;  // x = -inf gives -inf; never NaN since mx is finite here
  };
  scratch.clear();
  for (int i = 0; i < n_valid; ++i) {
    double const z = scaled(i);
    if (z != -inf) scratch.push_back({i, z});  // prob 0 tokens are never kept
  }
  // total order: larger z first, then lower id (z is a monotone function of the logit)
  auto before = [](TokenProb const& a, TokenProb const& b) { return a.prob > b.prob || (a.prob == b.prob && a.id < b.id); };

  // 3. top-k
  bool sorted = false;
  if (opt.top_k > 0 && static_cast<std::size_t>(opt.top_k) < scratch.size()) {
    std::partial_sort(scratch.begin(), scratch.begin() + opt.top_k, scratch.end(), before);
    scratch.resize(static_cast<std::size_t>(opt.top_k));
    sorted = true;
  }

  // 4. softmax (the largest kept z is 0, so the sum is >= 1)
  double sum = 0;
  for (auto& t : scratch) { t.prob = std::exp(t.prob); sum += t.prob; }
  for (auto& t : scratch) t.prob /= sum;

  // 5. top-p: the smallest prefix (most probable first) with cumulative probability >= p
  if (opt.top_p < 1.0f) {
    if (!sorted) std::sort(scratch.begin(), scratch.end(), before);  // same order as by z
    double const p = static_cast<double>(opt.top_p);
    double cum = 0;
    std::size_t keep = scratch.size();
    for (std::size_t i = 0; i < scratch.size(); ++i) {
      cum += scratch[i].prob;
      if (cum >= p) { keep = i + 1; break; }
    }
    scratch.resize(keep);
    double kept = 0;
    for (auto const& t : scratch) kept += t.prob;
    for (auto& t : scratch) t.prob /= kept;
    sorted = true;
  }
  if (sorted) std::sort(scratch.begin(), scratch.end(), [](TokenProb const& a, TokenProb const& b) { return a.id < b.id; });
  out.swap(scratch);
}

/// Draws the next token of each sequence of a batch; sequence b uses its own stream, seeded
/// from (options.seed, b). Not thread-safe (each sequence's stream advances on every draw);
/// use one Sampler per thread.
class Sampler {
 public:
  /// n_valid: how many leading logits are real tokens (256 for a byte model whose head is
  /// padded to a multiple of 8; the full vocabulary for a tokenized model).
  Sampler(SamplingOptions const& options, int batch, int n_valid = 256) : opt_(options), n_valid_(n_valid) {
    opt_.validate();
    require(batch > 0, "sampler: batch must be positive, got ", batch);
    require(n_valid > 0, "sampler: n_valid must be positive, got ", n_valid);
    rng_.reserve(static_cast<std::size_t>(batch));
    for (int b = 0; b < batch; ++b) rng_.push_back(Rng::stream(opt_.seed, static_cast<std::uint64_t>(b)));
  }

  SamplingOptions const& options() const { return opt_; }
  int batch() const { return static_cast<int>(rng_.size()); }
  int n_valid() const { return n_valid_; }
  /// The generator of sequence b.
  Rng& rng(int b) { check_sequence(b); return rng_[static_cast<std::size_t>(b)]; }

  /// A token for sequence b from its logits (at least n_valid of them; the rest are ignored).
  /// A draw from a one-token distribution (greedy, top_k = 1, ...) does not advance the
  /// stream; every other draw advances it by exactly one 64-bit output.
  template <class T>
  int sample(std::span<T const> logits, int b) {
    check_sequence(b);
    sampling_distribution(logits, n_valid_, opt_, dist_, scratch_);
    if (dist_.size() == 1) return dist_.front().id;
    double const u = rng_[static_cast<std::size_t>(b)].uniform_double();
    double cum = 0;
    for (auto const& t : dist_) {
      cum += t.prob;
      if (u < cum) return t.id;
    }
    for (auto it = dist_.rbegin(); it != dist_.rend(); ++it)  // u within rounding of 1:
      if (it->prob > 0) return it->id;                          // the last token that can be drawn
    return dist_.back().id;
  }
  template <class T>
  int sample(std::vector<T> const& logits, int b) { return sample(std::span<T const>(logits), b); }

  /// One token per sequence from logits (batch, vocab_stride), row-major.
  template <class T>
  std::vector<int> sample_batch(std::span<T const> logits, int vocab_stride) {
    std::vector<int> out(rng_.size());
    sample_batch(logits, vocab_stride, std::span<int>(out));
    return out;
  }
  template <class T>
  std::vector<int> sample_batch(std::vector<T> const& logits, int vocab_stride) {
    return sample_batch(std::span<T const>(logits), vocab_stride);
  }
  /// As above, into `out` (batch elements), without allocating.
  template <class T, class I>
  void sample_batch(std::span<T const> logits, int vocab_stride, std::span<I> out) {
    require(vocab_stride >= n_valid_, "sampler: vocab_stride (", vocab_stride, ") is smaller than n_valid (", n_valid_, ")");
    require(logits.size() == rng_.size() * static_cast<std::size_t>(vocab_stride), "sampler: expected batch*vocab_stride = ",
            rng_.size() * static_cast<std::size_t>(vocab_stride), " logits, got ", logits.size());
    require(out.size() == rng_.size(), "sampler: output has ", out.size(), " elements for a batch of ", rng_.size());
    for (std::size_t b = 0; b < rng_.size(); ++b)
      out[b] = static_cast<I>(sample(logits.subspan(b * static_cast<std::size_t>(vocab_stride), static_cast<std::size_t>(vocab_stride)),
                                     static_cast<int>(b)));
  }

 private:
  void check_sequence(int b) const {
    require(b >= 0 && static_cast<std::size_t>(b) < rng_.size(), "sampler: sequence ", b, " outside the batch [0, ", rng_.size(), ")");
  }

  SamplingOptions opt_;
  int n_valid_;
  std::vector<Rng> rng_;
  std::vector<TokenProb> dist_, scratch_;
};

}  // namespace mambabyte
