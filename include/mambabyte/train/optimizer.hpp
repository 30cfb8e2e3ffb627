/*! \file
 *  \brief AdamW with decoupled weight decay (none on A_log, D, biases and norm weights, as
 *         mamba_ssm sets `_no_weight_decay`), linear warmup + cosine decay, and global-norm
 *         gradient clipping. Works on the flat parameter buffer of ModelWeights, so one loop
 *         (OpenMP-parallel) updates the whole model.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <vector>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/model/weights.hpp"

namespace mambabyte::train {

struct AdamWOptions {
  double lr = 2e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;

  void validate() const {
    require(std::isfinite(lr) && lr > 0, "learning rate must be positive, got ", lr);
    require(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "AdamW betas must be in [0, 1)");
    require(eps > 0, "AdamW eps must be positive");
    require(weight_decay >= 0, "weight decay must be >= 0, got ", weight_decay);
  }
};

/// Linear warmup to peak_lr over warmup steps, then cosine decay to min_lr at total_steps
/// (constant min_lr after). step counts from 0.
struct CosineSchedule {
  double peak_lr = 2e-3;
  double min_lr = 2e-4;
  std::int64_t warmup = 100;
  std::int64_t total = 1000;

  double operator()(std::int64_t step) const {
    if (warmup > 0 && step < warmup) return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
    if (step >= total || total <= warmup) return min_lr;
    double const p = static_cast<double>(step - warmup) / static_cast<double>(total - warmup);
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + std::cos(std::numbers::pi * p));
  }
};

/// Global L2 norm of a gradient (accumulated in double). Deterministic whatever the thread
/// count: the sum is split into fixed blocks whose partial sums are added in block order
/// (an OpenMP reduction would add per-thread partials in completion order).
template <class T>
double global_norm(std::span<T const> g) {
  constexpr std::int64_t kBlock = 1 << 14;
  std::int64_t const n = static_cast<std::int64_t>(g.size()), blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<std::size_t>(blocks), 0.0);
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < blocks; ++b) {
    double s = 0;
    for (std::int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) s += double(g[i]) * double(g[i]);
    part[static_cast<std::size_t>(b)] = s;
  }
  double s = 0;
  for (double p : part) s += p;
  return std::sqrt(s);
}

/// Scale g so that its global norm is at most max_norm (no-op when max_norm <= 0).
/// Returns the norm before clipping.
template <class T>
double clip_grad_norm(std::span<T> g, double max_norm) {
  double const n = global_norm(std::span<T const>(g));
  if (max_norm > 0 && n > max_norm) {
    T const s = static_cast<T>(max_norm / (n + 1e-6));
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(g.size()); ++i) g[i] *= s;
  }
  return n;
}

/// AdamW over a ModelWeights layout. Moments are kept in T (fp32 for float models, fp64
/// for double); the padding between tensors of the flat buffer is never touched.
template <class T>
class AdamW {
 public:
  AdamW() = default;
  AdamW(ModelConfig const& config, AdamWOptions opt) : opt_(opt) {
    opt_.validate();
    std::size_t total = 0;
    params_ = parameter_layout(config, &total);
    m_.assign(total, T(0));
    v_.assign(total, T(0));
  }

  AdamWOptions const& options() const { return opt_; }
  /// Replace the hyper-parameters (the moments and the step count are kept).
  void set_options(AdamWOptions const& o) {
    o.validate();
    opt_ = o;
  }
  std::int64_t step_count() const { return t_; }
  std::span<T> first_moment() { return m_; }
  std::span<T> second_moment() { return v_; }
  std::span<T const> first_moment() const { return m_; }
  std::span<T const> second_moment() const { return v_; }
  void set_step_count(std::int64_t t) { t_ = t; }
  std::vector<ParamInfo> const& parameters() const { return params_; }

  /// One update of every parameter with learning rate lr:
  /// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p).
  void step(std::span<T> params, std::span<T const> grads, double lr) {
    require(params.size() == m_.size() && grads.size() == m_.size(),
            "AdamW: parameter/gradient buffers do not match the optimizer's layout");
    ++t_;
    double const b1 = opt_.beta1, b2 = opt_.beta2;
    double const c1 = 1 - std::pow(b1, double(t_)), c2 = 1 - std::pow(b2, double(t_));
    for (ParamInfo const& p : params_) {
      double const wd = p.no_weight_decay ? 0.0 : opt_.weight_decay;
      T* w = params.data() + p.offset;
      T const* g = grads.data() + p.offset;
      T* m = m_.data() + p.offset;
      T* v = v_.data() + p.offset;
      std::int64_t const n = static_cast<std::int64_t>(p.numel);
#pragma omp parallel for schedule(static) if (n > 16384)
      for (std::int64_t i = 0; i < n; ++i) {
        double const gi = g[i];
        double const mi = b1 * double(m[i]) + (1 - b1) * gi;
        double const vi = b2 * double(v[i]) + (1 - b2) * gi * gi;
        m[i] = static_cast<T>(mi);
        v[i] = static_cast<T>(vi);
        double const upd = (mi / c1) / (std::sqrt(vi / c2) + opt_.eps) + wd * double(w[i]);
        w[i] = static_cast<T>(double(w[i]) - lr * upd);
      }
    }
  }

 private:
  AdamWOptions opt_;
  std::vector<ParamInfo> params_;
  aligned_vector<T> m_, v_;
  std::int64_t t_ = 0;
};

}  // namespace mambabyte::train
