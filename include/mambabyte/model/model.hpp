/*! \file
 *  \brief Model: a Mamba LM (MambaByte when vocab = 256) on a backend, in a dtype, with a scan
 *         policy. The forward pass goes layer by layer through the operator contracts
 *         (Embedding, AddNorm, Linear, CausalConv1d, SelectiveScan); prefill and step are the
 *         same pass with the recurrent state carried in and out.
 *
 *  A Model owns scratch buffers, so one Model must not run two forwards at once; use one
 *  Model per thread of callers (they may share nothing but the weights' values).
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/backend/cpu/layers.hpp"
#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "mambabyte/model/state.hpp"
#include "mambabyte/model/weights.hpp"

namespace mambabyte {

template <class T, class ScanPolicy = scan::Auto, class Backend = backend::Cpu>
class Model {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "the CPU model runs in float or double");

 public:
  using value_type = T;
  using scan_policy = ScanPolicy;

  explicit Model(ModelWeights<T> weights, Backend backend = {})
      : w_(std::move(weights)), be_(backend) {
    refresh_derived();
  }

  ModelConfig const& config() const { return w_.config(); }
  ModelWeights<T> const& weights() const { return w_; }
  /// Mutable access; call refresh_derived() after changing A_log.
  ModelWeights<T>& mutable_weights() { return w_; }
  Backend const& backend() const { return be_; }
  void set_backend(Backend const& b) { be_ = b; }

  /// Recompute values derived from the weights (A = -exp(A_log)).
  void refresh_derived() {
    ModelConfig const& c = config();
    A_.assign(static_cast<std::size_t>(c.n_layer) * c.d_inner() * c.d_state, T(0));
    for (int l = 0; l < c.n_layer; ++l)
      for (std::size_t i = 0; i < static_cast<std::size_t>(c.d_inner()) * c.d_state; ++i)
        A_[static_cast<std::size_t>(l) * c.d_inner() * c.d_state + i] = -std::exp(w_.layers[l].A_log[i]);
  }

  InferenceState<T> make_state(int batch) const { return InferenceState<T>(config(), batch); }

  /// Logits (batch, length, vocab_size) for tokens (batch, length), row-major. With a state,
  /// the pass continues from it and leaves it at the end of the tokens (prefill); without,
  /// every sequence starts from zero.
  void forward(std::span<std::int32_t const> tokens, int batch, int length, InferenceState<T>* state,
               std::span<T> logits) {
    ModelConfig const& c = config();
    require(batch > 0 && length >= 0, "forward: batch must be positive and length non-negative");
    require(tokens.size() == static_cast<std::size_t>(batch) * length,
            "forward: expected batch*length = ", static_cast<std::size_t>(batch) * length, " tokens, got ", tokens.size());
    require(logits.size() == static_cast<std::size_t>(batch) * length * c.vocab_size,
            "forward: logits buffer has ", logits.size(), " elements, expected ",
            static_cast<std::size_t>(batch) * length * c.vocab_size);
    if (state) require(state->batch() == batch && state->n_layer() == c.n_layer,
                       "forward: state is for batch ", state->batch(), ", call has batch ", batch);
    for (auto t : tokens)
      require(t >= 0 && t < c.vocab_size, "forward: token ", t, " outside the vocabulary [0, ", c.vocab_size, ")");
    if (length == 0) return;
    run_layers(tokens.data(), batch, length, state);
    long const M = static_cast<long>(batch) * length;
    layers::Linear<Backend, T>::run({static_cast<int>(M), c.d_model, c.vocab_size, normed_.data(), c.d_model,
                                     w_.lm_head, nullptr, logits.data(), c.vocab_size}, nullptr, be_);
  }

  std::vector<T> forward(std::span<std::int32_t const> tokens, int batch, int length, InferenceState<T>* state = nullptr) {
    std::vector<T> logits(static_cast<std::size_t>(batch) * length * config().vocab_size);
    forward(tokens, batch, length, state, logits);
    return logits;
  }

  /// Prefill one sequence per state row; returns the logits of the last position (batch, vocab).
  std::vector<T> prefill(std::span<std::int32_t const> tokens, int batch, int length, InferenceState<T>& state) {
    require(length > 0, "prefill: the prompt is empty");
    auto all = forward(tokens, batch, length, &state);
    int const V = config().vocab_size;
    std::vector<T> last(static_cast<std::size_t>(batch) * V);
    for (int b = 0; b < batch; ++b)
      std::copy_n(all.begin() + (static_cast<std::ptrdiff_t>(b) * length + length - 1) * V, V, last.begin() + static_cast<std::ptrdiff_t>(b) * V);
    return last;
  }

  /// One decoding step: the next token of every sequence in, logits (batch, vocab) out.
  void step(std::span<std::int32_t const> tokens, InferenceState<T>& state, std::span<T> logits) {
    forward(tokens, state.batch(), 1, &state, logits);
  }
  std::vector<T> step(std::span<std::int32_t const> tokens, InferenceState<T>& state) {
    return forward(tokens, state.batch(), 1, &state);
  }

  /// Bytes of scratch the last forward used (activations; weights excluded).
  std::size_t scratch_bytes() const {
    return (residual_.capacity() + hidden_.capacity() + normed_.capacity() + xz_.capacity() + xc_.capacity() +
            xdbl_.capacity() + dt_.capacity() + y_.capacity()) * sizeof(T) + ws_.capacity();
  }

 private:
  void run_layers(std::int32_t const* tokens, int batch, int length, InferenceState<T>* state) {
    ModelConfig const& c = config();
    std::size_t const M = static_cast<std::size_t>(batch) * length;
    int const dm = c.d_model, di = c.d_inner(), N = c.d_state, R = c.dt_rank, X = c.x_proj_out();
    int const Mi = static_cast<int>(M);
    residual_.assign(M * dm, T(0));
    hidden_.resize(M * dm);
    normed_.resize(M * dm);
    xz_.resize(M * 2 * di);
    xc_.resize(M * di);
    xdbl_.resize(M * X);
    dt_.resize(M * di);
    y_.resize(M * di);

    layers::Embedding<Backend, T>::run({Mi, dm, c.vocab_size, tokens, w_.embedding, hidden_.data()}, nullptr, be_);
    for (int l = 0; l < c.n_layer; ++l) {
      LayerWeights<T> const& lw = w_.layers[l];
      layers::AddNorm<Backend, T>::run({Mi, dm, residual_.data(), hidden_.data(), lw.norm_w, lw.norm_b, normed_.data(),
                                        c.norm_eps, c.rms_norm}, nullptr, be_);
      layers::Linear<Backend, T>::run({Mi, dm, 2 * di, normed_.data(), dm, lw.in_proj_w, lw.in_proj_b, xz_.data(), 2 * di},
                                      nullptr, be_);
      layers::CausalConv1d<Backend, T>::run({batch, length, di, c.d_conv, xz_.data(), 2 * di, lw.conv_w, lw.conv_b,
                                             xc_.data(), di, state ? state->conv(l) : nullptr, true}, nullptr, be_);
      layers::Linear<Backend, T>::run({Mi, di, X, xc_.data(), di, lw.x_proj_w, nullptr, xdbl_.data(), X}, nullptr, be_);
      layers::Linear<Backend, T>::run({Mi, R, di, xdbl_.data(), X, lw.dt_proj_w, nullptr, dt_.data(), di}, nullptr, be_);
      ssm::SelectiveScanArguments<T> sa;
      sa.batch = batch; sa.length = length; sa.d_inner = di; sa.d_state = N;
      sa.u = xc_.data(); sa.ld_u = di;
      sa.delta = dt_.data(); sa.ld_delta = di; sa.delta_bias = lw.dt_proj_b; sa.delta_softplus = true;
      sa.A = A_.data() + static_cast<std::size_t>(l) * di * N;
      sa.B = xdbl_.data() + R; sa.ld_B = X;
      sa.C = xdbl_.data() + R + N; sa.ld_C = X;
      sa.D = lw.D;
      sa.z = xz_.data() + di; sa.ld_z = 2 * di;
      sa.out = y_.data(); sa.ld_out = di;
      if (state) { sa.initial_state = state->ssm(l); sa.final_state = state->ssm(l); }
      using Scan = ssm::SelectiveScan<Backend, T, ScanPolicy>;
      ws_.resize(Scan::workspace_bytes(sa, be_));
      Scan::run(sa, ws_.data(), be_);
      layers::Linear<Backend, T>::run({Mi, di, dm, y_.data(), di, lw.out_proj_w, lw.out_proj_b, hidden_.data(), dm},
                                      nullptr, be_);
    }
    layers::AddNorm<Backend, T>::run({Mi, dm, residual_.data(), hidden_.data(), w_.norm_f_w, w_.norm_f_b, normed_.data(),
                                      c.norm_eps, c.rms_norm}, nullptr, be_);
  }

  ModelWeights<T> w_;
  Backend be_;
  aligned_vector<T> A_;  // (n_layer, d_inner, d_state): -exp(A_log)
  aligned_vector<T> residual_, hidden_, normed_, xz_, xc_, xdbl_, dt_, y_;
  aligned_vector<std::byte> ws_;
};

/// Bytes -> token ids.
inline std::vector<std::int32_t> bytes_to_tokens(std::string_view s) {
  std::vector<std::int32_t> t(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) t[i] = static_cast<unsigned char>(s[i]);
  return t;
}

}  // namespace mambabyte
