/*! \file
 *  \brief The selective-scan backward operator: its Arguments, the shared checks and the
 *         primary template (specialised per backend in backend/<name>/).
 *
 *  Forward (see ssm/selective_scan.hpp), per batch b, channel d, state n, time t:
 *      v_t     = dt_t + delta_bias[d]                 (raw delta plus bias)
 *      delta_t = softplus(v_t)                        (or v_t without softplus)
 *      a_t[n]  = exp(delta_t * A[d,n])
 *      h_t[n]  = a_t[n] * h_{t-1}[n] + delta_t * u_t * B_t[n]
 *      y_t     = sum_n h_t[n] * C_t[n] + D[d] * u_t
 *      out_t   = y_t * silu(z_t)                      (y_t without z)
 *
 *  Backward, with dout_t = dL/dout_t and g_t = dL/dh_t (the adjoint state):
 *      dy_t     = dout_t * silu(z_t);   dz_t = dout_t * y_t * silu'(z_t)
 *      g_t[n]   = C_t[n] * dy_t + a_{t+1}[n] * g_{t+1}[n]      (g_{L-1} also gets dfinal_state)
 *      dC_t[n]  = sum_d dy_t * h_t[n]                          (summed over the channels d)
 *      dB_t[n]  = sum_d g_t[n] * delta_t * u_t
 *      du_t     = delta_t * sum_n g_t[n] B_t[n] + D * dy_t
 *      ddelta_t = u_t * sum_n g_t[n] B_t[n] + sum_n g_t[n] h_{t-1}[n] A[n] a_t[n]
 *      dv_t     = ddelta_t * softplus'(v_t)       (sigmoid(v_t); 1 where v_t > 20 or no softplus)
 *      dA[d,n] += sum_{b,t} g_t[n] h_{t-1}[n] delta_t a_t[n]
 *      dD[d]   += sum_{b,t} dy_t u_t;     ddelta_bias[d] += sum_{b,t} dv_t
 *      dinitial_state = a_0 * g_0
 *  The reverse recurrence for g is itself a linear recurrence (pairs (a_{t+1}, C_t dy_t) composed
 *  in reverse time), so the same scan machinery (sequential, chunked reduce-then-scan) runs it.
 *
 *  Output conventions:
 *   - activation gradients (du, ddelta, dB, dC, dz, dinitial_state) are WRITTEN (overwritten);
 *   - parameter gradients (dA, dD, ddelta_bias) are ACCUMULATED (+=), summed over batch and time,
 *     so a caller can sum micro-batches into one gradient buffer;
 *   - `out`, when given, receives the forward output again (the backward recomputes it anyway):
 *     a training step need not keep the scan output for out_proj's weight gradient.
 *  ddelta is the gradient w.r.t. the raw `delta` input (before bias and softplus), i.e. what
 *  flows back into dt_proj. dB / dC have the layout and strides of B / C (ld_dB, ld_dC), so the
 *  model can write them straight into the gradient of x_proj's output.
 *
 *  Layout as in the forward: element (b, t, d) at ptr[(b*length + t)*ld + d]; states
 *  (batch, d_inner, d_state) contiguous; A, dA (d_inner, d_state) contiguous.
 */
#pragma once

#include <cstddef>
#include <cstdint>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/ssm/selective_scan.hpp"

namespace mambabyte::ssm {

template <class T>
struct SelectiveScanBackwardArguments {
  int batch = 0, length = 0, d_inner = 0, d_state = 0;
  // ---- forward inputs (as given to the forward) ----
  T const* u = nullptr;          std::int64_t ld_u = 0;      ///< (batch, length, d_inner)
  T const* delta = nullptr;      std::int64_t ld_delta = 0;  ///< (batch, length, d_inner), before bias
  T const* delta_bias = nullptr;                             ///< (d_inner) or null
  bool delta_softplus = true;
  T const* A = nullptr;                                      ///< (d_inner, d_state)
  T const* B = nullptr;          std::int64_t ld_B = 0;      ///< (batch, length, d_state)
  T const* C = nullptr;          std::int64_t ld_C = 0;      ///< (batch, length, d_state)
  T const* D = nullptr;                                      ///< (d_inner) or null
  T const* z = nullptr;          std::int64_t ld_z = 0;      ///< (batch, length, d_inner) or null
  T const* initial_state = nullptr;                          ///< (batch, d_inner, d_state) or null
  // ---- incoming gradients ----
  T const* dout = nullptr;       std::int64_t ld_dout = 0;   ///< dL/dout (batch, length, d_inner)
  T const* dfinal_state = nullptr;                           ///< dL/dh_{L-1} (batch, d_inner, d_state) or null
  // ---- activation gradients: written ----
  T* du = nullptr;               std::int64_t ld_du = 0;     ///< (batch, length, d_inner)
  T* ddelta = nullptr;           std::int64_t ld_ddelta = 0; ///< w.r.t. the raw delta (before bias, softplus)
  T* dB = nullptr;               std::int64_t ld_dB = 0;     ///< (batch, length, d_state)
  T* dC = nullptr;               std::int64_t ld_dC = 0;     ///< (batch, length, d_state)
  T* dz = nullptr;               std::int64_t ld_dz = 0;     ///< required when z is given
  T* dinitial_state = nullptr;                               ///< (batch, d_inner, d_state) or null (skipped)
  T* out = nullptr;              std::int64_t ld_out = 0;    ///< optional: the forward output, recomputed
  // ---- parameter gradients: accumulated (+=) over batch and time ----
  T* dA = nullptr;                                           ///< (d_inner, d_state), required
  T* dD = nullptr;                                           ///< (d_inner) or null (skipped); needs D
  T* ddelta_bias = nullptr;                                  ///< (d_inner) or null (skipped); needs delta_bias

