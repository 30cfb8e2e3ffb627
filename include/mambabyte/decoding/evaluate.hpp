/*! \file
 *  \brief Bits per byte of a byte-level model on a text: every byte after the first is
 *         predicted from its whole prefix (there is no BOS, so the first byte is context
 *         only). The data is fed in chunks through one batch-1 InferenceState carried from
 *         chunk to chunk, so the result is that of one forward over the whole text while
 *         memory stays bounded by the chunk size.
 *
 *  bits_per_byte = sum_{i=1}^{n-1} -log2 softmax(logits(data[0..i-1]))[data[i]] / (n - 1),
 *  the softmax taken over the first 256 logits only (rows a padded head adds are ignored),
 *  in double whatever the model's dtype.
 */
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numbers>
#include <span>
#include <vector>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/model/state.hpp"

namespace mambabyte {

struct EvalOptions {
  int chunk = 4096;             ///< bytes per forward (bounds logits and scratch memory)
  std::int64_t max_bytes = -1;  ///< read at most this many bytes of the data; negative = all
  /// Called after each chunk with (bytes predicted so far, bytes to predict in all).
  std::function<void(std::int64_t, std::int64_t)> progress;
};

struct EvalResult {
  double bits_per_byte = 0;         ///< nll_nats_sum / ln 2 / bytes_predicted
  std::int64_t bytes_predicted = 0; ///< bytes read - 1
  double nll_nats_sum = 0;          ///< total negative log-likelihood, in nats
  double seconds = 0;               ///< wall time of the whole evaluation
  double bytes_per_second = 0;      ///< bytes_predicted / seconds
};

namespace detail {
/// -log softmax(logits[0..255])[target], in double, stable (max subtracted).
template <class T>
double byte_nll(T const* logits, int target) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int v = 0; v < 256; ++v) mx = std::max(mx, static_cast<double>(logits[v]));
  double sum = 0;
  for (int v = 0; v < 256; ++v) sum += std::exp(static_cast<double>(logits[v]) - mx);
  return mx + std::log(sum) - static_cast<double>(logits[target]);
}
}  // namespace detail

/// Bits per byte of `model` on `data` (see the file comment). Throws mambabyte::Error for
/// fewer than 2 bytes, a bad chunk size, or NaN logits (naming the byte).
template <class Model>
EvalResult evaluate_bits_per_byte(Model& model, std::span<std::uint8_t const> data, EvalOptions const& options = {}) {
  using T = typename Model::value_type;
  auto const t0 = std::chrono::steady_clock::now();
  require(options.chunk > 0, "evaluate: chunk must be positive, got ", options.chunk);
  std::int64_t n = static_cast<std::int64_t>(data.size());
  if (options.max_bytes >= 0) n = std::min(n, options.max_bytes);
  require(n >= 2, "evaluate: need at least 2 bytes (the first is context only), got ", n,
          options.max_bytes >= 0 && static_cast<std::int64_t>(data.size()) > n ? " after max_bytes" : "");
  int const V = model.config().vocab_size;
  require(V >= 256, "evaluate: the model's vocabulary (", V, ") is smaller than 256 bytes");

  // Inputs are data[0 .. n-2]; the logits at input position i predict data[i + 1] (at the
  // end of a chunk: the first byte of the next chunk).
  std::int64_t const inputs = n - 1;
  std::int64_t const chunk = std::min<std::int64_t>(options.chunk, inputs);
  InferenceState<T> state = model.make_state(1);
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(chunk));
  aligned_vector<T> logits(static_cast<std::size_t>(chunk) * static_cast<std::size_t>(V));
  double nll = 0;
  for (std::int64_t start = 0; start < inputs; start += chunk) {
    std::int64_t const len = std::min(chunk, inputs - start);
    for (std::int64_t i = 0; i < len; ++i) tokens[static_cast<std::size_t>(i)] = data[static_cast<std::size_t>(start + i)];
    std::size_t const ulen = static_cast<std::size_t>(len);
    model.forward(std::span<std::int32_t const>(tokens.data(), ulen), 1, static_cast<int>(len), &state,
                  std::span<T>(logits.data(), ulen * static_cast<std::size_t>(V)));
    for (std::int64_t i = 0; i < len; ++i) {
      double const x = detail::byte_nll(logits.data() + static_cast<std::size_t>(i) * V,
                                        data[static_cast<std::size_t>(start + i + 1)]);
      require(!std::isnan(x), "evaluate: the model produced NaN logits predicting byte ", start + i + 1);
      nll += x;
    }
    if (options.progress) options.progress(start + len, inputs);
  }

  EvalResult r;
  r.bytes_predicted = inputs;
  r.nll_nats_sum = nll;
  r.bits_per_byte = nll / std::numbers::ln2 / static_cast<double>(inputs);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.bytes_per_second = r.seconds > 0 ? static_cast<double>(inputs) / r.seconds : 0.0;
  return r;
}

}  // namespace mambabyte
