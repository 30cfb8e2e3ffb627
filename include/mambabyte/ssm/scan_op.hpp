/*! \file
 *  \brief The associative operator every scan algorithm composes.
 *
 *  A pair (a, b) means the affine map h -> a*h + b. Composition "first p, then q" is
 *      combine(p, q) = (q.a * p.a, q.a * p.b + q.b)
 *  which is associative (not commutative). Sequential, Blelloch and chunked scans, on every
 *  backend, are different evaluation orders of this one operator.
 */
#pragma once

#include <cmath>

#include "mambabyte/core/config.hpp"

namespace mambabyte::ssm {

template <class T>
struct ScanPair {
  T a;  ///< multiplicative part (decay), identity 1
  T b;  ///< additive part (input), identity 0
};

/// Identity element of the scan monoid.
template <class T>
MAMBABYTE_HOST_DEVICE constexpr ScanPair<T> scan_identity() {
  return {T(1), T(0)};
}

/// Apply p first, then q.
template <class T>
MAMBABYTE_HOST_DEVICE constexpr ScanPair<T> combine(ScanPair<T> const& p, ScanPair<T> const& q) {
  return {q.a * p.a, q.a * p.b + q.b};
}

/// softplus(v) = log(1 + exp(v)), with the mamba_ssm threshold: v itself for v > 20.
template <class T>
MAMBABYTE_HOST_DEVICE T softplus(T v) {
  using std::exp;
  using std::log1p;
  return v > T(20) ? v : log1p(exp(v));
}

template <class T>
MAMBABYTE_HOST_DEVICE T silu(T v) {
  using std::exp;
  return v / (T(1) + exp(-v));
}

}  // namespace mambabyte::ssm
