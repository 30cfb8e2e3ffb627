// Shared by the CUDA test programs: whether a GPU is present (without one every case is skipped
// with a message, so the programs can run in CI) and the REQUIRE_GPU() guard.
#pragma once

#include <cuda_runtime.h>

#include <catch2/catch.hpp>

namespace mbtest {

/// True when the CUDA runtime sees at least one device (clears the error a missing driver leaves).
inline bool have_gpu() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

}  // namespace mbtest

/// First statement of a GPU test case: skips it (with a warning) when there is no device.
#define REQUIRE_GPU()                       \
  do {                                      \
    if (!::mbtest::have_gpu()) {            \
      WARN("no CUDA device: test skipped"); \
      return;                               \
    }                                       \
  } while (0)
