// The CLI's seam to the CUDA backend: plain C++ declarations (no CUDA types), defined in
// cuda_glue.cu when the program is built with MAMBABYTE_WITH_CUDA=ON and in cuda_glue_none.cpp
// otherwise, so the rest of the CLI compiles with g++ either way.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <mambabyte/decoding/evaluate.hpp>
#include <mambabyte/decoding/generate.hpp>
#include <mambabyte/model/weights.hpp>
#include <mambabyte/train/trainer.hpp>

namespace mbcli {

/// Whether this program was built with the CUDA backend, and how many GPUs it sees.
bool cuda_compiled();
int cuda_device_count();
/// "<name>, <memory> GiB" of a device.
std::string cuda_device_name(int device);

/// A trainer step engine on GPU `device`; precision "bf16" (mixed) or "fp32"; `recompute`:
/// the backward recomputes each layer's conv output and normed input instead of keeping them
/// from the forward (less memory, a slower step); `keep_scan_states`: the forward keeps every
/// layer's scan states for the backward (cuda::Model::set_keep_scan_states: more memory, a
/// shorter backward).
std::unique_ptr<mambabyte::train::StepEngine<float>> make_cuda_engine(mambabyte::ModelConfig const& config,
                                                                     std::string const& precision, int device,
                                                                     bool recompute = false,
                                                                     bool keep_scan_states = false);

/// Bits per byte of `w` on `data`, computed on GPU `device` in `precision`.
mambabyte::EvalResult cuda_evaluate(mambabyte::ModelWeights<float> const& w, std::span<std::uint8_t const> data,
                                    mambabyte::EvalOptions const& options, std::string const& precision,
                                    int device);

/// generate() (decoding/generate.hpp) on GPU `device` in `precision`.
std::vector<std::string> cuda_generate(mambabyte::ModelWeights<float> const& w, std::string_view prompt, int n_bytes,
                                       mambabyte::SamplingOptions const& sampling, int batch,
                                       mambabyte::GenerateCallback const& on_text, std::string const& precision,
                                       int device);

}  // namespace mbcli
