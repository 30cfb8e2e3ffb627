// `mambabyte generate --model DIR --prompt TEXT`: sample bytes after a prompt, streamed as
// complete UTF-8 characters; one prefill, then one constant-memory step per byte.
#pragma once

#include <cstdio>
#include <iostream>

#include "cli/common.hpp"

namespace mbcli {

struct GenerateCliOptions {
  ModelOptions model;
  std::string prompt;
  int n = 256;
  SamplingOptions sampling;
  int batch = 1;
  bool echo_prompt = true;
};

inline int run_generate(GenerateCliOptions const& o) {
  require(o.n >= 0, "-n must be >= 0, got ", o.n);
  require(o.batch >= 1, "--batch must be >= 1, got ", o.batch);
  require(!o.prompt.empty(), "--prompt is empty: a byte model has no start token, give it at least one byte");
  o.sampling.validate();
  with_model(o.model, [&](auto& m, CheckpointInfo const&) {
    auto const t0 = std::chrono::steady_clock::now();
    if (o.batch == 1) {
      if (o.echo_prompt) std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
      std::fflush(stdout);
      generate(m, o.prompt, o.n, o.sampling, 1, [](int, std::string_view piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      });
      std::fputc('\n', stdout);
    } else {
      auto const out = generate(m, o.prompt, o.n, o.sampling, o.batch, [](int, std::string_view) {});
      for (int b = 0; b < o.batch; ++b) {
        std::printf("--- sample %d ---\n", b);
        if (o.echo_prompt) std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
        Utf8Streamer s;  // render raw bytes UTF-8-safely
        auto const piece = s.feed(std::string_view(out[static_cast<std::size_t>(b)]));
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        auto const tail = s.flush();
        std::fwrite(tail.data(), 1, tail.size(), stdout);
        std::fputc('\n', stdout);
      }
    }
    double const s = seconds_since(t0);
    std::fprintf(stderr, "[%d x %d bytes in %.2f s: %.1f bytes/s]\n", o.batch, o.n, s,
                 s > 0 ? double(o.batch) * o.n / s : 0.0);
  });
  return 0;
}

}  // namespace mbcli
