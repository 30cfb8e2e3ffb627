// Host half of cuda_smoke: a plain C++ TU (no CUDA headers) that includes the CPU umbrella and
// links with the nvcc-compiled TU into one executable. Without a GPU it only proves the build.
#include <mambabyte/mambabyte.hpp>

#include <cstdio>
#include <exception>
#include <string>

#include "smoke.hpp"

int main() {
  // Both TUs use the same inline entities; a missing `inline` or a definition that differs
  // between nvcc and the host compiler shows up here (link error or mismatch).
  std::string const host_view = std::string(mambabyte::version_string()) + " " +
                                std::string(mambabyte::dtype_name(mambabyte::DType::kBF16)) + " " +
                                std::to_string(mambabyte::bf16(1.5f).bits);
  std::string const cuda_view = smoke::describe_from_cuda_tu();
  if (host_view != cuda_view) {
    std::printf("FAIL host TU sees \"%s\", CUDA TU sees \"%s\"\n", host_view.c_str(),
                cuda_view.c_str());
    return 1;
  }

  std::string why;
  int const devices = smoke::device_count(&why);
  if (devices == 0) {
    std::printf("no CUDA device: compile/link check only (%s)\n", why.c_str());
    return 0;
  }
  try {
    int const failures = smoke::run_device_checks();
    if (failures) {
      std::printf("cuda_smoke: %d check(s) failed\n", failures);
      return 1;
    }
  } catch (std::exception const& e) {
    std::printf("FAIL exception: %s\n", e.what());
    return 1;
  }
  std::printf("cuda_smoke: all device checks passed on %d device(s)\n", devices);
  return 0;
}
