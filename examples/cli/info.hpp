// `mambabyte info --model DIR`: what a checkpoint is and what running it costs.
#pragma once

#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/common.hpp"

namespace mbcli {

struct InfoOptions {
  ModelOptions model;
  bool json = false;
};

inline int run_info(InfoOptions const& o) {
  with_model(o.model, [&](auto& m, CheckpointInfo const& info) {
    using T = typename std::decay_t<decltype(m)>::value_type;
    ModelConfig const& c = m.config();
    std::int64_t const params = c.parameter_count();
    std::size_t const weight_bytes = m.weights().flat().size() * sizeof(T);
    std::size_t const state_bytes = InferenceState<T>(c, 1).bytes();
    std::string files;
    for (auto const& f : info.weight_files) files += (files.empty() ? "" : ", ") + f.filename().string();
    if (o.json) {
      nlohmann::json j = {{"directory", info.directory.string()},
                          {"weight_files", files},
                          {"format", info.format},
                          {"naming", info.naming},
                          {"module_prefix", info.module_prefix},
                          {"stored_dtype", std::string(dtype_name(info.stored_dtype()))},
                          {"compute_dtype", o.model.dtype},
                          {"parameters", params},
                          {"file_bytes", info.file_bytes},
                          {"weight_bytes", weight_bytes},
                          {"state_bytes_per_sequence", state_bytes},
                          {"config", c.to_json()}};
      std::cout << j.dump() << "\n";
      return;
    }
    std::cout << "model        " << info.directory.string() << "\n"
              << "weights      " << files << " (" << info.format << ", " << info.naming << " names"
              << (info.module_prefix ? ", module. prefix" : "") << ", " << human_bytes(double(info.file_bytes)) << ")\n"
              << "stored dtype " << dtype_name(info.stored_dtype()) << ", computing in " << o.model.dtype << "\n"
              << "parameters   " << params << " (" << human_count(double(params)) << ")\n"
              << "architecture d_model " << c.d_model << ", n_layer " << c.n_layer << ", d_inner " << c.d_inner()
              << ", d_state " << c.d_state << ", d_conv " << c.d_conv << ", dt_rank " << c.dt_rank << ", vocab "
              << c.vocab_size << "\n"
              << "             " << (c.rms_norm ? "RMSNorm" : "LayerNorm") << ", "
              << (c.tie_embeddings ? "tied" : "untied") << " head, in/out_proj bias " << (c.bias ? "yes" : "no")
              << ", conv bias " << (c.conv_bias ? "yes" : "no") << ", norm eps " << c.norm_eps << "\n"
              << "memory       weights " << human_bytes(double(weight_bytes)) << " in memory; decoding state "
              << human_bytes(double(state_bytes)) << " per sequence (constant in the text length)\n";
  });
  return 0;
}

}  // namespace mbcli
