// The seam between the two translation units of cuda_smoke: declared here, defined in
// smoke_kernel.cu (nvcc), called from smoke_host.cpp (the host compiler, no CUDA headers).
#pragma once

#include <string>

namespace smoke {
/// Devices the CUDA runtime sees; 0 (and the runtime's reason in *why) when it sees none.
int device_count(std::string* why);
/// Fills device buffers through device_fill, copies them back and checks every element;
/// also checks the error paths. Prints each failure and returns how many there were.
int run_device_checks();
/// Library facts as the nvcc-compiled TU sees them (compared with the host TU's view).
std::string describe_from_cuda_tu();
}  // namespace smoke
