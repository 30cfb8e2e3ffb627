// Real checkpoints: the golden cases written by scripts/make_goldens.py (transformers and
// mamba_ssm naming, safetensors and pytorch_model.bin, `module.` prefix, LayerNorm + untied head)
// loaded with no Python and compared with the script's float64 transcription (<= 1e-9) and with
// transformers itself (<= 1e-5) in float and double; save / reload round trips; and malformed
// checkpoints, each of which must be a clear error.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "mambabyte/model/loader.hpp"
#include "mambabyte/model/model.hpp"
#include "test_util.hpp"

using namespace mambabyte;
namespace fs = std::filesystem;

namespace {

fs::path golden_dir() { return fs::path(MAMBABYTE_TEST_DATA_DIR) / "golden"; }

std::string read_text() {
  std::ifstream in(golden_dir() / "text.txt", std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

std::vector<double> golden_tensor(io::TensorFile const& f, std::string const& name) {
  auto const& r = f.at(name);
  std::vector<double> v(static_cast<std::size_t>(r.numel()));
  io::convert_to<double>(r, std::span<double>(v));
  return v;
}

/// Bits per byte over the first 256 logits (padded rows ignored), as the goldens define it.
template <class T>
double bits_per_byte(std::vector<T> const& logits, std::vector<std::int32_t> const& tok, int V) {
  double nll = 0;
  for (std::size_t t = 0; t + 1 < tok.size(); ++t) {
    T const* l = logits.data() + t * V;
    double mx = -std::numeric_limits<double>::infinity();
    for (int v = 0; v < 256; ++v) mx = std::max(mx, double(l[v]));
    double s = 0;
    for (int v = 0; v < 256; ++v) s += std::exp(double(l[v]) - mx);
    nll += std::log(s) + mx - double(l[tok[t + 1]]);
  }
  return nll / double(tok.size() - 1) / std::log(2.0);
}

fs::path scratch(std::string const& name) {
  fs::path p = fs::path(MAMBABYTE_TEST_TMP_DIR) / ("golden_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

char const* const kCases[] = {"hf_default", "hf_odd", "ssm_rms_tied", "ssm_layernorm_bin", "ssm_module_prefix"};

}  // namespace

TEST_CASE("golden checkpoints: fp64 equals the float64 transcription", "[golden]") {
  auto const text = read_text();
  REQUIRE(text.size() == 21);
  auto const tokens = bytes_to_tokens(text);
  for (char const* name : kCases) {
    INFO("case " << name);
    fs::path const dir = golden_dir() / name;
    CheckpointInfo info;
    auto w = load_weights<double>(dir, &info);
    auto const g = io::read_safetensors(dir / "golden.safetensors");
    // input ids are the text's bytes
    auto const& ids = g.at("input_ids");
    REQUIRE(ids.dtype == DType::kI64);
    REQUIRE(ids.numel() == static_cast<std::int64_t>(tokens.size()));
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      std::int64_t v;
      std::memcpy(&v, ids.bytes.data() + 8 * i, 8);
      REQUIRE(v == tokens[i]);
    }

    int const V = w.config().vocab_size, T = static_cast<int>(tokens.size());
    auto const want = golden_tensor(g, "logits_transcription");
    REQUIRE(want.size() == static_cast<std::size_t>(T) * V);
    Model<double, scan::Chunked<8>> m(std::move(w), backend::Cpu{2});
    auto state = m.make_state(1);
    auto const got = m.forward(tokens, 1, T, &state);
    CHECK(mbtest::rel_err(got, want) <= 1e-9);
    double const bpb = std::stod(g.metadata().at("bits_per_byte_transcription"));
    CHECK(std::abs(bits_per_byte(got, tokens, V) - bpb) <= 1e-9 * bpb);

    // final recurrent state (ssm: (d_inner, d_state); conv: ours (K-1, d_inner), golden (d_inner, K-1))
    ModelConfig const& c = m.config();
    int const di = c.d_inner(), K1 = c.d_conv - 1;
    for (int l = 0; l < c.n_layer; ++l) {
      auto const hs = golden_tensor(g, "final_ssm_state." + std::to_string(l));
      std::vector<double> ours(state.ssm(l), state.ssm(l) + state.ssm_per_seq());
      CHECK(mbtest::rel_err(ours, hs) <= 1e-9);
      auto const cs = golden_tensor(g, "final_conv_state." + std::to_string(l));
      std::vector<double> conv(cs.size());
      for (int d = 0; d < di; ++d)
        for (int k = 0; k < K1; ++k) conv[static_cast<std::size_t>(d) * K1 + k] = state.conv(l)[k * di + d];
      CHECK(mbtest::rel_err(conv, cs) <= 1e-12);
    }
  }
}

TEST_CASE("golden checkpoints: float and double agree with transformers", "[golden]") {
  auto const tokens = bytes_to_tokens(read_text());
  int const T = static_cast<int>(tokens.size());
  for (char const* name : {"hf_default", "hf_odd", "ssm_rms_tied"}) {
    INFO("case " << name);
    fs::path const dir = golden_dir() / name;
    auto const g = io::read_safetensors(dir / "golden.safetensors");
    auto const want = golden_tensor(g, "logits_transformers");
    double const bpb = std::stod(g.metadata().at("bits_per_byte_transformers"));
    {
      Model<double> m(load_weights<double>(dir), backend::Cpu{2});
      auto const got = m.forward(tokens, 1, T);
      CHECK(mbtest::rel_err(got, want) <= 1e-5);
      CHECK(std::abs(bits_per_byte(got, tokens, m.config().vocab_size) - bpb) <= 1e-5 * bpb);
    }
    {
      Model<float, scan::Associative> m(load_weights<float>(dir), backend::Cpu{2});
      auto const got = m.forward(tokens, 1, T);
      CHECK(mbtest::rel_err(got, want) <= 1e-5);
      CHECK(std::abs(bits_per_byte(got, tokens, m.config().vocab_size) - bpb) <= 1e-5 * bpb);
    }
  }
}

TEST_CASE("checkpoint info records the format, naming and prefix", "[golden][loader]") {
  CheckpointInfo i;
  load_weights<float>(golden_dir() / "hf_default", &i);
  CHECK(i.format == "safetensors");
  CHECK(i.naming == "transformers");
  CHECK_FALSE(i.module_prefix);
  CHECK(i.stored_dtype() == DType::kF32);
  load_weights<float>(golden_dir() / "ssm_module_prefix" / "config.json", &i);  // a file path works too
  CHECK(i.format == "pytorch");
  CHECK(i.naming == "mamba_ssm");
  CHECK(i.module_prefix);
  load_weights<float>(golden_dir() / "hf_odd", &i);
  CHECK(i.stored_dtype() == DType::kF64);
  CHECK(i.file_bytes == static_cast<std::int64_t>(fs::file_size(golden_dir() / "hf_odd" / "model.safetensors")));
}

TEST_CASE("the released-MambaByte layout loads: LayerNorm with bias, untied head, config conventions",
          "[golden][loader]") {
  auto const c = load_config(golden_dir() / "ssm_layernorm_bin");
  CHECK_FALSE(c.rms_norm);
  CHECK_FALSE(c.tie_embeddings);
  CHECK(c.d_state == 16);
  CHECK(c.d_conv == 4);
  CHECK(c.dt_rank == 2);
  auto const h = load_config(golden_dir() / "hf_odd");
  CHECK(h.rms_norm);
  CHECK(h.vocab_size == 264);
  CHECK(h.dt_rank == 7);
  CHECK(h.d_conv == 3);
  CHECK(h.bias);
  CHECK_FALSE(h.conv_bias);
  CHECK(h.d_inner() == 48);
}

TEST_CASE("save_model round trips in the mamba_ssm layout", "[golden][loader]") {
  auto const tokens = bytes_to_tokens(read_text());
  for (char const* name : {"hf_odd", "ssm_layernorm_bin", "hf_default"}) {
    INFO("case " << name);
    auto const w = load_weights<double>(golden_dir() / name);
    fs::path const out = scratch(std::string("save_") + name);
    save_model(w, out, DType::kF64);
    CheckpointInfo info;
    auto const back = load_weights<double>(out, &info);
    CHECK(info.naming == "mamba_ssm");
    CHECK(info.stored_dtype() == DType::kF64);
    REQUIRE(back.flat().size() == w.flat().size());
    CHECK(std::equal(back.flat().begin(), back.flat().end(), w.flat().begin()));
    // the config is written in the mamba_ssm convention and means the same model
    std::ifstream in(out / "config.json");
    auto const j = nlohmann::json::parse(in);
    CHECK(j.contains("d_model"));
    CHECK_FALSE(j.contains("hidden_size"));
    auto const c2 = ModelConfig::from_json(j);
    CHECK(c2.to_json() == w.config().to_json());
    // a tied head is stored as well (mamba_ssm's strict load_state_dict wants it)
    auto const f = io::read_safetensors(out / "model.safetensors");
    CHECK(f.find("lm_head.weight") != nullptr);
    // F32 storage: same logits to float precision
    save_model(w, out, DType::kF32);
    Model<double> a(w), b(load_weights<double>(out));
    CHECK(mbtest::rel_err(b.forward(tokens, 1, 21), a.forward(tokens, 1, 21)) < 1e-5);
  }
  // BF16 / F16 storage are real conversions, not truncations
  auto const w = load_weights<float>(golden_dir() / "ssm_rms_tied");
  for (DType d : {DType::kBF16, DType::kF16}) {
    fs::path const out = scratch(std::string("save_half_") + std::string(dtype_name(d)));
    save_model(w, out, d);
    CheckpointInfo info;
    auto const back = load_weights<float>(out, &info);
    CHECK(info.stored_dtype() == d);
    CHECK(mbtest::rel_err(back.flat(), w.flat()) < (d == DType::kBF16 ? 4e-3 : 5e-4));
  }
  CHECK_THROWS_WITH(save_model(w, scratch("bad_dtype"), DType::kI32), Catch::Contains("storage dtype"));
}

// ---- malformed checkpoints ------------------------------------------------------------------

namespace {

/// A copy of a golden case with its weights rewritten through `edit` (tensor list in, list out).
template <class Edit>
fs::path make_variant(std::string const& tag, char const* source, Edit edit) {
  fs::path const dir = scratch(tag);
  fs::copy_file(golden_dir() / source / "config.json", dir / "config.json");
  auto const f = io::read_tensor_file(golden_dir() / source /
                                      (fs::exists(golden_dir() / source / "model.safetensors") ? "model.safetensors"
                                                                                                 : "pytorch_model.bin"));
  struct Owned { std::string name; DType dtype; std::vector<std::int64_t> shape; std::vector<std::byte> bytes; };
  std::vector<Owned> ts;
  for (auto const& r : f.tensors()) ts.push_back({r.name, r.dtype, r.shape, {r.bytes.begin(), r.bytes.end()}});
  edit(ts);
  std::vector<io::TensorWrite> out;
  for (auto const& t : ts) out.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  io::write_safetensors(dir / "model.safetensors", std::span<io::TensorWrite const>(out));
  return dir;
}

template <class V>
auto find_tensor(V& ts, std::string const& suffix) {
  auto it = std::find_if(ts.begin(), ts.end(), [&](auto const& t) { return t.name.ends_with(suffix); });
  REQUIRE(it != ts.end());
  return it;
}

}  // namespace

TEST_CASE("malformed checkpoints are clear errors", "[loader][errors]") {
  SECTION("missing directory, missing config, missing weights") {
    CHECK_THROWS_WITH(load_weights<float>("/nonexistent/model"), Catch::Contains("does not exist"));
    fs::path const d = scratch("empty");
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("no config.json"));
    fs::copy_file(golden_dir() / "hf_default" / "config.json", d / "config.json");
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("no weights"));
  }
  SECTION("bad JSON and bad config values") {
    fs::path const d = scratch("badjson");
    std::ofstream(d / "config.json") << "{\"d_model\": 16, ";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("not valid JSON"));
    std::ofstream(d / "config.json") << R"({"d_model": "big", "n_layer": 2})";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("\"d_model\" must be an integer"));
    std::ofstream(d / "config.json") << R"({"d_model": 16, "n_layer": 0})";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("n_layer must be positive"));
    std::ofstream(d / "config.json") << R"({"d_model": 16, "n_layer": 2, "vocab_size": 100})";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("vocab_size must be at least 256"));
    std::ofstream(d / "config.json") << R"({"hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 33})";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("intermediate_size"));
    std::ofstream(d / "config.json") << R"({"d_model": 16, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2"}})";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("only Mamba1"));
    std::ofstream(d / "config.json") << R"([1, 2])";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("expected a JSON object"));
    std::ofstream(d / "config.json") << R"({"n_embd": 16})";
    CHECK_THROWS_WITH(load_config(d), Catch::Contains("neither"));
  }
  SECTION("truncated weights files") {
    for (char const* file : {"model.safetensors", "pytorch_model.bin"}) {
      char const* src = std::string(file) == "model.safetensors" ? "hf_default" : "ssm_layernorm_bin";
      fs::path const d = scratch(std::string("trunc_") + file);
      fs::copy_file(golden_dir() / src / "config.json", d / "config.json");
      fs::copy_file(golden_dir() / src / file, d / file);
      fs::resize_file(d / file, fs::file_size(d / file) / 2);
      INFO(file);
      CHECK_THROWS_AS(load_weights<float>(d), Error);
      fs::resize_file(d / file, 5);
      CHECK_THROWS_AS(load_weights<float>(d), Error);
    }
  }
  SECTION("a missing tensor is named") {
    auto d = make_variant("missing", "hf_default", [](auto& ts) { ts.erase(find_tensor(ts, "layers.1.mixer.D")); });
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("lacks tensors") && Catch::Contains("backbone.layers.1.mixer.D"));
  }
  SECTION("a wrong shape is named with both shapes") {
    auto d = make_variant("shape", "ssm_rms_tied", [](auto& ts) {
      auto it = find_tensor(ts, "layers.0.mixer.conv1d.weight");  // (32, 1, 2) -> (32, 2)
      it->shape = {it->shape[0], it->shape[2]};
    });
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("conv1d.weight") && Catch::Contains("[32, 2]") &&
                                                  Catch::Contains("[32, 1, 2]"));
  }
  SECTION("a wrong dtype is named") {
    auto d = make_variant("dtype", "ssm_rms_tied", [](auto& ts) { find_tensor(ts, "layers.0.mixer.D")->dtype = DType::kI32; });
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("mixer.D") && Catch::Contains("not a floating-point"));
  }
  SECTION("an unknown tensor is named") {
    auto d = make_variant("extra", "ssm_rms_tied", [](auto& ts) {
      auto t = *find_tensor(ts, "layers.0.mixer.D");
      t.name = "backbone.layers.0.mixer.dt_bias";
      ts.push_back(t);
    });
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("does not account for") && Catch::Contains("dt_bias"));
  }
  SECTION("a config that disagrees with the weights") {
    auto d = make_variant("layers", "ssm_rms_tied", [](auto&) {});
    std::ofstream(d / "config.json") << R"({"d_model": 16, "n_layer": 3, "ssm_cfg": {"d_state": 8, "d_conv": 2}, "rms_norm": true})";
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("backbone.layers.2."));
  }
  SECTION("NaN and Inf weights") {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      auto d = make_variant("nan", "hf_default", [bad](auto& ts) {
        auto it = find_tensor(ts, "layers.1.mixer.x_proj.weight");
        std::memcpy(it->bytes.data() + 4 * 17, &bad, 4);
      });
      CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("x_proj.weight") && Catch::Contains("non-finite"));
    }
  }
  SECTION("a tied head that differs from the embedding") {
    auto d = make_variant("tied", "ssm_rms_tied", [](auto& ts) {
      auto it = find_tensor(ts, "lm_head.weight");
      float v = 3.0f;
      std::memcpy(it->bytes.data(), &v, 4);
    });
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("tied") && Catch::Contains("differs"));
  }
  SECTION("a tensor stored twice (module. prefix and plain)") {
    auto d = make_variant("dup", "ssm_rms_tied", [](auto& ts) {
      auto t = *find_tensor(ts, "layers.0.mixer.D");
      t.name = "module." + t.name;
      ts.push_back(t);
    });
    CHECK_THROWS_WITH(load_weights<float>(d), Catch::Contains("appears twice"));
  }
  SECTION("sharded index: good, then a bad entry") {
    fs::path const d = scratch("sharded");
    fs::copy_file(golden_dir() / "hf_default" / "config.json", d / "config.json");
    auto const f = io::read_safetensors(golden_dir() / "hf_default" / "model.safetensors");
    std::vector<io::TensorWrite> a, b;
    nlohmann::json map;
    std::size_t i = 0;
    for (auto const& r : f.tensors()) {
      bool const first = i++ % 2 == 0;
      (first ? a : b).push_back({r.name, r.dtype, r.shape, r.bytes.data()});
      map[r.name] = first ? "shard-a.safetensors" : "shard-b.safetensors";
    }
    io::write_safetensors(d / "shard-a.safetensors", std::span<io::TensorWrite const>(a));
    io::write_safetensors(d / "shard-b.safetensors", std::span<io::TensorWrite const>(b));
    std::ofstream(d / "model.safetensors.index.json") << nlohmann::json{{"weight_map", map}}.dump();
    auto const w = load_weights<double>(d);
    auto const ref = load_weights<double>(golden_dir() / "hf_default");
    CHECK(std::equal(w.flat().begin(), w.flat().end(), ref.flat().begin()));
    map["backbone.norm_f.weight"] = "../escape.safetensors";
    std::ofstream(d / "model.safetensors.index.json") << nlohmann::json{{"weight_map", map}}.dump();
    CHECK_THROWS_WITH(load_weights<double>(d), Catch::Contains("outside the directory"));
  }
}
