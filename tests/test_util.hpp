// Shared helpers for the tests: random data, relative error norms, tolerances per dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mambabyte/model/weights.hpp"

namespace mbtest {

template <class T>
inline std::vector<T> random_vector(std::size_t n, std::mt19937_64& rng, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(rng));
  return v;
}

/// ||a - b|| / max(||b||, tiny), in double.
template <class A, class B>
inline double rel_err(A const& a, B const& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();  // never "close"
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    double const d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

template <class T> inline double tol();
template <> inline double tol<double>() { return 1e-12; }
template <> inline double tol<float>() { return 2e-5; }

/// Random, well-conditioned weights for a config (mamba_ssm-like init scales).
template <class T>
inline mambabyte::ModelWeights<T> random_weights(mambabyte::ModelConfig cfg, std::uint64_t seed) {
  mambabyte::ModelWeights<T> w(cfg);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0, 1);
  auto const& c = w.config();
  for (auto const& p : w.parameters()) {
    auto t = w.tensor(p);
    std::string const& n = p.name;
    auto fill = [&](double mean, double sd) { for (auto& x : t) x = static_cast<T>(mean + sd * nd(rng)); };
    if (n.ends_with("A_log")) {
      for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(std::log(double(i % c.d_state + 1)) + 0.1 * nd(rng));
    } else if (n.ends_with("mixer.D")) fill(1.0, 0.1);
    else if (n.ends_with("dt_proj.bias")) {
      std::uniform_real_distribution<double> u(std::log(1e-3), std::log(1e-1));
      for (auto& x : t) { double dt = std::exp(u(rng)); x = static_cast<T>(dt + std::log(-std::expm1(-dt))); }
    } else if (n.ends_with("dt_proj.weight")) fill(0, 1.0 / std::sqrt(c.dt_rank));
    else if (n.ends_with("norm.weight") || n.ends_with("norm_f.weight")) fill(1.0, 0.1);
    else if (n.ends_with(".bias")) fill(0, 0.1);
    else if (n.ends_with("conv1d.weight")) fill(0, 0.3);
    else if (p.shape.size() == 2) fill(0, 1.0 / std::sqrt(static_cast<double>(p.shape[1])));
    else fill(0, 0.3);
  }
  return w;
}

/// n random token ids in [0, vocab).
inline std::vector<std::int32_t> random_tokens(std::size_t n, int vocab, std::mt19937_64& rng) {
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = static_cast<std::int32_t>(rng() % static_cast<std::uint64_t>(vocab));
  return t;
}

template <class To, class From>
inline mambabyte::ModelWeights<To> cast_weights(mambabyte::ModelWeights<From> const& w) {
  mambabyte::ModelWeights<To> o(w.config());
  auto s = w.flat();
  auto d = o.flat();
  for (std::size_t i = 0; i < s.size(); ++i) d[i] = static_cast<To>(s[i]);
  return o;
}

}  // namespace mbtest
