/*! \file
 *  \brief CPU threading helpers (OpenMP). Without -fopenmp everything runs on one thread.
 */
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Core>

#include "mambabyte/policy/policy.hpp"

namespace mambabyte::backend::cpu {

/// Threads a CPU operator will use: backend.threads if set, else OpenMP's current maximum.
inline int thread_count(Cpu const& be) {
#if defined(_OPENMP)
  return be.threads > 0 ? be.threads : omp_get_max_threads();
#else
  (void)be;
  return 1;
#endif
}

/// Set the process-wide default thread count (OpenMP and Eigen's GEMM) used when
/// backend::Cpu::threads is 0.
inline void set_default_threads(int n) {
  if (n <= 0) return;
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n);
}

}  // namespace mambabyte::backend::cpu
