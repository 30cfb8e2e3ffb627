/*! \file
 *  \brief Operator contracts of the layers' backward passes (the selective scan's is in
 *         ssm/selective_scan_backward.hpp) and of the training loss: Arguments structs, the shared
 *         checks, and primary templates that fail loudly. backend/cpu/layers_backward.hpp
 *         specialises them for backend::Cpu.
 *
 *  Same contract as the forward operators (layers/layers.hpp): `using Arguments`,
 *  `can_implement`, `workspace_bytes`, `run(args, workspace, backend)`.
 *
 *  Conventions: gradients of parameters (dweight, dbias, dtable) are ACCUMULATED (+=), so
 *  micro-batches can be summed into one gradient buffer; gradients of activations are WRITTEN
 *  unless the Arguments say otherwise (accumulate_dx, dresidual). Null gradient pointers mean
 *  "not needed" and skip that work. Rows are token-major: row r = (batch b, time t) = b*length + t.
 */
#pragma once

#include <cstddef>
#include <cstdint>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/error.hpp"

namespace mambabyte::layers {

/// Backward of y = x W^T + bias:  dx = dy W  (written, or added when accumulate_dx);
/// dweight += dy^T x;  dbias += sum over rows of dy.
template <class T>
struct LinearBackwardArguments {
  int rows = 0, in_features = 0, out_features = 0;
  T const* x = nullptr;       std::int64_t ld_x = 0;   ///< forward input (needed for dweight)
  T const* weight = nullptr;                           ///< (out, in) row-major (needed for dx)
  T const* dy = nullptr;      std::int64_t ld_dy = 0;  ///< (rows, out)
  T* dx = nullptr;            std::int64_t ld_dx = 0;  ///< (rows, in) or null
  bool accumulate_dx = false;                          ///< dx += dy W instead of dx = dy W
  T* dweight = nullptr;                                ///< (out, in) accumulated, or null
  T* dbias = nullptr;                                  ///< (out) accumulated, or null
};

/// Backward of AddNorm (residual r = residual + hidden; out = Norm(r)). `residual` is the norm's
/// input r (the residual stream AFTER the add, as the forward left it). On entry `dresidual`
/// holds the gradient reaching r through the residual stream from later blocks (zero for the
/// last norm); on return it holds dL/dr = that + the gradient through the norm. Because
/// r = residual_before + hidden, this is also dL/d(residual_before) and dL/dhidden.
///   LayerNorm: xh = (r - mean) * rstd;  dr += rstd * (g - mean(g) - xh * mean(g * xh)), g = dout * weight
///   RMSNorm:   xh = r * rstd;           dr += rstd * (g - xh * mean(g * xh))
///   dweight += sum_rows dout * xh;  dbias += sum_rows dout (LayerNorm only)
template <class T>
struct AddNormBackwardArguments {
  int rows = 0, dim = 0;
  T const* residual = nullptr;   ///< (rows, dim): the norm input r
  T const* weight = nullptr;     ///< (dim)
  T const* dout = nullptr;       ///< (rows, dim): dL/d(normed output)
  T* dresidual = nullptr;        ///< (rows, dim) in/out, see above
  T* dweight = nullptr;          ///< (dim) accumulated, or null
  T* dbias = nullptr;            ///< (dim) accumulated, or null (LayerNorm only)
  double eps = 1e-5;
  bool rms = false;
};

/// Backward of the causal depthwise conv1d (+ SiLU). The pre-activation is recomputed from x
/// (K multiply-adds per element) rather than stored. With pre = bias + sum_k w[c,k] in[t-(K-1)+k]
/// and dpre = dout * silu'(pre) (dout without SiLU):
///   dx[t]   = sum_k w[c,k] * dpre[t + (K-1) - k]     (written, or added when accumulate_dx)
///   dweight[c,k] += sum_{b,t} dpre[t] * in[t-(K-1)+k];   dbias[c] += sum_{b,t} dpre[t]
///   dstate (the gradient of the initial window, same layout as state) is written when non-null.
template <class T>
struct CausalConv1dBackwardArguments {
  int batch = 0, length = 0, channels = 0, width = 0;
  T const* x = nullptr;        std::int64_t ld_x = 0;    ///< forward input rows (batch*length)
  T const* weight = nullptr;                           ///< (channels, width)
  T const* bias = nullptr;                             ///< (channels) or null (to recompute pre)
  T const* state = nullptr;                            ///< initial window (batch, width-1, channels) or null = zeros
  bool silu = true;
  T const* dout = nullptr;     std::int64_t ld_dout = 0; ///< dL/d(output)
  T* dx = nullptr;             std::int64_t ld_dx = 0;   ///< or null
  bool accumulate_dx = false;
  T* dweight = nullptr;                                ///< (channels, width) accumulated, or null
  T* dbias = nullptr;                                  ///< (channels) accumulated, or null
  T* dstate = nullptr;                                 ///< (batch, width-1, channels) written, or null
};

/// Backward of the embedding lookup: dtable[tokens[r]] += dout[r] (scatter-add).
template <class T>
struct EmbeddingBackwardArguments {
  int rows = 0, dim = 0, vocab = 0;
  std::int32_t const* tokens = nullptr;
  T const* dout = nullptr;     ///< (rows, dim)
  T* dtable = nullptr;         ///< (vocab, dim) accumulated
};

/// Mean cross-entropy over the first `classes` logits of each row (a padded vocabulary's extra
/// logits are ignored), and its gradient:
///   loss = (1/n) sum_{rows r counted} (logsumexp(logits[r, :classes]) - logits[r, target_r])
///   dlogits[r, :classes] = grad_scale/n * (softmax(logits[r, :classes]) - onehot(target_r))
/// and, with zero_padding (the default), dlogits[r, classes:ld_dlogits) = 0.
/// Rows with a negative target are ignored (not counted in n; their dlogits row is zero).
/// run() returns the loss (double, accumulated in double). dlogits may alias logits (same ld),
/// or be null for the loss only.
template <class T>
struct CrossEntropyArguments {
  int rows = 0, classes = 256;
  T const* logits = nullptr;   std::int64_t ld_logits = 0;
  std::int32_t const* targets = nullptr;   ///< (rows), in [0, classes) or negative (ignored)
  T* dlogits = nullptr;        std::int64_t ld_dlogits = 0;
  double grad_scale = 1.0;                  ///< multiplies dlogits (micro-batch averaging, loss scaling)
  bool zero_padding = true;                 ///< also write zeros into dlogits[r, classes:ld_dlogits)
};

template <class Backend, class T, class Enable = void>
struct LinearBackward {
  static_assert(detail::dependent_false<Backend, T>, "no LinearBackward for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct AddNormBackward {
  static_assert(detail::dependent_false<Backend, T>, "no AddNormBackward for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct CausalConv1dBackward {
  static_assert(detail::dependent_false<Backend, T>, "no CausalConv1dBackward for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct EmbeddingBackward {
  static_assert(detail::dependent_false<Backend, T>, "no EmbeddingBackward for this (Backend, T)");
};
template <class Backend, class T, class Enable = void>
struct CrossEntropy {
  static_assert(detail::dependent_false<Backend, T>, "no CrossEntropy for this (Backend, T)");
};

template <class T>
Status validate(LinearBackwardArguments<T> const& a) {
  if (a.rows < 0 || a.in_features <= 0 || a.out_features <= 0) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.dy || a.ld_dy < a.out_features) return Status::kInvalidArgument;
  if (a.dx && (!a.weight || a.ld_dx < a.in_features)) return Status::kInvalidArgument;
  if (a.dweight && (!a.x || a.ld_x < a.in_features)) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(AddNormBackwardArguments<T> const& a) {
  if (a.rows < 0 || a.dim <= 0 || !(a.eps > 0)) return Status::kInvalidArgument;
  if (a.rms && a.dbias) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.residual || !a.weight || !a.dout || !a.dresidual) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(CausalConv1dBackwardArguments<T> const& a) {
  if (a.batch < 0 || a.length < 0 || a.channels <= 0 || a.width <= 0) return Status::kInvalidArgument;
  if (a.dbias && !a.bias) return Status::kInvalidArgument;
  if (a.batch == 0 || a.length == 0) return Status::kSuccess;
  if (!a.x || !a.weight || !a.dout || a.ld_x < a.channels || a.ld_dout < a.channels) return Status::kInvalidArgument;
  if (a.dx && a.ld_dx < a.channels) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(EmbeddingBackwardArguments<T> const& a) {
  if (a.rows < 0 || a.dim <= 0 || a.vocab <= 0) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.tokens || !a.dout || !a.dtable) return Status::kInvalidArgument;
  for (int r = 0; r < a.rows; ++r)
    if (a.tokens[r] < 0 || a.tokens[r] >= a.vocab) return Status::kInvalidArgument;
  return Status::kSuccess;
}
template <class T>
Status validate(CrossEntropyArguments<T> const& a) {
  if (a.rows < 0 || a.classes <= 0) return Status::kInvalidArgument;
  if (a.rows == 0) return Status::kSuccess;
  if (!a.logits || !a.targets || a.ld_logits < a.classes) return Status::kInvalidArgument;
  if (a.dlogits && a.ld_dlogits < a.classes) return Status::kInvalidArgument;
  if (a.dlogits && static_cast<void const*>(a.dlogits) == static_cast<void const*>(a.logits) &&
      a.ld_dlogits != a.ld_logits)
    return Status::kInvalidArgument;  // in place only row for row
  for (int r = 0; r < a.rows; ++r)
    if (a.targets[r] >= a.classes) return Status::kInvalidArgument;
  return Status::kSuccess;
}

}  // namespace mambabyte::layers
