// cuda_glue.hpp on the CUDA backend (compiled by nvcc when MAMBABYTE_WITH_CUDA=ON).
#include "cli/cuda_glue.hpp"

#include <mambabyte/cuda.hpp>

#include <cstdio>
#include <map>

namespace mbcli {

namespace mcu = mambabyte::cuda;

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: not an error for --device auto
    return 0;
  }
  return n;
}

std::string cuda_device_name(int device) {
  cudaDeviceProp p{};
  MAMBABYTE_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  char buf[64];
  std::snprintf(buf, sizeof buf, ", %.0f GiB", double(p.totalGlobalMem) / double(1ull << 30));
  return std::string(p.name) + buf;
}

namespace {
/// One non-blocking stream per device for the whole program (CUDA graphs need a real stream).
mambabyte::backend::Cuda make_be(int device) {
  static std::map<int, cudaStream_t> streams;
  int const n = cuda_device_count();
  mambabyte::require(device >= 0 && device < n, "--device cuda:", device, ": this machine has ", n, " CUDA device",
                     n == 1 ? "" : "s");
  mambabyte::backend::Cuda be;
  be.device = device;
  auto it = streams.find(device);
  if (it == streams.end()) {
    mambabyte::backend::cuda::ScopedDevice guard(device);
    cudaStream_t s = nullptr;
    MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    it = streams.emplace(device, s).first;
  }
  be.stream = it->second;
  return be;
}
void check_precision(std::string const& p) {
  mambabyte::require(p == "bf16" || p == "fp32", "--precision must be bf16 or fp32, got \"", p, "\"");
}
}  // namespace

std::unique_ptr<mambabyte::train::StepEngine<float>> make_cuda_engine(mambabyte::ModelConfig const& config,
                                                                     std::string const& precision, int device,
                                                                     bool recompute, bool keep_scan_states) {
  check_precision(precision);
  auto const be = make_be(device);
  auto make = [&](auto tag) -> std::unique_ptr<mambabyte::train::StepEngine<float>> {
    auto e = std::make_unique<mcu::CudaStepEngine<decltype(tag)>>(config, be);
    e->model().set_keep_activations(!recompute);
    e->model().set_keep_scan_states(keep_scan_states);
    return e;
  };
  if (precision == "fp32") return make(float{});
  return make(mcu::bf16{});
}

mambabyte::EvalResult cuda_evaluate(mambabyte::ModelWeights<float> const& w, std::span<std::uint8_t const> data,
                                    mambabyte::EvalOptions const& options, std::string const& precision,
                                    int device) {
  check_precision(precision);
  auto const be = make_be(device);
  auto run = [&](auto tag) {
    using S = decltype(tag);
    mcu::DeviceWeights<S> dw(w, be);
    mcu::Model<S> m(be);
    return mcu::evaluate_bits_per_byte(m, dw, data, options);
  };
  if (precision == "fp32") return run(float{});
  return run(mcu::bf16{});
}

std::vector<std::string> cuda_generate(mambabyte::ModelWeights<float> const& w, std::string_view prompt, int n_bytes,
                                       mambabyte::SamplingOptions const& sampling, int batch,
                                       mambabyte::GenerateCallback const& on_text, std::string const& precision,
                                       int device) {
  check_precision(precision);
  auto const be = make_be(device);
  if (precision == "fp32") {
    mcu::Generator<float> g(w, be);
    return mambabyte::generate(g, prompt, n_bytes, sampling, batch, on_text);
  }
  mcu::Generator<mcu::bf16> g(w, be);
  return mambabyte::generate(g, prompt, n_bytes, sampling, batch, on_text);
}

}  // namespace mbcli
