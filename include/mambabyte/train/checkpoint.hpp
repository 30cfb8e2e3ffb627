/*! \file
 *  \brief Training checkpoints that survive a kill at any moment.
 *
 *  Layout of a run directory:
 *
 *      OUT/checkpoint-00000200/config.json         mamba_ssm layout (loadable by PyTorch users)
 *      OUT/checkpoint-00000200/model.safetensors   weights, stored in the training dtype (exact)
 *      OUT/checkpoint-00000200/optimizer.safetensors   AdamW moments m.<name>, v.<name>
 *      OUT/checkpoint-00000200/trainer.json        step, seeds, options: everything resume needs
 *      OUT/latest -> checkpoint-00000200           symlink, replaced atomically
 *
 *  A checkpoint is written into `checkpoint-N.tmp/`, every file fsync'ed, then the directory
 *  is renamed to `checkpoint-N` and `latest` is swung over by rename(2) of a fresh symlink.
 *  Until that rename, `latest` names the previous complete checkpoint; after it, the new one.
 *  Older checkpoints beyond `keep` are removed only afterwards. `mambabyte eval --model OUT`
 *  follows `latest` (see model_directory()).
 */
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "mambabyte/core/error.hpp"
#include "mambabyte/io/safetensors.hpp"
#include "mambabyte/model/loader.hpp"
#include "mambabyte/train/optimizer.hpp"

namespace mambabyte::train {

namespace detail {

inline void fsync_path(std::filesystem::path const& p, bool directory) {
  int const fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return;  // best effort: not every filesystem lets us open a directory
  (void)::fsync(fd);
  ::close(fd);
}

inline void write_json_atomic(std::filesystem::path const& file, nlohmann::json const& j) {
  auto tmp = file;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    require(static_cast<bool>(out), "cannot write ", tmp.string());
    out << j.dump(2) << "\n";
    out.flush();
    require(static_cast<bool>(out), "write failed: ", tmp.string());
  }
  fsync_path(tmp, false);
  std::error_code ec;
  std::filesystem::rename(tmp, file, ec);
  require(!ec, "cannot rename ", tmp.string(), " to ", file.string(), ": ", ec.message());
}

inline std::string checkpoint_name(std::int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "checkpoint-%08lld", static_cast<long long>(step));
  return buf;
}

}  // namespace detail

/// Save weights + optimizer + trainer state as OUT/checkpoint-<step>, then point OUT/latest
/// at it and keep only the newest `keep` checkpoints. `trainer_state` is stored as
/// trainer.json (it must hold what resume needs beyond weights and moments).
template <class T>
std::filesystem::path save_checkpoint(std::filesystem::path const& out, ModelWeights<T> const& w, AdamW<T> const& opt,
                                      nlohmann::json trainer_state, int keep = 2) {
  namespace fs = std::filesystem;
  std::int64_t const step = opt.step_count();
  std::error_code ec;
  fs::create_directories(out, ec);
  require(!ec && fs::is_directory(out), "cannot create output directory ", out.string(),
          ec ? ": " + ec.message() : std::string());
  std::string const name = detail::checkpoint_name(step);
  fs::path const final_dir = out / name, tmp_dir = out / (name + ".tmp");
  fs::remove_all(tmp_dir, ec);
  fs::create_directories(tmp_dir, ec);
  require(!ec, "cannot create ", tmp_dir.string(), ": ", ec.message());
  try {
    DType const storage = std::is_same_v<T, double> ? DType::kF64 : DType::kF32;
    save_model(w, tmp_dir, storage, {{"step", std::to_string(step)}});
    // optimizer moments, same names as the weights
    std::vector<io::TensorWrite> tensors;
    for (ParamInfo const& p : opt.parameters()) {
      tensors.push_back({"m." + p.name, storage, p.shape, opt.first_moment().data() + p.offset});
      tensors.push_back({"v." + p.name, storage, p.shape, opt.second_moment().data() + p.offset});
    }
    io::write_safetensors(tmp_dir / "optimizer.safetensors", std::span<io::TensorWrite const>(tensors),
                          {{"step", std::to_string(step)}});
    trainer_state["step"] = step;
    trainer_state["dtype"] = std::is_same_v<T, double> ? "double" : "float";
    detail::write_json_atomic(tmp_dir / "trainer.json", trainer_state);
    detail::fsync_path(tmp_dir, true);
    fs::remove_all(final_dir, ec);  // a checkpoint of this step from an earlier, abandoned run
    fs::rename(tmp_dir, final_dir, ec);
    require(!ec, "cannot rename ", tmp_dir.string(), " to ", final_dir.string(), ": ", ec.message());
    detail::fsync_path(out, true);
    // swing `latest`
    fs::path const link_tmp = out / "latest.tmp";
    fs::remove(link_tmp, ec);
    fs::create_directory_symlink(name, link_tmp, ec);
    require(!ec, "cannot create symlink ", link_tmp.string(), ": ", ec.message());
    fs::rename(link_tmp, out / "latest", ec);
    require(!ec, "cannot update ", (out / "latest").string(), ": ", ec.message());
    detail::fsync_path(out, true);
  } catch (...) {
    fs::remove_all(tmp_dir, ec);  // the previous checkpoint and `latest` are untouched
    throw;
  }
  // prune old checkpoints (never the one just written)
  std::vector<fs::path> old;
  for (auto const& e : fs::directory_iterator(out, ec)) {
    std::string const n = e.path().filename().string();
    if (e.is_directory() && n.starts_with("checkpoint-") && !n.ends_with(".tmp") && n != name) old.push_back(e.path());
  }
  std::sort(old.begin(), old.end());
  for (std::size_t i = 0; i + static_cast<std::size_t>(std::max(keep - 1, 0)) < old.size(); ++i) fs::remove_all(old[i], ec);
  return final_dir;
}

