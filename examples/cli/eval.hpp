// `mambabyte eval --model DIR --data FILE`: bits per byte of every byte of FILE after the first,
// each predicted from its whole prefix (state carried across chunks, constant memory).
#pragma once

#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/common.hpp"

namespace mbcli {

struct EvalCliOptions {
  ModelOptions model;
  std::string data;
  std::int64_t max_bytes = -1;
  int chunk = 4096;
  bool json = false;
  bool progress = true;
  std::vector<std::string> noise;  ///< KIND[:P] specs: add a clean-vs-noisy table
  std::uint64_t noise_seed = 0;
};

inline int run_eval(EvalCliOptions const& o) {
  require(o.chunk >= 1, "--chunk must be >= 1, got ", o.chunk);
  require(o.max_bytes == -1 || o.max_bytes >= 2, "--max-bytes must be at least 2 (got ", o.max_bytes, ")");
  std::vector<Noise> noises;
  for (auto const& spec : o.noise) noises.push_back(Noise::parse(spec));
  io::MappedFile const file(o.data);
  auto const bytes = file.bytes();
  require(bytes.size() >= 2, "--data ", o.data, " has ", bytes.size(),
          " byte(s): at least 2 are needed (the first byte is only context)");
  std::span<std::uint8_t const> data(reinterpret_cast<std::uint8_t const*>(bytes.data()), bytes.size());
  if (o.max_bytes > 0 && static_cast<std::size_t>(o.max_bytes) < data.size()) data = data.first(static_cast<std::size_t>(o.max_bytes));
  DeviceChoice const dev = resolve_device(o.model.device, o.model.dtype, o.model.precision);
  auto report = [&](auto&& evaluate) {
    auto score = [&](std::span<std::uint8_t const> text, std::string const& label) {
      EvalOptions eo;
      eo.chunk = o.chunk;
      bool const bar = o.progress && stderr_is_terminal();
      if (bar)
        eo.progress = [&label](std::int64_t done, std::int64_t total) {
          std::fprintf(stderr, "\r  %s: %lld / %lld bytes (%.0f%%)", label.c_str(), static_cast<long long>(done),
                       static_cast<long long>(total), total > 0 ? 100.0 * double(done) / double(total) : 100.0);
        };
      EvalResult const r = evaluate(text, eo);
      if (bar) std::fprintf(stderr, "\r\033[K");
      return r;
    };
    EvalResult const r = score(data, "clean");
    std::printf("bits per byte  %.6f\nbytes          %lld predicted (of %s)\nseconds        %.3f\nbytes/s        %.1f\n",
                r.bits_per_byte, static_cast<long long>(r.bytes_predicted), o.data.c_str(), r.seconds,
                r.bytes_per_second);
    nlohmann::json j = {{"bits_per_byte", r.bits_per_byte}, {"bytes", r.bytes_predicted},
                        {"seconds", r.seconds},             {"bytes_per_second", r.bytes_per_second},
                        {"nll_nats", r.nll_nats_sum},       {"model", o.model.model_dir},
                        {"data", o.data},                   {"dtype", dev.cuda ? o.model.precision : o.model.dtype},
                        {"device", dev.describe()}};
    if (!noises.empty()) {
      // the paper's robustness experiment: the same text, clean and under each noise
      std::printf("\n%-16s %12s %12s %10s\n", "noise", "bytes", "bits/byte", "change");
      std::printf("%-16s %12lld %12.4f %10s\n", "clean", static_cast<long long>(r.bytes_predicted), r.bits_per_byte, "");
      std::string_view const clean(reinterpret_cast<char const*>(data.data()), data.size());
      nlohmann::json rows = nlohmann::json::array();
      for (Noise const& n : noises) {
        std::string const noisy = apply_noise(clean, n, o.noise_seed);
        require(noisy.size() >= 2, "noise ", n.name(), " left fewer than 2 bytes of the text");
        EvalResult const rn = score({reinterpret_cast<std::uint8_t const*>(noisy.data()), noisy.size()}, n.name());
        std::printf("%-16s %12lld %12.4f %+10.4f\n", n.name().c_str(), static_cast<long long>(rn.bytes_predicted),
                    rn.bits_per_byte, rn.bits_per_byte - r.bits_per_byte);
        std::fflush(stdout);
        rows.push_back({{"noise", n.name()}, {"bits_per_byte", rn.bits_per_byte}, {"bytes", rn.bytes_predicted},
                        {"seconds", rn.seconds}});
      }
      j["noise"] = rows;
      j["noise_seed"] = o.noise_seed;
    }
    if (o.json) std::cout << j.dump() << std::endl;
  };
  if (dev.cuda) {
    ModelWeights<float> const w = load_weights<float>(o.model.model_dir);
    report([&](std::span<std::uint8_t const> text, EvalOptions const& eo) {
      return cuda_evaluate(w, text, eo, o.model.precision, dev.index);
    });
  } else {
    with_model(o.model, [&](auto& m, CheckpointInfo const&) {
      report([&](std::span<std::uint8_t const> text, EvalOptions const& eo) { return evaluate_bits_per_byte(m, text, eo); });
    });
  }
  return 0;
}

}  // namespace mbcli
