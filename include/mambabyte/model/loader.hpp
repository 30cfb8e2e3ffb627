/*! \file
 *  \brief Loading and saving whole models: a directory with `config.json` and weights in
 *         safetensors (`model.safetensors`, mmap'd) or PyTorch (`pytorch_model.bin`) format,
 *         possibly sharded (`*.index.json` with a "weight_map"), in the mamba_ssm or the
 *         transformers naming, optionally under a `module.` prefix (DataParallel/DDP saves).
 *
 *  Loading is strict: every parameter the config implies must be present with exactly the
 *  shape mamba_ssm gives it, no unknown tensor may be left over, and every value must be
 *  finite. Anything else is a mambabyte::Error naming the file and the tensor. Saving writes
 *  `model.safetensors` + `config.json` in the mamba_ssm layout, each atomically.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/io/pytorch.hpp"
#include "mambabyte/io/safetensors.hpp"
#include "mambabyte/model/config.hpp"
#include "mambabyte/model/weights.hpp"

namespace mambabyte {

/// Where a model's files are and what was found in them (for `info` and error messages).
struct CheckpointInfo {
  std::filesystem::path directory;
  std::filesystem::path config_file;
  std::vector<std::filesystem::path> weight_files;
  std::string format;            ///< "safetensors" or "pytorch"
  std::string naming;            ///< "mamba_ssm" or "transformers"
  bool module_prefix = false;    ///< names carried a `module.` prefix
  std::map<DType, std::int64_t> stored_elements;  ///< elements per stored dtype
  std::int64_t file_bytes = 0;

  /// The dtype most parameters are stored in.
  DType stored_dtype() const {
    DType best = DType::kF32;
    std::int64_t n = -1;
    for (auto const& [d, c] : stored_elements)
      if (c > n) { best = d; n = c; }
    return best;
  }
};

namespace detail {

/// The mamba_ssm name of a tensor name as found in a file (module. prefix stripped,
/// transformers' `embeddings` renamed); sets the flags it had to use.
inline std::string canonical_tensor_name(std::string_view name, bool& had_module, bool& had_hf) {
  while (name.starts_with("module.")) {
    name.remove_prefix(7);
    had_module = true;
  }
  std::string n(name);
  if (n == "backbone.embeddings.weight") {
    had_hf = true;
    n = "backbone.embedding.weight";
  }
  return n;
}

/// The weight files of a model directory, in the order of preference.
inline std::vector<std::filesystem::path> find_weight_files(std::filesystem::path const& dir,
                                                            std::string& format) {
  namespace fs = std::filesystem;
  auto sharded = [&](fs::path const& index) {
    std::ifstream in(index);
    require(static_cast<bool>(in), "cannot open ", index.string());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (nlohmann::json::exception const& e) {
      fail(index.string(), ": not valid JSON: ", e.what());
    }
    require(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index.string(),
            ": expected an object with a \"weight_map\" object");
    std::vector<fs::path> files;
    std::set<std::string> seen;
    for (auto const& [tensor, file] : j["weight_map"].items()) {
      require(file.is_string(), index.string(), ": weight_map[\"", tensor, "\"] is not a file name");
      std::string const f = file.get<std::string>();
      require(!f.empty() && f.find('/') == std::string::npos && f.find("..") == std::string::npos,
              index.string(), ": weight_map names a file outside the directory: \"", f, "\"");
      if (seen.insert(f).second) files.push_back(dir / f);
    }
    require(!files.empty(), index.string(), ": the weight_map is empty");
    return files;
  };
  if (fs::exists(dir / "model.safetensors")) { format = "safetensors"; return {dir / "model.safetensors"}; }
  if (fs::exists(dir / "model.safetensors.index.json")) {
    format = "safetensors";
    return sharded(dir / "model.safetensors.index.json");
  }
  if (fs::exists(dir / "pytorch_model.bin")) { format = "pytorch"; return {dir / "pytorch_model.bin"}; }
  if (fs::exists(dir / "pytorch_model.bin.index.json")) {
    format = "pytorch";
    return sharded(dir / "pytorch_model.bin.index.json");
  }
  fail("no weights in ", dir.string(),
       ": expected model.safetensors, pytorch_model.bin or a sharded *.index.json");
}

}  // namespace detail

/// The model directory of `path`: the path itself if it is a directory, else its parent
/// (so a path to config.json or to a weights file works too). A training run directory
/// (no config.json, but a `latest` link to its newest checkpoint) resolves to that checkpoint.
inline std::filesystem::path model_directory(std::filesystem::path const& path) {
  namespace fs = std::filesystem;
  require(!path.empty(), "model path is empty");
  std::error_code ec;
  require(fs::exists(path, ec), "model path does not exist: ", path.string());
  if (fs::is_directory(path, ec)) {
    if (!fs::exists(path / "config.json", ec) && fs::is_directory(path / "latest", ec)) return path / "latest";
    return path;
  }
  return path.has_parent_path() ? path.parent_path() : fs::path(".");
}

/// The config of a model directory (config.json, either convention).
inline ModelConfig load_config(std::filesystem::path const& path) {
  auto const dir = model_directory(path);
  auto const file = dir / "config.json";
  require(std::filesystem::exists(file), "no config.json in ", dir.string());
  return ModelConfig::load(file);
}

/// Load a model directory into weights of type T (float or double); any stored float dtype
/// (F64, F32, F16, BF16) is converted. See the file comment for what is checked.
template <class T>
ModelWeights<T> load_weights(std::filesystem::path const& path, CheckpointInfo* info_out = nullptr) {
  namespace fs = std::filesystem;
  CheckpointInfo info;
  info.directory = model_directory(path);
  info.config_file = info.directory / "config.json";
  require(fs::exists(info.config_file), "no config.json in ", info.directory.string());
  ModelConfig const cfg = ModelConfig::load(info.config_file);
  ModelWeights<T> w(cfg);
  info.weight_files = detail::find_weight_files(info.directory, info.format);

  // Which file and record provides each canonical name.
  struct Source {
    std::size_t file;
    io::TensorRecord const* rec;
  };
  std::vector<io::TensorFile> files;
  files.reserve(info.weight_files.size());
  std::map<std::string, Source> found;
  bool had_module = false, had_hf = false;
  for (std::size_t f = 0; f < info.weight_files.size(); ++f) {
    fs::path const& p = info.weight_files[f];
    require(fs::exists(p), "weights file listed but missing: ", p.string());
    files.push_back(io::read_tensor_file(p));
    info.file_bytes += static_cast<std::int64_t>(fs::file_size(p));
    for (io::TensorRecord const& r : files.back().tensors()) {
      std::string const name = detail::canonical_tensor_name(r.name, had_module, had_hf);
      auto [it, fresh] = found.emplace(name, Source{f, &r});
      require(fresh, "tensor '", name, "' appears twice (in ", info.weight_files[it->second.file].string(),
              " and ", p.string(), ")");
    }
  }
  info.module_prefix = had_module;
  info.naming = had_hf ? "transformers" : "mamba_ssm";

  // Every parameter: present, right shape, float, finite.
  std::vector<std::string> missing;
  for (ParamInfo const& p : w.parameters()) {
    auto it = found.find(p.name);
    if (it == found.end()) {
      missing.push_back(p.name);
      continue;
    }
    io::TensorRecord const& r = *it->second.rec;
    std::string const& file = info.weight_files[it->second.file].string();
    require(r.shape == p.shape, "tensor '", r.name, "' in ", file, " has shape ", io::detail::shape_string(r.shape),
            " but the config (", info.config_file.string(), ") implies ", io::detail::shape_string(p.shape));
    io::convert_to<T>(r, w.tensor(p), file);
    info.stored_elements[r.dtype] += r.numel();
    for (T v : w.tensor(p))
      if (!std::isfinite(v)) fail("tensor '", r.name, "' in ", file, " contains a non-finite value (", v, ")");
    found.erase(it);
  }
  if (!missing.empty()) {
    std::string list;
    for (std::size_t i = 0; i < missing.size() && i < 5; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 5) list += ", ... (" + std::to_string(missing.size()) + " in all)";
    fail("checkpoint ", info.directory.string(), " lacks tensors the config implies: ", list);
  }
  // A tied head may still be stored (transformers and mamba_ssm state dicts both contain it):
  // it must then equal the embedding.
  if (cfg.tie_embeddings) {
    if (auto it = found.find("lm_head.weight"); it != found.end()) {
      io::TensorRecord const& r = *it->second.rec;
      std::string const& file = info.weight_files[it->second.file].string();
      ParamInfo const& emb = *w.find("backbone.embedding.weight");
      require(r.shape == emb.shape, "tensor '", r.name, "' in ", file, " has shape ", io::detail::shape_string(r.shape),
              " but the tied embedding has ", io::detail::shape_string(emb.shape));
      std::vector<T> head(emb.numel);
      io::convert_to<T>(r, std::span<T>(head), file);
      auto e = w.tensor(emb);
      for (std::size_t i = 0; i < head.size(); ++i)
        require(head[i] == e[i], "config.json says the embeddings are tied, but '", r.name, "' in ", file,
                " differs from the embedding (element ", i, ")");
      found.erase(it);
    }
  }
  if (!found.empty()) {
    std::string list;
    int k = 0;
    for (auto const& [name, src] : found) {
      if (k++ == 5) { list += ", ..."; break; }
      list += (k > 1 ? ", " : "") + src.rec->name;
    }
    fail("checkpoint ", info.directory.string(), " has ", found.size(),
         " tensor(s) the config does not account for (wrong config or not a Mamba model?): ", list);
  }
  if (info_out) *info_out = std::move(info);
  return w;
}

/// Save weights as `<dir>/model.safetensors` + `<dir>/config.json` in the mamba_ssm layout
/// (both files written atomically; the directory is created). `storage` is the stored dtype
/// (F32 by default; F64, F16, BF16 also accepted). A tied head is also written as
/// `lm_head.weight` so that `MambaLMHeadModel.load_state_dict(..., strict=True)` accepts it.
template <class T>
void save_model(ModelWeights<T> const& w, std::filesystem::path const& dir, DType storage = DType::kF32,
                std::map<std::string, std::string> metadata = {}) {
  namespace fs = std::filesystem;
  require(storage == DType::kF32 || storage == DType::kF64 || storage == DType::kF16 || storage == DType::kBF16,
          "save_model: storage dtype must be F64, F32, F16 or BF16 (got ", dtype_name(storage), ")");
  std::error_code ec;
  fs::create_directories(dir, ec);
  require(!ec && fs::is_directory(dir), "cannot create directory ", dir.string(), ": ", ec.message());
  std::size_t total = 0;
  for (ParamInfo const& p : w.parameters()) total += p.numel;
  bool const write_tied_head = w.config().tie_embeddings;
  ParamInfo const* emb = w.find("backbone.embedding.weight");
  if (write_tied_head) total += emb->numel;
  std::size_t const es = dtype_size(storage);
  std::vector<std::byte> buf(total * es);
  std::vector<io::TensorWrite> out;
  std::size_t off = 0;
  auto put = [&](std::string name, std::vector<std::int64_t> const& shape, std::span<T const> src) {
    std::byte* dst = buf.data() + off * es;
    for (std::size_t i = 0; i < src.size(); ++i) {
      switch (storage) {
        case DType::kF64: { double v = static_cast<double>(src[i]); std::memcpy(dst + i * 8, &v, 8); break; }
        case DType::kF32: { float v = static_cast<float>(src[i]); std::memcpy(dst + i * 4, &v, 4); break; }
        case DType::kF16: { std::uint16_t v = float_to_half_bits(static_cast<float>(src[i])); std::memcpy(dst + i * 2, &v, 2); break; }
        default: { std::uint16_t v = bf16::from_float(static_cast<float>(src[i])); std::memcpy(dst + i * 2, &v, 2); break; }
      }
    }
    out.push_back({std::move(name), storage, shape, dst});
    off += src.size();
  };
  for (ParamInfo const& p : w.parameters()) put(p.name, p.shape, w.tensor(p));
  if (write_tied_head) put("lm_head.weight", emb->shape, w.tensor(*emb));
  metadata.emplace("format", "pt");  // what transformers/safetensors' torch loader expect
  io::write_safetensors(dir / "model.safetensors", std::span<io::TensorWrite const>(out), metadata);
  w.config().save(dir / "config.json");
}

}  // namespace mambabyte
