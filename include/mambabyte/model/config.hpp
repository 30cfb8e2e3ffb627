/*! \file
 *  \brief ModelConfig: the hyper-parameters of a Mamba LM, read from config.json in either the
 *         mamba_ssm (MambaConfig) or the HuggingFace transformers (MambaConfig) convention and
 *         written in the mamba_ssm convention.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "mambabyte/core/error.hpp"

namespace mambabyte {

struct ModelConfig {
  int d_model = 0;
  int n_layer = 0;
  int vocab_size = 256;        ///< as padded (rows of the embedding / head)
  int d_state = 16;
  int d_conv = 4;
  int expand = 2;
  int dt_rank = 0;             ///< 0 = "auto" until finalize(): ceil(d_model / 16)
  bool bias = false;           ///< in_proj / out_proj bias
  bool conv_bias = true;
  bool rms_norm = false;       ///< RMSNorm (true) or LayerNorm with bias (false)
  double norm_eps = 1e-5;
  bool tie_embeddings = true;
  bool residual_in_fp32 = true;
  int pad_vocab_size_multiple = 8;

  int d_inner() const { return expand * d_model; }
  int x_proj_out() const { return dt_rank + 2 * d_state; }

  /// Resolve "auto" values and check every field; throws mambabyte::Error naming the field.
  void finalize(std::string const& where = "config") {
    require(d_model > 0, where, ": d_model must be positive (got ", d_model, ")");
    require(n_layer > 0, where, ": n_layer must be positive (got ", n_layer, ")");
    require(d_state > 0, where, ": d_state must be positive (got ", d_state, ")");
    require(d_conv >= 1, where, ": d_conv must be >= 1 (got ", d_conv, ")");
    require(expand > 0, where, ": expand must be positive (got ", expand, ")");
    if (dt_rank <= 0) dt_rank = (d_model + 15) / 16;
    require(vocab_size >= 256, where, ": vocab_size must be at least 256 for a byte model (got ",
            vocab_size, ")");
    require(norm_eps > 0 && std::isfinite(norm_eps), where, ": norm epsilon must be positive");
    require(d_model <= (1 << 20) && n_layer <= 10000 && d_state <= 4096 && d_conv <= 64 &&
                vocab_size <= (1 << 24),
            where, ": implausibly large dimension");
  }

  std::int64_t parameter_count() const;

  /// Parse either convention (auto-detected: "hidden_size" means transformers).
  static ModelConfig from_json(nlohmann::json const& j, std::string const& where = "config.json");
  static ModelConfig load(std::filesystem::path const& file);
  /// mamba_ssm MambaConfig layout (what mamba_ssm's MambaLMHeadModel.from_pretrained reads).
  nlohmann::json to_json() const;
  void save(std::filesystem::path const& file) const;
};

namespace detail {
template <class V>
V json_get(nlohmann::json const& j, char const* key, V fallback, std::string const& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    if constexpr (std::is_same_v<V, bool>) {
      require(it->is_boolean(), where, ": \"", key, "\" must be true or false");
      return it->template get<bool>();
    } else if constexpr (std::is_integral_v<V>) {
      require(it->is_number_integer() || (it->is_number_float() && std::floor(it->template get<double>()) == it->template get<double>()),
              where, ": \"", key, "\" must be an integer");
      return static_cast<V>(it->template get<double>());
    } else {
      require(it->is_number(), where, ": \"", key, "\" must be a number");
      return it->template get<V>();
    }
  } catch (nlohmann::json::exception const& e) {
    fail(where, ": bad value for \"", key, "\": ", e.what());
  }
}
}  // namespace detail

inline ModelConfig ModelConfig::from_json(nlohmann::json const& j, std::string const& where) {
  using detail::json_get;
  require(j.is_object(), where, ": expected a JSON object");
  ModelConfig c;
  if (j.contains("hidden_size")) {  // transformers MambaConfig
    c.d_model = json_get<int>(j, "hidden_size", 0, where);
    c.n_layer = json_get<int>(j, "num_hidden_layers", 0, where);
    c.vocab_size = json_get<int>(j, "vocab_size", 256, where);
    c.d_state = json_get<int>(j, "state_size", 16, where);
    c.d_conv = json_get<int>(j, "conv_kernel", 4, where);
    c.expand = json_get<int>(j, "expand", 2, where);
    if (int const inter = json_get<int>(j, "intermediate_size", 0, where); inter > 0) {
      require(c.d_model > 0 && inter % c.d_model == 0, where, ": intermediate_size (", inter,
              ") must be a multiple of hidden_size (", c.d_model, ")");
      require(!j.contains("expand") || inter == c.expand * c.d_model, where, ": intermediate_size (", inter,
              ") disagrees with expand * hidden_size (", c.expand * c.d_model, ")");
      c.expand = inter / c.d_model;
    }
    if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null())
      require(*it == "silu", where, ": only hidden_act \"silu\" is supported (got ", it->dump(), ")");
    if (auto it = j.find("time_step_rank"); it != j.end() && it->is_string()) {
      require(*it == "auto", where, ": time_step_rank must be an integer or \"auto\"");
    } else {
      c.dt_rank = json_get<int>(j, "time_step_rank", 0, where);
    }
    c.bias = json_get<bool>(j, "use_bias", false, where);
    c.conv_bias = json_get<bool>(j, "use_conv_bias", true, where);
    c.norm_eps = json_get<double>(j, "layer_norm_epsilon", 1e-5, where);
    c.tie_embeddings = json_get<bool>(j, "tie_word_embeddings", true, where);
    c.residual_in_fp32 = json_get<bool>(j, "residual_in_fp32", true, where);
    c.rms_norm = true;  // transformers' Mamba always uses RMSNorm
    c.pad_vocab_size_multiple = 1;
  } else if (j.contains("d_model")) {  // mamba_ssm MambaConfig
    c.d_model = json_get<int>(j, "d_model", 0, where);
    c.n_layer = json_get<int>(j, "n_layer", 0, where);
    c.vocab_size = json_get<int>(j, "vocab_size", 256, where);
    c.rms_norm = json_get<bool>(j, "rms_norm", true, where);
    c.residual_in_fp32 = json_get<bool>(j, "residual_in_fp32", true, where);
    c.tie_embeddings = json_get<bool>(j, "tie_embeddings", true, where);
    c.pad_vocab_size_multiple = json_get<int>(j, "pad_vocab_size_multiple", 8, where);
    c.norm_eps = json_get<double>(j, "norm_epsilon", 1e-5, where);
    if (auto it = j.find("ssm_cfg"); it != j.end() && !it->is_null()) {
      require(it->is_object(), where, ": \"ssm_cfg\" must be an object");
      auto const& s = *it;
      if (s.contains("layer") && s["layer"].is_string())
        require(s["layer"] == "Mamba1", where, ": only Mamba1 layers are supported (ssm_cfg.layer = ",
                s["layer"].dump(), ")");
      c.d_state = json_get<int>(s, "d_state", 16, where);
      c.d_conv = json_get<int>(s, "d_conv", 4, where);
      c.expand = json_get<int>(s, "expand", 2, where);
      if (auto r = s.find("dt_rank"); r != s.end() && r->is_string()) {
        require(*r == "auto", where, ": ssm_cfg.dt_rank must be an integer or \"auto\"");
      } else {
        c.dt_rank = json_get<int>(s, "dt_rank", 0, where);
      }
      c.bias = json_get<bool>(s, "bias", false, where);
      c.conv_bias = json_get<bool>(s, "conv_bias", true, where);
    }
    require(c.pad_vocab_size_multiple >= 1, where, ": pad_vocab_size_multiple must be >= 1");
    if (c.vocab_size % c.pad_vocab_size_multiple != 0)
      c.vocab_size += c.pad_vocab_size_multiple - c.vocab_size % c.pad_vocab_size_multiple;
  } else {
    fail(where, ": neither \"d_model\" (mamba_ssm) nor \"hidden_size\" (transformers) is present");
  }
  c.finalize(where);
  return c;
}

inline ModelConfig ModelConfig::load(std::filesystem::path const& file) {
  std::ifstream in(file);
  require(static_cast<bool>(in), "cannot open ", file.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (nlohmann::json::exception const& e) {
    fail(file.string(), ": not valid JSON: ", e.what());
  }
  return from_json(j, file.string());
}

inline nlohmann::json ModelConfig::to_json() const {
  // Only keys that mamba_ssm's MambaConfig / Mamba accept (an unknown key makes
  // MambaLMHeadModel.from_pretrained fail, as the released configs' "pad_id" once did).
  nlohmann::json ssm = {{"d_state", d_state}, {"d_conv", d_conv}, {"expand", expand},
                        {"dt_rank", dt_rank}, {"bias", bias}, {"conv_bias", conv_bias}};
  nlohmann::json j = {{"d_model", d_model}, {"n_layer", n_layer}, {"vocab_size", vocab_size},
                      {"ssm_cfg", ssm}, {"rms_norm", rms_norm}, {"residual_in_fp32", residual_in_fp32},
                      {"fused_add_norm", true}, {"pad_vocab_size_multiple", 1},
                      {"tie_embeddings", tie_embeddings}};
  // mamba_ssm has no config key for the norm epsilon (it is always 1e-5 there); write one only
  // when it differs, so that our own loader keeps it.
  if (norm_eps != 1e-5) j["norm_epsilon"] = norm_eps;
  return j;
}

inline void ModelConfig::save(std::filesystem::path const& file) const {
  auto tmp = file;
  tmp += ".tmp";
  {
    std::ofstream out(tmp);
    require(static_cast<bool>(out), "cannot write ", tmp.string());
    out << to_json().dump(2) << "\n";
    require(static_cast<bool>(out), "write failed: ", tmp.string());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, file, ec);
  require(!ec, "cannot rename ", tmp.string(), " to ", file.string(), ": ", ec.message());
}

inline std::int64_t ModelConfig::parameter_count() const {
  std::int64_t const dm = d_model, di = d_inner(), N = d_state, R = dt_rank, V = vocab_size;
  std::int64_t layer = dm * (rms_norm ? 1 : 2)                // norm
                       + 2 * di * dm + (bias ? 2 * di : 0)    // in_proj
                       + di * d_conv + (conv_bias ? di : 0)   // conv1d
                       + di * (R + 2 * N)                     // x_proj
                       + di * R + di                          // dt_proj
                       + di * N + di                          // A_log, D
                       + dm * di + (bias ? dm : 0);           // out_proj
  return V * dm + n_layer * layer + dm * (rms_norm ? 1 : 2) + (tie_embeddings ? 0 : V * dm);
}

}  // namespace mambabyte
