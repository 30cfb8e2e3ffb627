// cuda_glue.hpp for a build without the CUDA backend: no devices; asking for one is an error
// that says how to get it.
#include "cli/cuda_glue.hpp"

#include <mambabyte/core/error.hpp>

namespace mbcli {

namespace {
[[noreturn]] void no_cuda() {
  mambabyte::fail("this mambabyte was built without the CUDA backend: configure with -DMAMBABYTE_WITH_CUDA=ON "
                  "(nvcc on PATH) or use --device cpu");
}
}  // namespace

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { no_cuda(); }
std::unique_ptr<mambabyte::train::StepEngine<float>> make_cuda_engine(mambabyte::ModelConfig const&,
                                                                     std::string const&, int, bool, bool) {
  no_cuda();
}
mambabyte::EvalResult cuda_evaluate(mambabyte::ModelWeights<float> const&, std::span<std::uint8_t const>,
                                    mambabyte::EvalOptions const&, std::string const&, int) {
  no_cuda();
}

std::vector<std::string> cuda_generate(mambabyte::ModelWeights<float> const&, std::string_view, int,
                                       mambabyte::SamplingOptions const&, int, mambabyte::GenerateCallback const&,
                                       std::string const&, int) {
  no_cuda();
}

}  // namespace mbcli
