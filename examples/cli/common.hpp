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

#include "cli/cuda_glue.hpp"

namespace mbcli {

using namespace mambabyte;

/// Options every model command takes.
struct ModelOptions {
  std::string model_dir;
  std::string dtype = "float";  ///< compute dtype: float or double
  int threads = 0;              ///< 0 = all cores (OpenMP default)
  std::string device = "auto";  ///< auto | cpu | cuda | cuda:N
  std::string precision = "bf16";  ///< on a GPU: bf16 (mixed) or fp32
};

/// Where a command runs: the CPU, or CUDA device `index`.
struct DeviceChoice {
  bool cuda = false;
  int index = 0;
  std::string describe() const { return cuda ? "cuda:" + std::to_string(index) + " (" + cuda_device_name(index) + ")" : "cpu"; }
};

/// --device: "auto" is the first GPU when the program has the CUDA backend and a GPU is
/// present, else the CPU; "cuda" / "cuda:N" insist on a GPU; --dtype double runs on the CPU
/// only. --precision must be bf16 or fp32.
inline DeviceChoice resolve_device(std::string const& flag, std::string const& dtype, std::string const& precision) {
  require(precision == "bf16" || precision == "fp32", "--precision must be bf16 or fp32, got \"", precision, "\"");
  DeviceChoice d;
  if (flag == "cpu") return d;
  if (flag == "auto") {
    d.cuda = dtype != "double" && cuda_compiled() && cuda_device_count() > 0;
    return d;
  }
  require(flag.rfind("cuda", 0) == 0, "--device must be auto, cpu, cuda or cuda:N, got \"", flag, "\"");
  std::string const rest = flag.substr(4);
  if (!rest.empty()) {
    require(rest[0] == ':' && rest.size() > 1 && rest.find_first_not_of("0123456789", 1) == std::string::npos,
            "--device must be auto, cpu, cuda or cuda:N, got \"", flag, "\"");
    d.index = std::stoi(rest.substr(1));
  }
  require(cuda_compiled(), "--device ", flag, ": this mambabyte was built without the CUDA backend (configure with "
          "-DMAMBABYTE_WITH_CUDA=ON) ");
  int const n = cuda_device_count();
  require(d.index < n, "--device ", flag, ": this machine has ", n, " CUDA device", n == 1 ? "" : "s");
  require(dtype != "double", "--dtype double runs on the CPU only (the GPU computes in fp32 or bf16): use --device cpu");
  d.cuda = true;
  return d;
}

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