  /// The forward inputs of `f` (its outputs out / final_state are not copied).
  static SelectiveScanBackwardArguments from_forward(SelectiveScanArguments<T> const& f) {
    SelectiveScanBackwardArguments a;
    a.batch = f.batch; a.length = f.length; a.d_inner = f.d_inner; a.d_state = f.d_state;
    a.u = f.u; a.ld_u = f.ld_u;
    a.delta = f.delta; a.ld_delta = f.ld_delta; a.delta_bias = f.delta_bias; a.delta_softplus = f.delta_softplus;
    a.A = f.A;
    a.B = f.B; a.ld_B = f.ld_B;
    a.C = f.C; a.ld_C = f.ld_C;
    a.D = f.D;
    a.z = f.z; a.ld_z = f.ld_z;
    a.initial_state = f.initial_state;
    return a;
  }

  /// The forward arguments these inputs describe (out / final_state as given).
  SelectiveScanArguments<T> forward(T* fwd_out, std::int64_t ld_fwd_out, T* final_state = nullptr) const {
    SelectiveScanArguments<T> f;
    f.batch = batch; f.length = length; f.d_inner = d_inner; f.d_state = d_state;
    f.u = u; f.ld_u = ld_u; f.delta = delta; f.ld_delta = ld_delta; f.delta_bias = delta_bias;
    f.delta_softplus = delta_softplus; f.A = A; f.B = B; f.ld_B = ld_B; f.C = C; f.ld_C = ld_C;
    f.D = D; f.z = z; f.ld_z = ld_z; f.out = fwd_out; f.ld_out = ld_fwd_out;
    f.initial_state = initial_state; f.final_state = final_state;
    return f;
  }
};

/// Shape and pointer checks shared by every backend.
template <class T>
Status validate(SelectiveScanBackwardArguments<T> const& a) {
  if (a.batch < 0 || a.length < 0 || a.d_inner <= 0 || a.d_state <= 0) return Status::kInvalidArgument;
  if (!a.A || !a.dA) return Status::kInvalidArgument;
  if (a.dD && !a.D) return Status::kInvalidArgument;                    // gradient of an absent input
  if (a.ddelta_bias && !a.delta_bias) return Status::kInvalidArgument;
  if (a.batch == 0 || a.length == 0) return Status::kSuccess;           // nothing to do, still valid
  if (!a.u || !a.delta || !a.B || !a.C || !a.dout) return Status::kInvalidArgument;
  if (!a.du || !a.ddelta || !a.dB || !a.dC) return Status::kInvalidArgument;
  if (a.z && !a.dz) return Status::kInvalidArgument;
  if (a.dz && !a.z) return Status::kInvalidArgument;
  if (a.ld_u < a.d_inner || a.ld_delta < a.d_inner || a.ld_dout < a.d_inner || a.ld_du < a.d_inner ||
      a.ld_ddelta < a.d_inner)
    return Status::kInvalidArgument;
  if (a.ld_B < a.d_state || a.ld_C < a.d_state || a.ld_dB < a.d_state || a.ld_dC < a.d_state)
    return Status::kInvalidArgument;
  if (a.z && (a.ld_z < a.d_inner || a.ld_dz < a.d_inner)) return Status::kInvalidArgument;
  if (a.out && a.ld_out < a.d_inner) return Status::kInvalidArgument;
  return Status::kSuccess;
}

/// Primary template: no implementation. Each backend specialises it in its own folder
/// (backend/cpu/selective_scan_backward.hpp for backend::Cpu).
template <class Backend, class T, class ScanPolicy, class Enable = void>
struct SelectiveScanBackward {
  static_assert(detail::dependent_false<Backend, T, ScanPolicy>,
                "no SelectiveScanBackward specialisation for this (Backend, T, ScanPolicy): include "
                "mambabyte/backend/cpu/selective_scan_backward.hpp for the CPU");
};

}  // namespace mambabyte::ssm
