/*! \file
 *  \brief The reference oracle: a plain, obviously-correct double-precision transcription of
 *         the model math (DESIGN.md section 2), with loops in the order of the formulas and no
 *         cleverness. Every backend x dtype x scan policy is tested against it.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "mambabyte/model/weights.hpp"
#include "mambabyte/ssm/scan_op.hpp"
#include "mambabyte/ssm/selective_scan.hpp"

namespace mambabyte::reference {

/// Sequential selective scan in double, straight from the formulas.
inline void selective_scan(ssm::SelectiveScanArguments<double> const& a) {
  int const N = a.d_state;
  for (int b = 0; b < a.batch; ++b)
    for (int d = 0; d < a.d_inner; ++d) {
      std::vector<double> h(static_cast<std::size_t>(N), 0.0);
      if (a.initial_state)
        for (int n = 0; n < N; ++n) h[n] = a.initial_state[(static_cast<std::int64_t>(b) * a.d_inner + d) * N + n];
      for (int t = 0; t < a.length; ++t) {
        std::int64_t const row = static_cast<std::int64_t>(b) * a.length + t;
        double dt = a.delta[row * a.ld_delta + d] + (a.delta_bias ? a.delta_bias[d] : 0.0);
        if (a.delta_softplus) dt = ssm::softplus(dt);
        double const u = a.u[row * a.ld_u + d];
        double y = 0;
        for (int n = 0; n < N; ++n) {
          h[n] = std::exp(dt * a.A[d * N + n]) * h[n] + dt * u * a.B[row * a.ld_B + n];
          y += h[n] * a.C[row * a.ld_C + n];
        }
        if (a.D) y += a.D[d] * u;
        if (a.z) y *= ssm::silu(a.z[row * a.ld_z + d]);
        a.out[row * a.ld_out + d] = y;
      }
      if (a.final_state)
        for (int n = 0; n < N; ++n) a.final_state[(static_cast<std::int64_t>(b) * a.d_inner + d) * N + n] = h[n];
    }
}

/// Per-sequence recurrent state of the reference model (conv inputs oldest first).
struct State {
  std::vector<std::vector<double>> conv;  ///< [layer] (d_inner, d_conv-1)
  std::vector<std::vector<double>> ssm;   ///< [layer] (d_inner, d_state)
};

inline State empty_state(ModelConfig const& c) {
  State s;
  for (int i = 0; i < c.n_layer; ++i) {
    s.conv.emplace_back(static_cast<std::size_t>(c.d_inner()) * (c.d_conv - 1), 0.0);
    s.ssm.emplace_back(static_cast<std::size_t>(c.d_inner()) * c.d_state, 0.0);
  }
  return s;
}

namespace detail {
inline void norm(ModelConfig const& c, double const* x, double const* w, double const* b, double* out) {
  int const D = c.d_model;
  if (c.rms_norm) {
    double ms = 0;
    for (int i = 0; i < D; ++i) ms += x[i] * x[i];
    double const r = 1.0 / std::sqrt(ms / D + c.norm_eps);
    for (int i = 0; i < D; ++i) out[i] = x[i] * r * w[i];
  } else {
    double mean = 0, var = 0;
    for (int i = 0; i < D; ++i) mean += x[i];
    mean /= D;
    for (int i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= D;
    double const r = 1.0 / std::sqrt(var + c.norm_eps);
    for (int i = 0; i < D; ++i) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.0);
  }
}
/// y(rows, n) = x(rows, k) W(n, k)^T + bias
inline void linear(int rows, int n, int k, double const* x, double const* W, double const* bias, double* y) {
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < n; ++o) {
      double s = bias ? bias[o] : 0.0;
      for (int i = 0; i < k; ++i) s += x[static_cast<std::int64_t>(r) * k + i] * W[static_cast<std::int64_t>(o) * k + i];
      y[static_cast<std::int64_t>(r) * n + o] = s;
    }
}
}  // namespace detail

/// Logits (length, vocab_size) of one sequence, continuing from `state` (updated in place).
inline std::vector<double> forward(ModelWeights<double> const& w, std::vector<int> const& tokens, State& state) {
  ModelConfig const& c = w.config();
  int const L = static_cast<int>(tokens.size()), dm = c.d_model, di = c.d_inner(), N = c.d_state,
            R = c.dt_rank, K = c.d_conv, V = c.vocab_size;
  std::vector<double> residual(static_cast<std::size_t>(L) * dm, 0.0), hidden(residual.size()), normed(residual.size());
  for (int t = 0; t < L; ++t)
    for (int i = 0; i < dm; ++i) hidden[static_cast<std::size_t>(t) * dm + i] = w.embedding[static_cast<std::int64_t>(tokens[t]) * dm + i];
  for (int l = 0; l < c.n_layer; ++l) {
    auto const& lw = w.layers[l];
    for (std::size_t i = 0; i < residual.size(); ++i) residual[i] += hidden[i];
    for (int t = 0; t < L; ++t) detail::norm(c, &residual[static_cast<std::size_t>(t) * dm], lw.norm_w, lw.norm_b, &normed[static_cast<std::size_t>(t) * dm]);
    std::vector<double> xz(static_cast<std::size_t>(L) * 2 * di);
    detail::linear(L, 2 * di, dm, normed.data(), lw.in_proj_w, lw.in_proj_b, xz.data());
    // causal depthwise conv over [conv_state ; x], then SiLU
    std::vector<double> x(static_cast<std::size_t>(L) * di);
    auto& cs = state.conv[l];
    for (int d = 0; d < di; ++d) {
      for (int t = 0; t < L; ++t) {
        double s = lw.conv_b ? lw.conv_b[d] : 0.0;
        for (int k = 0; k < K; ++k) {
          int const src = t - (K - 1) + k;  // time index of the input multiplied by tap k
          double const in = src >= 0 ? xz[static_cast<std::size_t>(src) * 2 * di + d] : cs[static_cast<std::size_t>(d) * (K - 1) + (K - 1 + src)];
          s += lw.conv_w[static_cast<std::int64_t>(d) * K + k] * in;
        }
        x[static_cast<std::size_t>(t) * di + d] = ssm::silu(s);
      }
      // new conv state: the last K-1 inputs of [old state ; x]
      std::vector<double> hist(cs.begin() + static_cast<std::ptrdiff_t>(d) * (K - 1), cs.begin() + static_cast<std::ptrdiff_t>(d + 1) * (K - 1));
      for (int t = 0; t < L; ++t) hist.push_back(xz[static_cast<std::size_t>(t) * 2 * di + d]);
      for (int k = 0; k < K - 1; ++k) cs[static_cast<std::size_t>(d) * (K - 1) + k] = hist[hist.size() - (K - 1) + k];
    }
    std::vector<double> xdbl(static_cast<std::size_t>(L) * (R + 2 * N)), dt(static_cast<std::size_t>(L) * di);
    detail::linear(L, R + 2 * N, di, x.data(), lw.x_proj_w, nullptr, xdbl.data());
    // dt_proj without its bias: the bias goes into the scan as delta_bias
    for (int t = 0; t < L; ++t)
      for (int d = 0; d < di; ++d) {
        double s = 0;
        for (int r = 0; r < R; ++r) s += xdbl[static_cast<std::size_t>(t) * (R + 2 * N) + r] * lw.dt_proj_w[static_cast<std::int64_t>(d) * R + r];
        dt[static_cast<std::size_t>(t) * di + d] = s;
      }
    std::vector<double> A(static_cast<std::size_t>(di) * N), y(static_cast<std::size_t>(L) * di);
    for (std::size_t i = 0; i < A.size(); ++i) A[i] = -std::exp(lw.A_log[i]);
    ssm::SelectiveScanArguments<double> sa;
    sa.batch = 1; sa.length = L; sa.d_inner = di; sa.d_state = N;
    sa.u = x.data(); sa.ld_u = di;
    sa.delta = dt.data(); sa.ld_delta = di; sa.delta_bias = lw.dt_proj_b; sa.delta_softplus = true;
    sa.A = A.data();
    sa.B = xdbl.data() + R; sa.ld_B = R + 2 * N;
    sa.C = xdbl.data() + R + N; sa.ld_C = R + 2 * N;
    sa.D = lw.D;
    sa.z = xz.data() + di; sa.ld_z = 2 * di;
    sa.out = y.data(); sa.ld_out = di;
    sa.initial_state = state.ssm[l].data(); sa.final_state = state.ssm[l].data();
    selective_scan(sa);
    detail::linear(L, dm, di, y.data(), lw.out_proj_w, lw.out_proj_b, hidden.data());
  }
  for (std::size_t i = 0; i < residual.size(); ++i) residual[i] += hidden[i];
  for (int t = 0; t < L; ++t) detail::norm(c, &residual[static_cast<std::size_t>(t) * dm], w.norm_f_w, w.norm_f_b, &normed[static_cast<std::size_t>(t) * dm]);
  std::vector<double> logits(static_cast<std::size_t>(L) * V);
  detail::linear(L, V, dm, normed.data(), w.lm_head, nullptr, logits.data());
  return logits;
}

inline std::vector<double> forward(ModelWeights<double> const& w, std::vector<int> const& tokens) {
  State s = empty_state(w.config());
  return forward(w, tokens, s);
}

}  // namespace mambabyte::reference
