// Shared pieces of the `mambabyte` command-line program: loading a model in the requested
// dtype, threads, human-readable sizes, reading a whole data file.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <unistd.h>

#include <mambabyte/mambabyte.hpp>

namespace mbcli {

using namespace mambabyte;

/// Options every model command takes.
struct ModelOptions {
  std::string model_dir;
  std::string dtype = "float";  ///< compute dtype: float or double
  int threads = 0;              ///< 0 = all cores (OpenMP default)
};

inline backend::Cpu make_backend(ModelOptions const& o) {
  require(o.threads >= 0, "--threads must be >= 0 (0 = all cores), got ", o.threads);
  backend::cpu::set_default_threads(o.threads);
  return backend::Cpu{o.threads};
}

/// Run fn(model, info) with the model loaded in the requested dtype (scan::Auto).
template <class Fn>
void with_model(ModelOptions const& o, Fn&& fn) {
  backend::Cpu const be = make_backend(o);
  CheckpointInfo info;
  if (o.dtype == "float") {
    Model<float> m(load_weights<float>(o.model_dir, &info), be);
    fn(m, info);
  } else if (o.dtype == "double") {
    Model<double> m(load_weights<double>(o.model_dir, &info), be);
    fn(m, info);
  } else {
    fail("--dtype must be float or double, got \"", o.dtype, "\"");
  }
}

inline std::string human_bytes(double b) {
  char const* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) { b /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", b, unit[u]);
  return buf;
}

inline std::string human_count(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", n);
  return buf;
}

inline bool stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace mbcli
