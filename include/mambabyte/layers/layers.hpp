/*! \file
 *  \brief Operator contracts of the model's layers (besides the selective scan, which lives in
 *         ssm/): Arguments structs, primary templates that fail loudly, and the shared checks.
 *         Each backend specialises Linear, AddNorm, CausalConv1d and Embedding in its folder.
 *
 *  Every operator has: `using Arguments`, `static Status can_implement(Arguments const&)`,
 *  `static std::size_t workspace_bytes(Arguments const&, Backend const&)` and
 *  `static void run(Arguments const&, void* workspace, Backend const&)`.
 *  Activations are token-major rows: row r = (batch b, time t) = b*length + t.
 */
#pragma once

#include <cstddef>
#include <cstdint>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/error.hpp"

namespace mambabyte::layers {

/// y(rows, out) = x(rows, in) * W(out, in)^T + bias(out)     (PyTorch nn.Linear layout)
template <class T>
struct LinearArguments {
  int rows = 0, in_features = 0, out_features = 0;
  T const* x = nullptr;     std::int64_t ld_x = 0;
  T const* weight = nullptr;                       ///< (out, in), row-major
  T const* bias = nullptr;                         ///< (out) or null
  T* y = nullptr;           std::int64_t ld_y = 0;
};

/// residual += hidden (skipped when hidden is null); out = Norm(residual).
/// LayerNorm: (r - mean)/sqrt(var + eps) * weight + bias;  RMSNorm: r/sqrt(mean(r^2) + eps) * weight.
template <class T>
struct AddNormArguments {
  int rows = 0, dim = 0;
  T* residual = nullptr;       ///< (rows, dim) in/out
  T const* hidden = nullptr;   ///< (rows, dim) or null
  T const* weight = nullptr;   ///< (dim)
  T const* bias = nullptr;     ///< (dim) or null (LayerNorm only)
  T* out = nullptr;            ///< (rows, dim)
  double eps = 1e-5;
  bool rms = false;
};

/// Causal depthwise conv1d over time, optionally followed by SiLU:
///   out[b,t,c] = act(bias[c] + sum_k weight[c,k] * in[b, t-(K-1)+k, c])
/// where inputs before t = 0 come from `state` (batch, K-1, channels; oldest first), or are
/// zero when state is null. With a state, it is updated to the last K-1 inputs.
template <class T>
struct CausalConv1dArguments {
  int batch = 0, length = 0, channels = 0, width = 0;
  T const* x = nullptr;        std::int64_t ld_x = 0;    ///< rows (batch*length)
  T const* weight = nullptr;                           ///< (channels, width)
  T const* bias = nullptr;                             ///< (channels) or null
  T* out = nullptr;            std::int64_t ld_out = 0;
  T* state = nullptr;                                  ///< (batch, width-1, channels) or null
  bool silu = true;
};

/// out(rows, dim) = table[tokens[r]]
template <class T>
struct EmbeddingArguments {
  int rows = 0, dim = 0, vocab = 0;
  std::int32_t const* tokens = nullptr;
  T const* table = nullptr;    ///< (vocab, dim)
  T* out = nullptr;            ///< (rows, dim)
};

template <class Backend, class T, class Enable = void>
struct Linear {
  static_assert(detail::dependent_false<Backend, T>, "no Linear for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct AddNorm {
  static_assert(detail::dependent_false<Backend, T>, "no AddNorm for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct CausalConv1d {
  static_assert(detail::dependent_false<Backend, T>, "no CausalConv1d for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct Embedding {
  static_assert(detail::dependent_false<Backend, T>, "no Embedding for this (Backend, T)");
};

template <class T>
Status validate(LinearArguments<T> const& a) {
  if (a.rows < 0 || a.in_features <= 0 || a.out_features <= 0) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.x || !a.weight || !a.y || a.ld_x < a.in_features || a.ld_y < a.out_features) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(AddNormArguments<T> const& a) {
  if (a.rows < 0 || a.dim <= 0 || !(a.eps > 0)) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.residual || !a.weight || !a.out || (a.rms && a.bias)) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(CausalConv1dArguments<T> const& a) {
  if (a.batch < 0 || a.length < 0 || a.channels <= 0 || a.width <= 0) return Status::kInvalidArgument;
  if (a.batch == 0 || a.length == 0) return Status::kSuccess;
  if (!a.x || !a.weight || !a.out || a.ld_x < a.channels || a.ld_out < a.channels) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(EmbeddingArguments<T> const& a) {
  if (a.rows < 0 || a.dim <= 0 || a.vocab <= 0) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.tokens || !a.table || !a.out) return Status::kInvalidArgument;
  for (int r = 0; r < a.rows; ++r)
    if (a.tokens[r] < 0 || a.tokens[r] >= a.vocab) return Status::kInvalidArgument;
  return Status::kSuccess;
}

/// Throw a mambabyte::Error naming the operator when its arguments do not validate.
template <class Args>
void check(Args const& a, char const* op) {
  Status const st = validate(a);
  require(st == Status::kSuccess, op, ": invalid arguments (", to_string(st), ")");
}

}  // namespace mambabyte::layers
