/*! \file
 *  \brief The selective-scan operator: its Arguments, the primary template (specialised per
 *         backend in backend/<name>/), and the host rule that resolves scan::Auto.
 *
 *  Math (mamba_ssm selective_scan with delta_bias, delta_softplus, D and z), per batch b,
 *  channel d, state n, time t (compute type T throughout; h_{-1} = initial_state or 0):
 *      delta_t = softplus(dt_t + delta_bias)          (or dt_t + delta_bias without softplus)
 *      h_t     = exp(delta_t * A[d,n]) * h_{t-1} + delta_t * u_t * B_t[n]
 *      y_t     = sum_n h_t[n] * C_t[n] + D[d] * u_t
 *      out_t   = y_t * silu(z_t)                      (when z is given)
 *
 *  Layout: token-major rows. Element (b, t, d) of u lives at u[(b*length + t)*ld_u + d]; the
 *  leading dimensions let B, C (slices of x_proj's output) and z (a slice of in_proj's output)
 *  be passed without copies. States are (batch, d_inner, d_state), contiguous.
 */
#pragma once

#include <cstddef>
#include <cstdint>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"

namespace mambabyte::ssm {

template <class T>
struct SelectiveScanArguments {
  int batch = 0, length = 0, d_inner = 0, d_state = 0;
  T const* u = nullptr;          std::int64_t ld_u = 0;      ///< (batch, length, d_inner)
  T const* delta = nullptr;      std::int64_t ld_delta = 0;  ///< (batch, length, d_inner), before bias
  T const* delta_bias = nullptr;                             ///< (d_inner) or null
  bool delta_softplus = true;
  T const* A = nullptr;                                      ///< (d_inner, d_state), A = -exp(A_log)
  T const* B = nullptr;          std::int64_t ld_B = 0;      ///< (batch, length, d_state)
  T const* C = nullptr;          std::int64_t ld_C = 0;      ///< (batch, length, d_state)
  T const* D = nullptr;                                      ///< (d_inner) or null
  T const* z = nullptr;          std::int64_t ld_z = 0;      ///< (batch, length, d_inner) or null
  T* out = nullptr;              std::int64_t ld_out = 0;    ///< (batch, length, d_inner)
  T const* initial_state = nullptr;                          ///< (batch, d_inner, d_state) or null
  T* final_state = nullptr;                                  ///< (batch, d_inner, d_state) or null
};

/// Shape and pointer checks shared by every backend.
template <class T>
Status validate(SelectiveScanArguments<T> const& a) {
  if (a.batch < 0 || a.length < 0 || a.d_inner <= 0 || a.d_state <= 0) return Status::kInvalidArgument;
  if (a.batch == 0 || a.length == 0) return Status::kSuccess;  // nothing to do, still valid
  if (!a.u || !a.delta || !a.A || !a.B || !a.C || !a.out) return Status::kInvalidArgument;
  if (a.ld_u < a.d_inner || a.ld_delta < a.d_inner || a.ld_out < a.d_inner) return Status::kInvalidArgument;
  if (a.ld_B < a.d_state || a.ld_C < a.d_state) return Status::kInvalidArgument;
  if (a.z && a.ld_z < a.d_inner) return Status::kInvalidArgument;
  return Status::kSuccess;
}

/// Primary template: no implementation. Each backend specialises it in its own folder.
template <class Backend, class T, class ScanPolicy, class Enable = void>
struct SelectiveScan {
  static_assert(detail::dependent_false<Backend, T, ScanPolicy>,
                "no SelectiveScan specialisation for this (Backend, T, ScanPolicy): include the "
                "backend's header (mambabyte/mambabyte.hpp for Cpu, mambabyte/cuda.hpp for Cuda)");
};

/// Which concrete algorithm scan::Auto runs on the CPU.
enum class CpuScanAlgo { kSequential, kAssociative, kChunked };

/// The host rule behind scan::Auto on the CPU, justified by bench/bench_scan (see
/// docs/performance.md): the sequential scan does the least work (one exp per state per step)
/// and wins whenever (batch x channel tiles) gives every thread at least half a tile of
/// independent work: the chunked scan does ~2x the work (measured 1.45-1.96x on 1 thread), so
/// it only pays when more than half the threads would otherwise idle (2 * tiles < threads)
/// and the sequence is long (L >= 512); then it parallelises along time.
inline CpuScanAlgo resolve_auto_cpu(int batch, int length, int d_inner, int threads,
                                    int channel_tile) {
  long const tiles = static_cast<long>(batch) * ((d_inner + channel_tile - 1) / channel_tile);
  if (threads <= 1 || 2L * tiles >= threads || length < 512) return CpuScanAlgo::kSequential;
  return CpuScanAlgo::kChunked;
}

}  // namespace mambabyte::ssm
