/*! \file
 *  \brief TrainingModel: one training step of a Mamba LM on a backend: the forward pass that
 *         keeps what the backward needs, the mean next-byte cross-entropy, and the backward pass
 *         that accumulates every parameter's gradient into a ModelWeights-shaped buffer.
 *
 *  Input: tokens (batch, L+1), row-major int32. Predictions: logits[:, :256] at positions
 *  0..L-1 of tokens[:, :-1]; targets tokens[:, 1:]. loss = mean over the batch*L predictions of
 *  -log softmax(logits[:256])[target] (natural log). Only the first 256 rows of the head are
 *  evaluated: the logits of a padded vocabulary's extra rows never enter the loss, so their
 *  head rows get a zero gradient.
 *
 *  The gradient container is a second ModelWeights<T> of the same config (make_gradients());
 *  gradients are ADDED to it (call zero_grad() between optimiser steps), so micro-batches
 *  accumulate. With tied embeddings the head and the embedding are the same tensor in both
 *  containers, and the head's gradient lands in the embedding's.
 *
 *  What the forward keeps (M = batch*L rows, elements of T):
 *    per layer l:   r_l    (M, d_model)   the residual after the add = the norm's input
 *                   xz_l   (M, 2*d_inner) in_proj output: x before the conv (conv backward) and z
 *                   xdbl_l (M, dt_rank + 2*d_state) x_proj output: dt (dt_proj's input), B, C
 *    after the last layer: r_L (M, d_model) for norm_f.
 *  Recomputed in the backward instead of kept: the normed activations (one norm per row), the
 *  conv+SiLU output u (d_conv MACs per element), dt = dt_proj(dt) (dt_rank MACs per element), the
 *  scan's states (checkpointed inside the scan backward) and its output y (a by-product of the
 *  scan backward, used for out_proj's weight gradient after the scan).
 *  Shared scratch (one layer at a time): normed, hidden/dnormed, dresidual (3 x M x d_model),
 *  u, dt, y, dy, du, ddelta (6 x M x d_inner), dxz (M x 2*d_inner), dxdbl (M x X), logits
 *  (M x 256), A and dA (2 x d_inner x d_state), tokens (2 x M int32).
 *
 *  Activation bytes of a step (X = dt_rank + 2*d_state):
 *      sizeof(T) * M * [ (n_layer + 1) * d_model + n_layer * (2*d_inner + X)      (kept)
 *                        + 3*d_model + 8*d_inner + X + 256 ]                         (scratch)
 *    + sizeof(T) * 2 * d_inner * d_state + 8 * M + scan backward workspace
 *  (activation_bytes_formula() computes it; activation_bytes() reports what the last step
 *  actually allocated; the tests check they agree). The scan workspace is O(batch * d_inner *
 *  d_state * L / chunk), see backend/cpu/selective_scan_backward.hpp.
 *
 *  A TrainingModel owns its scratch, so one object must not run two steps at once.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/backend/cpu/layers.hpp"
#include "mambabyte/backend/cpu/layers_backward.hpp"
#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "mambabyte/backend/cpu/selective_scan_backward.hpp"
#include "mambabyte/model/weights.hpp"

namespace mambabyte {

template <class T, class ScanPolicy = scan::Auto, class Backend = backend::Cpu>
class TrainingModel {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "the CPU training model runs in float or double");

 public:
  using value_type = T;
  using scan_policy = ScanPolicy;
  static constexpr int kClasses = 256;  ///< byte predictions: the first 256 logits

  explicit TrainingModel(Backend backend = {}) : be_(backend) {}

  Backend const& backend() const { return be_; }
  void set_backend(Backend const& b) { be_ = b; }

  /// A zeroed gradient container for a config (same layout as its ModelWeights).
  static ModelWeights<T> make_gradients(ModelConfig const& c) { return ModelWeights<T>(c); }
  /// Zero a gradient container.
  static void zero_grad(ModelWeights<T>& g) { std::fill(g.flat().begin(), g.flat().end(), T(0)); }

  /// Forward + backward on tokens (batch, L+1): returns the mean cross-entropy (natural log) and
  /// ADDS grad_scale * d(loss)/d(parameters) into `grad`.
  double forward_backward(ModelWeights<T> const& w, std::span<std::int32_t const> tokens, int batch,
                          ModelWeights<T>& grad, double grad_scale = 1.0) {
    check_gradients(w, grad);
    double const loss = forward(w, tokens, batch, true, grad_scale);
    backward(w, grad);
    return loss;
  }

  /// The mean cross-entropy only (the same forward, no gradients).
  double loss(ModelWeights<T> const& w, std::span<std::int32_t const> tokens, int batch) {
    return forward(w, tokens, batch, false, 1.0);
  }

  /// Bytes of activations and scratch the last step allocated (weights and gradients excluded).
  std::size_t activation_bytes() const {
    return (saved_.capacity() + normed_.capacity() + hidden_.capacity() + dres_.capacity() + u_.capacity() +
            dt_.capacity() + y_.capacity() + dy_.capacity() + du_.capacity() + ddt_.capacity() + dxz_.capacity() +
            dxdbl_.capacity() + logits_.capacity() + A_.capacity() + dA_.capacity()) * sizeof(T) +
           (in_.capacity() + tgt_.capacity()) * sizeof(std::int32_t) + ws_.capacity();
  }

  /// The formula in the file comment, for a step of (batch, length) on this backend.
  static std::size_t activation_bytes_formula(ModelConfig const& c, int batch, int length, Backend const& be = {}) {
    std::size_t const M = static_cast<std::size_t>(batch) * length;
    std::size_t const dm = c.d_model, di = c.d_inner(), X = c.x_proj_out(), nl = c.n_layer;
    std::size_t const elems = M * ((nl + 1) * dm + nl * (2 * di + X) + 3 * dm + 8 * di + X + kClasses) +
                              2 * di * c.d_state;
    return elems * sizeof(T) + 2 * M * sizeof(std::int32_t) + scan_workspace_bytes(c, batch, length, be);
  }

  /// Bytes of the scan workspace of a step (the larger of forward and backward).
  static std::size_t scan_workspace_bytes(ModelConfig const& c, int batch, int length, Backend const& be = {}) {
    auto const sa = scan_args(c, batch, length, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    auto ba = ssm::SelectiveScanBackwardArguments<T>::from_forward(sa);
    return std::max(ssm::SelectiveScan<Backend, T, ScanPolicy>::workspace_bytes(sa, be),
                    ssm::SelectiveScanBackward<Backend, T, ScanPolicy>::workspace_bytes(ba, be));
  }

 private:
  // ---- shapes and views -------------------------------------------------------------------
  /// Forward scan arguments of a layer (pointers filled by the caller; shapes and strides here).
  static ssm::SelectiveScanArguments<T> scan_args(ModelConfig const& c, int batch, int length, T const* u,
                                                  T const* dt, T const* dt_bias, T const* A, T const* xdbl,
                                                  T const* D, T const* xz) {
    int const di = c.d_inner(), N = c.d_state, R = c.dt_rank, X = c.x_proj_out();
    ssm::SelectiveScanArguments<T> sa;
    sa.batch = batch; sa.length = length; sa.d_inner = di; sa.d_state = N;
    sa.u = u; sa.ld_u = di;
    sa.delta = dt; sa.ld_delta = di; sa.delta_bias = dt_bias; sa.delta_softplus = true;
    sa.A = A;
    sa.B = xdbl ? xdbl + R : nullptr; sa.ld_B = X;
    sa.C = xdbl ? xdbl + R + N : nullptr; sa.ld_C = X;
    sa.D = D;
    sa.z = xz ? xz + di : nullptr; sa.ld_z = 2 * di;
    sa.ld_out = di;
    return sa;
  }

  T* r_at(int l) { return saved_.data() + static_cast<std::size_t>(l) * M_ * cfg_dm_; }
  T* xz_at(int l) { return saved_.data() + (n_layer_ + 1) * M_ * cfg_dm_ + static_cast<std::size_t>(l) * M_ * 2 * di_; }
  T* xdbl_at(int l) {
    return saved_.data() + (n_layer_ + 1) * M_ * cfg_dm_ + n_layer_ * M_ * 2 * di_ + static_cast<std::size_t>(l) * M_ * X_;
  }

  static void check_gradients(ModelWeights<T> const& w, ModelWeights<T> const& g) {
    require(g.flat().size() == w.flat().size() && g.parameters().size() == w.parameters().size() &&
                g.config().to_json() == w.config().to_json() && g.config().norm_eps == w.config().norm_eps,
            "training: the gradient container's config differs from the weights' (make it with make_gradients())");
  }

  void compute_A(LayerWeights<T> const& lw) {
    std::size_t const n = di_ * N_;
    for (std::size_t i = 0; i < n; ++i) A_[i] = -std::exp(lw.A_log[i]);
  }

  /// Size a buffer to n elements; a buffer that must grow is reallocated to exactly n, so that
  /// activation_bytes() reports what a step of this size needs, not a growth policy's slack.
  template <class V>
  static void fit(aligned_vector<V>& v, std::size_t n) {
    if (v.capacity() < n) v = aligned_vector<V>(n);
    else v.resize(n);
  }

  // ---- forward ----------------------------------------------------------------------------
  double forward(ModelWeights<T> const& w, std::span<std::int32_t const> tokens, int batch, bool keep_grad,
                 double grad_scale) {
    ModelConfig const& c = w.config();
    require(batch > 0, "training: batch must be positive (got ", batch, ")");
    require(tokens.size() % static_cast<std::size_t>(batch) == 0, "training: ", tokens.size(),
            " tokens do not split into ", batch, " sequences of equal length");
    std::size_t const per = tokens.size() / static_cast<std::size_t>(batch);
    require(per >= 2, "training: every sequence needs at least 2 tokens (inputs + next-byte targets), got ", per);
    int const L = static_cast<int>(per - 1);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      bool const is_target = i % per != 0;
      int const lim = is_target ? kClasses : c.vocab_size;
      require(tokens[i] >= 0 && tokens[i] < lim, "training: token ", tokens[i], " at position ", i, " outside [0, ",
              lim, ")", is_target ? " (targets are bytes)" : "");
    }
    batch_ = batch; L_ = L;
    M_ = static_cast<std::size_t>(batch) * L;
    n_layer_ = static_cast<std::size_t>(c.n_layer);
    cfg_dm_ = static_cast<std::size_t>(c.d_model);
    di_ = static_cast<std::size_t>(c.d_inner());
    N_ = static_cast<std::size_t>(c.d_state);
    X_ = static_cast<std::size_t>(c.x_proj_out());
    int const dm = c.d_model, di = c.d_inner(), R = c.dt_rank, X = c.x_proj_out();
    int const Mi = static_cast<int>(M_);
    require(M_ <= static_cast<std::size_t>(std::numeric_limits<int>::max()), "training: batch*length too large");

    fit(in_, M_);
    fit(tgt_, M_);
    for (int b = 0; b < batch; ++b)
      for (int t = 0; t < L; ++t) {
        in_[static_cast<std::size_t>(b) * L + t] = tokens[b * per + t];
        tgt_[static_cast<std::size_t>(b) * L + t] = tokens[b * per + t + 1];
      }
    fit(saved_, (n_layer_ + 1) * M_ * cfg_dm_ + n_layer_ * M_ * (2 * di_ + X_));
    fit(normed_, M_ * cfg_dm_);
    fit(hidden_, M_ * cfg_dm_);
    fit(u_, M_ * di_);
    fit(dt_, M_ * di_);
    fit(y_, M_ * di_);
    fit(logits_, M_ * kClasses);
    fit(A_, di_ * N_);
    fit(ws_, scan_workspace_bytes(c, batch, L, be_));  // forward and backward scans share it

    layers::Embedding<Backend, T>::run({Mi, dm, c.vocab_size, in_.data(), w.embedding, hidden_.data()}, nullptr, be_);
    std::fill(r_at(0), r_at(0) + M_ * cfg_dm_, T(0));
    for (int l = 0; l < c.n_layer; ++l) {
      LayerWeights<T> const& lw = w.layers[l];
      T* r = r_at(l);
      if (l > 0) std::copy(r_at(l - 1), r_at(l - 1) + M_ * cfg_dm_, r);
      layers::AddNorm<Backend, T>::run({Mi, dm, r, hidden_.data(), lw.norm_w, lw.norm_b, normed_.data(), c.norm_eps,
                                        c.rms_norm}, nullptr, be_);
      T* xz = xz_at(l);
      T* xdbl = xdbl_at(l);
      layers::Linear<Backend, T>::run({Mi, dm, 2 * di, normed_.data(), dm, lw.in_proj_w, lw.in_proj_b, xz, 2 * di}, nullptr, be_);
      layers::CausalConv1d<Backend, T>::run({batch, L, di, c.d_conv, xz, 2 * di, lw.conv_w, lw.conv_b, u_.data(), di,
                                             nullptr, true}, nullptr, be_);
      layers::Linear<Backend, T>::run({Mi, di, X, u_.data(), di, lw.x_proj_w, nullptr, xdbl, X}, nullptr, be_);
      layers::Linear<Backend, T>::run({Mi, R, di, xdbl, X, lw.dt_proj_w, nullptr, dt_.data(), di}, nullptr, be_);
      compute_A(lw);
      auto sa = scan_args(c, batch, L, u_.data(), dt_.data(), lw.dt_proj_b, A_.data(), xdbl, lw.D, xz);
      sa.out = y_.data();
      ssm::SelectiveScan<Backend, T, ScanPolicy>::run(sa, ws_.data(), be_);
      layers::Linear<Backend, T>::run({Mi, di, dm, y_.data(), di, lw.out_proj_w, lw.out_proj_b, hidden_.data(), dm},
                                      nullptr, be_);
    }
    T* rL = r_at(c.n_layer);
    std::copy(r_at(c.n_layer - 1), r_at(c.n_layer - 1) + M_ * cfg_dm_, rL);
    layers::AddNorm<Backend, T>::run({Mi, dm, rL, hidden_.data(), w.norm_f_w, w.norm_f_b, normed_.data(), c.norm_eps,
                                      c.rms_norm}, nullptr, be_);
    // logits of the 256 byte classes only (the first 256 rows of the head)
    layers::Linear<Backend, T>::run({Mi, dm, kClasses, normed_.data(), dm, w.lm_head, nullptr, logits_.data(), kClasses},
                                    nullptr, be_);
    layers::CrossEntropyArguments<T> ce;
    ce.rows = Mi; ce.classes = kClasses;
    ce.logits = logits_.data(); ce.ld_logits = kClasses;
    ce.targets = tgt_.data();
    if (keep_grad) { ce.dlogits = logits_.data(); ce.ld_dlogits = kClasses; }  // in place
    ce.grad_scale = grad_scale;
    return layers::CrossEntropy<Backend, T>::run(ce, nullptr, be_);
  }

  // ---- backward ---------------------------------------------------------------------------
  void backward(ModelWeights<T> const& w, ModelWeights<T>& g) {
    ModelConfig const& c = w.config();
    int const dm = c.d_model, di = c.d_inner(), R = c.dt_rank, X = c.x_proj_out(), N = c.d_state;
    int const Mi = static_cast<int>(M_), batch = batch_, L = L_;
    fit(dres_, M_ * cfg_dm_);
    std::fill(dres_.begin(), dres_.end(), T(0));
    fit(dy_, M_ * di_);
    fit(du_, M_ * di_);
    fit(ddt_, M_ * di_);
    fit(dxz_, M_ * 2 * di_);
    fit(dxdbl_, M_ * X_);
    fit(dA_, di_ * N_);
    T* const dnormed = hidden_.data();  // the forward's hidden is dead now

    // head: normed_ still holds norm_f's output; logits_ holds dlogits
    layers::LinearBackward<Backend, T>::run({Mi, dm, kClasses, normed_.data(), dm, w.lm_head, logits_.data(), kClasses,
                                             dnormed, dm, false, g.lm_head, nullptr}, nullptr, be_);
    layers::AddNormBackward<Backend, T>::run({Mi, dm, r_at(c.n_layer), w.norm_f_w, dnormed, dres_.data(), g.norm_f_w,
                                              g.norm_f_b, c.norm_eps, c.rms_norm}, nullptr, be_);
    for (int l = c.n_layer - 1; l >= 0; --l) {
      LayerWeights<T> const& lw = w.layers[l];
      LayerWeights<T>& lg = g.layers[l];
      T* const xz = xz_at(l);
      T* const xdbl = xdbl_at(l);
      // dres_ now holds dL/dhidden_l (the gradient of this block's output).
      // recompute u = silu(conv(x)) and dt = dt_proj(dt_in)
      layers::CausalConv1d<Backend, T>::run({batch, L, di, c.d_conv, xz, 2 * di, lw.conv_w, lw.conv_b, u_.data(), di,
                                             nullptr, true}, nullptr, be_);
      layers::Linear<Backend, T>::run({Mi, R, di, xdbl, X, lw.dt_proj_w, nullptr, dt_.data(), di}, nullptr, be_);
      compute_A(lw);
      // out_proj: dy = dhidden W_out (its weight gradient waits for the recomputed y)
      layers::LinearBackward<Backend, T>::run({Mi, di, dm, nullptr, 0, lw.out_proj_w, dres_.data(), dm, dy_.data(), di,
                                               false, nullptr, lg.out_proj_b}, nullptr, be_);
      // selective scan backward
      auto sa = scan_args(c, batch, L, u_.data(), dt_.data(), lw.dt_proj_b, A_.data(), xdbl, lw.D, xz);
      auto ba = ssm::SelectiveScanBackwardArguments<T>::from_forward(sa);
      ba.dout = dy_.data(); ba.ld_dout = di;
      ba.du = du_.data(); ba.ld_du = di;
      ba.ddelta = ddt_.data(); ba.ld_ddelta = di;
      ba.dB = dxdbl_.data() + R; ba.ld_dB = X;
      ba.dC = dxdbl_.data() + R + N; ba.ld_dC = X;
      ba.dz = dxz_.data() + di; ba.ld_dz = 2 * di;
      ba.out = y_.data(); ba.ld_out = di;
      std::fill(dA_.begin(), dA_.end(), T(0));
      ba.dA = dA_.data();
      ba.dD = lg.D;
      ba.ddelta_bias = lg.dt_proj_b;
      ssm::SelectiveScanBackward<Backend, T, ScanPolicy>::run(ba, ws_.data(), be_);
      for (std::size_t i = 0; i < di_ * N_; ++i) lg.A_log[i] += dA_[i] * A_[i];  // dA/dA_log = A
      // out_proj weight gradient with the recomputed y
      layers::LinearBackward<Backend, T>::run({Mi, di, dm, y_.data(), di, nullptr, dres_.data(), dm, nullptr, 0, false,
                                               lg.out_proj_w, nullptr}, nullptr, be_);
      // dt_proj: d(dt_in) into dxdbl[:, :R]
      layers::LinearBackward<Backend, T>::run({Mi, R, di, xdbl, X, lw.dt_proj_w, ddt_.data(), di, dxdbl_.data(), X,
                                               false, lg.dt_proj_w, nullptr}, nullptr, be_);
      // x_proj: du += dxdbl W_x
      layers::LinearBackward<Backend, T>::run({Mi, di, X, u_.data(), di, lw.x_proj_w, dxdbl_.data(), X, du_.data(), di,
                                               true, lg.x_proj_w, nullptr}, nullptr, be_);
      // conv + SiLU: dx into dxz[:, :di]
      layers::CausalConv1dBackwardArguments<T> cb;
      cb.batch = batch; cb.length = L; cb.channels = di; cb.width = c.d_conv;
      cb.x = xz; cb.ld_x = 2 * di; cb.weight = lw.conv_w; cb.bias = lw.conv_b; cb.silu = true;
      cb.dout = du_.data(); cb.ld_dout = di;
      cb.dx = dxz_.data(); cb.ld_dx = 2 * di;
      cb.dweight = lg.conv_w; cb.dbias = lg.conv_b;
      layers::CausalConv1dBackward<Backend, T>::run(cb, nullptr, be_);
      // in_proj: recompute its input (the norm of r_l), then dnormed = dxz W_in
      layers::AddNorm<Backend, T>::run({Mi, dm, r_at(l), nullptr, lw.norm_w, lw.norm_b, normed_.data(), c.norm_eps,
                                        c.rms_norm}, nullptr, be_);
      layers::LinearBackward<Backend, T>::run({Mi, dm, 2 * di, normed_.data(), dm, lw.in_proj_w, dxz_.data(), 2 * di,
                                               dnormed, dm, false, lg.in_proj_w, lg.in_proj_b}, nullptr, be_);
      // norm: dres_ += the gradient through the norm -> dL/dr_l = dL/dhidden_{l-1} = dL/dr_{l-1} (add)
      layers::AddNormBackward<Backend, T>::run({Mi, dm, r_at(l), lw.norm_w, dnormed, dres_.data(), lg.norm_w, lg.norm_b,
                                                c.norm_eps, c.rms_norm}, nullptr, be_);
    }
    // r_0 = embedding rows: scatter-add dL/dr_0 into the table (the head's, when tied)
    layers::EmbeddingBackward<Backend, T>::run({Mi, dm, c.vocab_size, in_.data(), dres_.data(), g.embedding}, nullptr, be_);
  }

  Backend be_;
  int batch_ = 0, L_ = 0;
  std::size_t M_ = 0, n_layer_ = 0, cfg_dm_ = 0, di_ = 0, N_ = 0, X_ = 0;
  aligned_vector<T> saved_;                                        // r_0..r_L, xz_l, xdbl_l
  aligned_vector<T> normed_, hidden_, dres_, u_, dt_, y_, dy_, du_, ddt_, dxz_, dxdbl_, logits_, A_, dA_;
  aligned_vector<std::int32_t> in_, tgt_;
  aligned_vector<std::byte> ws_;
};

}  // namespace mambabyte
