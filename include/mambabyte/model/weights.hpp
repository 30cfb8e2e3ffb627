/*! \file
 *  \brief ModelWeights: every parameter of a Mamba LM in one allocation (llm.c style), with
 *         typed per-layer views and an enumeration in the mamba_ssm naming and shapes that the
 *         loader, the saver, `info` and the optimiser all walk.
 */
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/model/config.hpp"

namespace mambabyte {

/// Views into the flat parameter buffer for one Mamba block. Optional parts are null.
template <class T>
struct LayerWeights {
  T* norm_w = nullptr;      ///< (d_model)
  T* norm_b = nullptr;      ///< (d_model), LayerNorm only
  T* in_proj_w = nullptr;   ///< (2*d_inner, d_model)
  T* in_proj_b = nullptr;   ///< (2*d_inner), config.bias only
  T* conv_w = nullptr;      ///< (d_inner, d_conv)   [file shape (d_inner, 1, d_conv)]
  T* conv_b = nullptr;      ///< (d_inner), config.conv_bias only
  T* x_proj_w = nullptr;    ///< (dt_rank + 2*d_state, d_inner)
  T* dt_proj_w = nullptr;   ///< (d_inner, dt_rank)
  T* dt_proj_b = nullptr;   ///< (d_inner)
  T* A_log = nullptr;       ///< (d_inner, d_state)
  T* D = nullptr;           ///< (d_inner)
  T* out_proj_w = nullptr;  ///< (d_model, d_inner)
  T* out_proj_b = nullptr;  ///< (d_model), config.bias only
};

/// One parameter as seen from outside: mamba_ssm name, file shape, place in the flat buffer.
struct ParamInfo {
  std::string name;
  std::vector<std::int64_t> shape;
  std::size_t offset = 0;     ///< in elements, into the flat buffer
  std::size_t numel = 0;
  bool no_weight_decay = false;  ///< A_log, D, biases, norm weights (mamba_ssm convention)
};

/// The parameter list of a config, in mamba_ssm state_dict order. Offsets are aligned to 16
/// elements so every tensor starts on a 64-byte boundary (floats).
inline std::vector<ParamInfo> parameter_layout(ModelConfig const& c, std::size_t* total = nullptr) {
  std::vector<ParamInfo> out;
  std::size_t off = 0;
  auto add = [&](std::string name, std::vector<std::int64_t> shape, bool nwd) {
    std::size_t n = 1;
    for (auto s : shape) n *= static_cast<std::size_t>(s);
    out.push_back({std::move(name), std::move(shape), off, n, nwd});
    off += (n + 15) / 16 * 16;
  };
  std::int64_t const dm = c.d_model, di = c.d_inner(), N = c.d_state, R = c.dt_rank, V = c.vocab_size;
  add("backbone.embedding.weight", {V, dm}, false);
  for (int i = 0; i < c.n_layer; ++i) {
    std::string const p = "backbone.layers." + std::to_string(i) + ".";
    add(p + "mixer.A_log", {di, N}, true);
    add(p + "mixer.D", {di}, true);
    add(p + "mixer.in_proj.weight", {2 * di, dm}, false);
    if (c.bias) add(p + "mixer.in_proj.bias", {2 * di}, true);
    add(p + "mixer.conv1d.weight", {di, 1, c.d_conv}, false);
    if (c.conv_bias) add(p + "mixer.conv1d.bias", {di}, true);
    add(p + "mixer.x_proj.weight", {R + 2 * N, di}, false);
    add(p + "mixer.dt_proj.weight", {di, R}, false);
    add(p + "mixer.dt_proj.bias", {di}, true);
    add(p + "mixer.out_proj.weight", {dm, di}, false);
    if (c.bias) add(p + "mixer.out_proj.bias", {dm}, true);
    add(p + "norm.weight", {dm}, true);
    if (!c.rms_norm) add(p + "norm.bias", {dm}, true);
  }
  add("backbone.norm_f.weight", {dm}, true);
  if (!c.rms_norm) add("backbone.norm_f.bias", {dm}, true);
  if (!c.tie_embeddings) add("lm_head.weight", {V, dm}, false);
  if (total) *total = off;
  return out;
}

/// Typed views of every tensor of a flat parameter buffer laid out by parameter_layout():
/// shared by host weights (ModelWeights) and device copies (backend/cuda/model.cuh).
template <class T>
struct WeightViews {
  T* embedding = nullptr;  ///< (vocab_size, d_model)
  std::vector<LayerWeights<T>> layers;
  T* norm_f_w = nullptr;   ///< (d_model)
  T* norm_f_b = nullptr;   ///< (d_model), LayerNorm only
  T* lm_head = nullptr;    ///< (vocab_size, d_model); == embedding when tied

