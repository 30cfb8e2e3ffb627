// CUDA half of cuda_smoke: includes the opt-in CUDA umbrella and drives the one real kernel.
#include <mambabyte/cuda.hpp>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "smoke.hpp"

namespace {

using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
using mambabyte::backend::cuda::device_fill;

template <class T>
bool same_bits(T const& a, T const& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Fills the first `filled` of `n` elements with `value` (the rest with `background`), copies
// the buffer back and counts the elements that are wrong.
template <class T>
int check_fill(Cuda const& be, char const* name, std::size_t n, std::size_t filled, T background,
               T value) {
  DeviceBuffer<T> buf(n, be);
  device_fill(be, buf.data(), n, background);
  device_fill(be, buf.data(), filled, value);
  std::vector<T> host(n);
  buf.copy_to_host(host.data(), n, be.stream);
  std::size_t bad = 0, first_bad = n;
  for (std::size_t i = 0; i < n; ++i)
    if (!same_bits(host[i], i < filled ? value : background) && bad++ == 0) first_bad = i;
  if (bad) std::printf("FAIL %s: %zu of %zu elements wrong, first at %zu\n", name, bad, n, first_bad);
  return bad ? 1 : 0;
}

int check_errors(Cuda const& be) {
  int failures = 0;
  DeviceBuffer<float> buf(4, be);
  std::vector<float> host(8);
  try {
    buf.copy_to_host(host.data(), host.size(), be.stream);
    std::printf("FAIL copy_to_host past the end did not throw\n");
    ++failures;
  } catch (mambabyte::Error const&) {
  }
  try {
    MAMBABYTE_CUDA_CHECK(cudaSetDevice(-1));
    std::printf("FAIL MAMBABYTE_CUDA_CHECK(cudaSetDevice(-1)) did not throw\n");
    ++failures;
  } catch (mambabyte::Error const& e) {
    std::string const what = e.what();
    if (what.find("smoke_kernel.cu:") == std::string::npos ||
        what.find("cudaSetDevice(-1)") == std::string::npos) {
      std::printf("FAIL MAMBABYTE_CUDA_CHECK message lacks file:line or the call: %s\n", e.what());
      ++failures;
    }
  }
  DeviceBuffer<float> moved = std::move(buf);
  if (buf.data() != nullptr || buf.size() != 0 || moved.size() != 4 || moved.data() == nullptr) {
    std::printf("FAIL DeviceBuffer move did not transfer ownership\n");
    ++failures;
  }
  return failures;
}

}  // namespace

namespace smoke {

int device_count(std::string* why) {
  int n = 0;
  cudaError_t const status = cudaGetDeviceCount(&n);
  if (status != cudaSuccess) {
    if (why) *why = cudaGetErrorString(status);
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int run_device_checks() {
  cudaStream_t stream = nullptr;
  MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Cuda const be{stream, 0};
  int failures = 0;
  failures += check_fill<float>(be, "float", (1u << 20) + 3, (1u << 20) + 3, 0.0f, 3.25f);
  failures += check_fill<float>(be, "float prefix", 1000, 777, -1.0f, 2.5f);
  failures += check_fill(be, "bf16", 4097, 4097, mambabyte::bf16(0.0f), mambabyte::bf16(1.5f));
  // More elements than one launch has threads (65535 blocks x 256): the grid-stride loop.
  failures += check_fill<int>(be, "int grid-stride", 65535u * 256u + 1000u, 65535u * 256u + 999u,
                              7, -42);
  failures += check_fill<double>(be, "double legacy stream", 12345, 12345, 0.0, 1e300);
  failures += check_errors(be);
  MAMBABYTE_CUDA_CHECK(cudaStreamDestroy(stream));
  return failures;
}

std::string describe_from_cuda_tu() {
  return std::string(mambabyte::version_string()) + " " +
         std::string(mambabyte::dtype_name(mambabyte::DType::kBF16)) + " " +
         std::to_string(mambabyte::bf16(1.5f).bits);
}

}  // namespace smoke