/// What a checkpoint holds besides the weights.
template <class T>
struct LoadedCheckpoint {
  ModelWeights<T> weights;
  AdamW<T> optimizer;
  nlohmann::json trainer_state;
  std::filesystem::path directory;
};

/// Load OUT/latest (or a checkpoint directory itself) for resuming. The optimizer takes the
/// options given (a resumed run may change e.g. the learning rate) and the stored moments.
template <class T>
LoadedCheckpoint<T> load_checkpoint(std::filesystem::path const& path, AdamWOptions const& opt_options) {
  namespace fs = std::filesystem;
  fs::path const dir = model_directory(path);
  require(fs::exists(dir / "trainer.json"), "no trainer.json in ", dir.string(), ": not a training checkpoint");
  LoadedCheckpoint<T> c;
  c.directory = dir;
  {
    std::ifstream in(dir / "trainer.json");
    try {
      c.trainer_state = nlohmann::json::parse(in);
    } catch (nlohmann::json::exception const& e) {
      fail((dir / "trainer.json").string(), ": not valid JSON: ", e.what());
    }
  }
  require(c.trainer_state.is_object() && c.trainer_state.contains("step") && c.trainer_state["step"].is_number_integer(),
          (dir / "trainer.json").string(), ": no integer \"step\"");
  std::string const want = std::is_same_v<T, double> ? "double" : "float";
  require(c.trainer_state.value("dtype", want) == want, dir.string(), ": the checkpoint was trained in ",
          c.trainer_state.value("dtype", std::string("?")), ", not ", want);
  c.weights = load_weights<T>(dir);
  c.optimizer = AdamW<T>(c.weights.config(), opt_options);
  auto const f = io::read_safetensors(dir / "optimizer.safetensors");
  for (ParamInfo const& p : c.optimizer.parameters()) {
    for (auto [prefix, dst] : {std::pair{"m.", c.optimizer.first_moment()}, std::pair{"v.", c.optimizer.second_moment()}}) {
      io::TensorRecord const& r = f.at(prefix + p.name);
      require(r.shape == p.shape, "optimizer state '", r.name, "' in ", dir.string(), " has the wrong shape");
      io::convert_to<T>(r, dst.subspan(p.offset, p.numel), (dir / "optimizer.safetensors").string());
    }
  }
  c.optimizer.set_step_count(c.trainer_state["step"].template get<std::int64_t>());
  return c;
}

}  // namespace mambabyte::train