  /// Point every view at base + its parameter's offset.
  void bind_views(std::vector<ParamInfo> const& params, int n_layer, T* base) {
    layers.assign(static_cast<std::size_t>(n_layer), LayerWeights<T>{});
    embedding = norm_f_w = norm_f_b = lm_head = nullptr;
    for (auto const& p : params) {
      T* ptr = base + p.offset;
      std::string_view n = p.name;
      if (n == "backbone.embedding.weight") { embedding = ptr; continue; }
      if (n == "backbone.norm_f.weight") { norm_f_w = ptr; continue; }
      if (n == "backbone.norm_f.bias") { norm_f_b = ptr; continue; }
      if (n == "lm_head.weight") { lm_head = ptr; continue; }
      // backbone.layers.{i}.<rest>
      n.remove_prefix(std::string_view("backbone.layers.").size());
      std::size_t const dot = n.find('.');
      int const i = std::stoi(std::string(n.substr(0, dot)));
      std::string_view const rest = n.substr(dot + 1);
      LayerWeights<T>& L = layers[static_cast<std::size_t>(i)];
      if (rest == "norm.weight") L.norm_w = ptr;
      else if (rest == "norm.bias") L.norm_b = ptr;
      else if (rest == "mixer.in_proj.weight") L.in_proj_w = ptr;
      else if (rest == "mixer.in_proj.bias") L.in_proj_b = ptr;
      else if (rest == "mixer.conv1d.weight") L.conv_w = ptr;
      else if (rest == "mixer.conv1d.bias") L.conv_b = ptr;
      else if (rest == "mixer.x_proj.weight") L.x_proj_w = ptr;
      else if (rest == "mixer.dt_proj.weight") L.dt_proj_w = ptr;
      else if (rest == "mixer.dt_proj.bias") L.dt_proj_b = ptr;
      else if (rest == "mixer.A_log") L.A_log = ptr;
      else if (rest == "mixer.D") L.D = ptr;
      else if (rest == "mixer.out_proj.weight") L.out_proj_w = ptr;
      else if (rest == "mixer.out_proj.bias") L.out_proj_b = ptr;
    }
    if (!lm_head) lm_head = embedding;  // tied
  }
};

template <class T>
class ModelWeights : public WeightViews<T> {
 public:
  ModelWeights() = default;
  explicit ModelWeights(ModelConfig cfg) : config_(std::move(cfg)) {
    config_.finalize();
    std::size_t total = 0;
    params_ = parameter_layout(config_, &total);
    data_.assign(total, T(0));
    bind();
  }
  ModelWeights(ModelWeights const& o) : config_(o.config_), params_(o.params_), data_(o.data_) { bind(); }
  ModelWeights& operator=(ModelWeights const& o) {
    if (this != &o) { config_ = o.config_; params_ = o.params_; data_ = o.data_; bind(); }
    return *this;
  }
  ModelWeights(ModelWeights&& o) noexcept { *this = std::move(o); }
  ModelWeights& operator=(ModelWeights&& o) noexcept {
    config_ = std::move(o.config_); params_ = std::move(o.params_); data_ = std::move(o.data_);
    bind();
    o.layers.clear();
    return *this;
  }

  ModelConfig const& config() const { return config_; }
  std::vector<ParamInfo> const& parameters() const { return params_; }
  ParamInfo const* find(std::string_view name) const {
    for (auto const& p : params_) if (p.name == name) return &p;
    return nullptr;
  }
  std::span<T> flat() { return {data_.data(), data_.size()}; }
  /// Set every value (and the alignment padding) to zero: a fresh gradient accumulator.
  void zero() { std::fill(data_.begin(), data_.end(), T(0)); }
  std::span<T const> flat() const { return {data_.data(), data_.size()}; }
  std::span<T> tensor(ParamInfo const& p) { return {data_.data() + p.offset, p.numel}; }
  std::span<T const> tensor(ParamInfo const& p) const { return {data_.data() + p.offset, p.numel}; }

 private:
  void bind() { this->bind_views(params_, config_.n_layer, data_.data()); }

  ModelConfig config_;
  std::vector<ParamInfo> params_;
  aligned_vector<T> data_;
};

}  // namespace mambabyte
