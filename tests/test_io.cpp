// Checkpoint I/O: MappedFile, safetensors read/atomic write, the ZIP reader, the restricted
// pickle VM and the PyTorch zip reader. Synthetic archives come from a tiny test-only ZIP
// writer and pickle builder below; real torch.save() files are committed under tests/data/io
// (regenerate with scripts/make_io_fixtures.py).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "mambabyte/io/mapped_file.hpp"
#include "mambabyte/io/pickle.hpp"
#include "mambabyte/io/pytorch.hpp"
#include "mambabyte/io/safetensors.hpp"
#include "mambabyte/io/tensor_file.hpp"
#include "mambabyte/io/zip.hpp"

namespace fs = std::filesystem;
using mambabyte::DType;
using mambabyte::Error;
using namespace mambabyte::io;
using Catch::Contains;
using Bytes = std::vector<std::uint8_t>;

namespace {

// ---- files --------------------------------------------------------------------------------------

fs::path tmp_dir() {
  static fs::path const d = [] {
    fs::path p = fs::path(MAMBABYTE_TEST_TMP_DIR) / "io";
    fs::create_directories(p);
    return p;
  }();
  return d;
}
fs::path data_dir() { return fs::path(MAMBABYTE_TEST_DATA_DIR) / "io"; }

void write_file(fs::path const& p, Bytes const& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<char const*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(f.good());
}
Bytes read_file(fs::path const& p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE(f.good());
  return Bytes(std::istreambuf_iterator<char>(f), {});
}
std::set<std::string> dir_listing(fs::path const& d) {
  std::set<std::string> out;
  for (auto const& e : fs::directory_iterator(d)) out.insert(e.path().filename().string());
  return out;
}

template <class T>
Bytes bytes_of(std::vector<T> const& v) {
  Bytes b(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}
void put_le(Bytes& b, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void append(Bytes& b, std::string const& s) { b.insert(b.end(), s.begin(), s.end()); }
void append(Bytes& b, Bytes const& s) { b.insert(b.end(), s.begin(), s.end()); }

std::vector<double> values(TensorRecord const& r) {
  std::vector<double> v(static_cast<std::size_t>(r.numel()));
  convert_to<double>(r, v);
  return v;
}
bool same_bytes(TensorRecord const& a, TensorRecord const& b) {
  return a.bytes.size() == b.bytes.size() &&
         (a.bytes.empty() || std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) == 0);
}

// ---- test-only ZIP writer (stored entries; optional ZIP64 records) -----------------------------

std::uint32_t slow_crc32(Bytes const& b) {  // bitwise reference, independent of the table
  std::uint32_t c = 0xffffffffu;
  for (std::uint8_t x : b) {
    c ^= x;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
  }
  return ~c;
}

struct ZipItem {
  std::string name;
  Bytes data;
  std::uint16_t method = 0;
  bool corrupt_crc = false;
};
struct BuiltZip {
  Bytes bytes;
  std::map<std::string, std::size_t> data_offset;  // where each entry's data starts
};

BuiltZip build_zip(std::vector<ZipItem> const& items, bool zip64 = false) {
  BuiltZip z;
  Bytes& b = z.bytes;
  std::vector<std::uint64_t> offsets;
  for (ZipItem const& it : items) {
    offsets.push_back(b.size());
    std::uint32_t const crc = slow_crc32(it.data) ^ (it.corrupt_crc ? 0x1u : 0u);
    put_le(b, 0x04034b50u, 4);
    put_le(b, zip64 ? 45 : 20, 2);
    put_le(b, 0x0800, 2);  // UTF-8 names
    put_le(b, it.method, 2);
    put_le(b, 0, 4);  // time, date
    put_le(b, crc, 4);
    put_le(b, zip64 ? 0xffffffffu : it.data.size(), 4);
    put_le(b, zip64 ? 0xffffffffu : it.data.size(), 4);
    put_le(b, it.name.size(), 2);
    put_le(b, zip64 ? 20 : 0, 2);
    append(b, it.name);
    if (zip64) {
      put_le(b, 0x0001, 2);
      put_le(b, 16, 2);
      put_le(b, it.data.size(), 8);
      put_le(b, it.data.size(), 8);
    }
    z.data_offset[it.name] = b.size();
    append(b, it.data);
  }
  std::uint64_t const cd_offset = b.size();
  for (std::size_t i = 0; i < items.size(); ++i) {
    ZipItem const& it = items[i];
    std::uint32_t const crc = slow_crc32(it.data) ^ (it.corrupt_crc ? 0x1u : 0u);
    put_le(b, 0x02014b50u, 4);
    put_le(b, 0x031e, 2);
    put_le(b, zip64 ? 45 : 20, 2);
    put_le(b, 0x0800, 2);
    put_le(b, it.method, 2);
    put_le(b, 0, 4);
    put_le(b, crc, 4);
    put_le(b, zip64 ? 0xffffffffu : it.data.size(), 4);
    put_le(b, zip64 ? 0xffffffffu : it.data.size(), 4);
    put_le(b, it.name.size(), 2);
    put_le(b, zip64 ? 28 : 0, 2);
    put_le(b, 0, 2);  // comment
    put_le(b, 0, 2);  // disk
    put_le(b, 0, 2);  // internal attributes
    put_le(b, 0, 4);  // external attributes
    put_le(b, zip64 ? 0xffffffffu : offsets[i], 4);
    append(b, it.name);
    if (zip64) {
      put_le(b, 0x0001, 2);
      put_le(b, 24, 2);
      put_le(b, it.data.size(), 8);
      put_le(b, it.data.size(), 8);
      put_le(b, offsets[i], 8);
    }
  }
  std::uint64_t const cd_size = b.size() - cd_offset;
  if (zip64) {
    std::uint64_t const rec = b.size();
    put_le(b, 0x06064b50u, 4);
    put_le(b, 44, 8);
    put_le(b, 45, 2);
    put_le(b, 45, 2);
    put_le(b, 0, 4);
    put_le(b, 0, 4);
    put_le(b, items.size(), 8);
    put_le(b, items.size(), 8);
    put_le(b, cd_size, 8);
    put_le(b, cd_offset, 8);
    put_le(b, 0x07064b50u, 4);
    put_le(b, 0, 4);
    put_le(b, rec, 8);
    put_le(b, 1, 4);
  }
  put_le(b, 0x06054b50u, 4);
  put_le(b, 0, 2);
  put_le(b, 0, 2);
  put_le(b, zip64 ? 0xffff : items.size(), 2);
  put_le(b, zip64 ? 0xffff : items.size(), 2);
  put_le(b, zip64 ? 0xffffffffu : cd_size, 4);
  put_le(b, zip64 ? 0xffffffffu : cd_offset, 4);
  put_le(b, 0, 2);
  return z;
}

// ---- test-only pickle builder -----------------------------------------------------------------

struct Pk {
  Bytes b;
  Pk& raw(std::initializer_list<int> xs) {
    for (int x : xs) b.push_back(static_cast<std::uint8_t>(x));
    return *this;
  }
  Pk& op(char c) { return raw({static_cast<unsigned char>(c)}); }
  Pk& proto(int p) { return raw({0x80, p}); }
  Pk& global(std::string const& m, std::string const& n) {
    op('c');
    append(b, m + "\n" + n + "\n");
    return *this;
  }
  Pk& str(std::string const& s) {
    op('X');
    put_le(b, s.size(), 4);
    append(b, s);
    return *this;
  }
  Pk& i(std::int64_t v) {
    if (v >= 0 && v < 256) {
      op('K');
      put_le(b, static_cast<std::uint64_t>(v), 1);
    } else if (v >= 0 && v < 65536) {
      op('M');
      put_le(b, static_cast<std::uint64_t>(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      op('J');
      put_le(b, static_cast<std::uint64_t>(v), 4);
    } else {
      raw({0x8a, 8});
      put_le(b, static_cast<std::uint64_t>(v), 8);
    }
    return *this;
  }
  Pk& mark() { return op('('); }
  Pk& tuple() { return op('t'); }
  Pk& reduce() { return op('R'); }
  Pk& stop() { return op('.'); }
  Pk& odict() { return global("collections", "OrderedDict").op(')').reduce(); }
  Pk& ints(std::vector<std::int64_t> const& v) {
    mark();
    for (auto x : v) i(x);
    return tuple();
  }
  Pk& storage(std::string const& type, std::string const& key, std::int64_t numel) {
    mark().str("storage").global("torch", type).str(key).str("cpu").i(numel).tuple();
    return op('Q');
  }
  Pk& tensor(std::string const& type, std::string const& key, std::int64_t numel,
             std::int64_t offset, std::vector<std::int64_t> const& size,
             std::vector<std::int64_t> const& stride) {
    global("torch._utils", "_rebuild_tensor_v2").mark();
    storage(type, key, numel).i(offset).ints(size).ints(stride);
    raw({0x89});  // requires_grad = False
    odict();      // backward_hooks
    return tuple().reduce();
  }
};

struct TorchStorage {
  std::string key;
  Bytes data;
};

BuiltZip torch_zip(Bytes const& pkl, std::vector<TorchStorage> const& storages,
                   std::string const& prefix = "archive", bool zip64 = false) {
  std::vector<ZipItem> items;
  items.push_back({prefix + "/data.pkl", pkl});
  items.push_back({prefix + "/byteorder", Bytes{'l', 'i', 't', 't', 'l', 'e'}});
  for (auto const& s : storages) items.push_back({prefix + "/data/" + s.key, s.data});
  items.push_back({prefix + "/version", Bytes{'3', '\n'}});
  return build_zip(items, zip64);
}

/// The canonical valid synthetic checkpoint: "a" F32 contiguous (2,3); "step" an int (skipped);
/// "b" F64 non-contiguous (3,2) with stride (1,3) and storage offset 1; "a_tail" a contiguous
/// view of a's storage at offset 3; "c" F32 contiguous in its own storage.
struct Synthetic {
  Pk pkl;
  std::vector<TorchStorage> storages;
};
Synthetic synthetic_state_dict() {
  Synthetic s;
  s.pkl.proto(2).odict().mark();
  s.pkl.str("a").tensor("FloatStorage", "0", 6, 0, {2, 3}, {3, 1});
  s.pkl.str("step").i(5);
  s.pkl.str("b").tensor("DoubleStorage", "1", 10, 1, {3, 2}, {1, 3});
  s.pkl.str("a_tail").tensor("FloatStorage", "0", 6, 3, {3}, {1});
  s.pkl.str("c").tensor("FloatStorage", "2", 4, 0, {4}, {1});
  s.pkl.op('u').stop();
  std::vector<double> d(10);
  for (int k = 0; k < 10; ++k) d[static_cast<std::size_t>(k)] = 10 + k;
  s.storages = {{"0", bytes_of(std::vector<float>{0, 0.5f, 1, 1.5f, 2, 2.5f})},
                {"1", bytes_of(d)},
                {"2", bytes_of(std::vector<float>{-1, -2, -3, -4})}};
  return s;
}

void check_synthetic(TensorFile const& f) {
  REQUIRE(f.tensors().size() == 4);
  std::vector<std::string> names;
  for (auto const& r : f.tensors()) names.push_back(r.name);
  CHECK(names == std::vector<std::string>{"a", "b", "a_tail", "c"});
  CHECK(f.find("step") == nullptr);
  auto const& a = f.at("a");
  CHECK(a.dtype == DType::kF32);
  CHECK(a.shape == std::vector<std::int64_t>{2, 3});
  CHECK(values(a) == std::vector<double>{0, 0.5, 1, 1.5, 2, 2.5});
  auto const& b = f.at("b");
  CHECK(b.dtype == DType::kF64);
  CHECK(b.shape == std::vector<std::int64_t>{3, 2});
  CHECK(values(b) == std::vector<double>{11, 14, 12, 15, 13, 16});  // storage[1 + i + 3j]
  auto const& tail = f.at("a_tail");
  CHECK(values(tail) == std::vector<double>{1.5, 2, 2.5});
  CHECK(tail.bytes.data() == a.bytes.data() + 12);  // zero copy: a view into the same storage
  CHECK(values(f.at("c")) == std::vector<double>{-1, -2, -3, -4});
  CHECK(f.metadata().empty());
}

// ---- safetensors raw bytes ---------------------------------------------------------------------

Bytes st_raw(std::string header, std::size_t data_bytes, bool pad = true) {
  if (pad) header.append((8 - header.size() % 8) % 8, ' ');
  Bytes b;
  put_le(b, header.size(), 8);
  append(b, header);
  for (std::size_t k = 0; k < data_bytes; ++k) b.push_back(static_cast<std::uint8_t>(k));
  return b;
}

void expect_st_error(std::string const& name, Bytes const& bytes, std::string const& what = {}) {
  fs::path const p = tmp_dir() / name;
  write_file(p, bytes);
  INFO("case " << name);
  REQUIRE_THROWS_AS(read_safetensors(p), Error);
  REQUIRE_THROWS_WITH(read_safetensors(p), Contains(p.string()) && Contains(what));
  REQUIRE_THROWS_WITH(read_tensor_file(p), Contains(p.string()));
}

void expect_pt_error(std::string const& name, Bytes const& bytes, std::string const& what = {}) {
  fs::path const p = tmp_dir() / name;
  write_file(p, bytes);
  INFO("case " << name);
  REQUIRE_THROWS_AS(read_pytorch_bin(p), Error);
  REQUIRE_THROWS_WITH(read_pytorch_bin(p), Contains(p.string()) && Contains(what));
}

}  // namespace

// =================================================================================================

TEST_CASE("MappedFile maps files and reports bad paths", "[io]") {
  fs::path const p = tmp_dir() / "mapped.bin";
  write_file(p, Bytes{1, 2, 3, 4, 5});
  MappedFile m(p);
  REQUIRE(m.size() == 5);
  CHECK(static_cast<int>(m.bytes()[4]) == 5);
  CHECK(m.path() == p);
  MappedFile moved(std::move(m));
  CHECK(moved.size() == 5);
  CHECK(m.bytes().empty());

  fs::path const e = tmp_dir() / "empty.bin";
  write_file(e, {});
  CHECK(MappedFile(e).bytes().empty());

  fs::path const missing = tmp_dir() / "does_not_exist.bin";
  REQUIRE_THROWS_WITH(MappedFile(missing), Contains(missing.string()) && Contains("No such file"));
  REQUIRE_THROWS_WITH(MappedFile(tmp_dir()), Contains(tmp_dir().string()) && Contains("directory"));
}

TEST_CASE("crc32 matches the standard check value and a bitwise reference", "[io][zip]") {
  std::string const s = "123456789";
  CHECK(crc32(std::as_bytes(std::span(s.data(), s.size()))) == 0xCBF43926u);
  Bytes b(1000);
  for (std::size_t k = 0; k < b.size(); ++k) b[k] = static_cast<std::uint8_t>(k * 7 + 3);
  for (std::size_t n : {0u, 1u, 7u, 8u, 9u, 63u, 1000u}) {
    Bytes part(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK(crc32(std::as_bytes(std::span(part))) == slow_crc32(part));
  }
  // incremental == one shot
  auto all = std::as_bytes(std::span(b));
  CHECK(crc32_update(crc32(all.first(333)), all.subspan(333)) == crc32(all));
}

TEST_CASE("safetensors round trip: dtypes, zero-sized tensor, metadata, layout",
          "[io][safetensors]") {
  std::vector<float> f32{1.5f, -2.f, 3.25f, 0.f, 1e-3f, -7.f};
  std::vector<double> f64{1.0 / 3, -2.5, 1e300, -0.0};
  std::vector<mambabyte::bf16> b16{mambabyte::bf16(1.f), mambabyte::bf16(-0.5f),
                                   mambabyte::bf16(3.f)};
  std::vector<std::int64_t> i64{1, -2, std::int64_t{1} << 40, INT64_MIN};
  float scalar = 42.f;
  std::vector<TensorWrite> tw{
      {"layer.f32", DType::kF32, {2, 3}, f32.data()}, {"f64", DType::kF64, {4}, f64.data()},
      {"bf", DType::kBF16, {3}, b16.data()},          {"ints", DType::kI64, {2, 2}, i64.data()},
      {"empty", DType::kF32, {0, 5}, nullptr},        {"scalar", DType::kF32, {}, &scalar}};
  std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "h\u00e9llo \"q\""}};
  fs::path const p = tmp_dir() / "roundtrip.safetensors";
  fs::remove(p);
  write_safetensors(p, tw, meta);

  // layout: 8-byte length, space-padded JSON header (multiple of 8), then contiguous data
  Bytes const raw = read_file(p);
  std::uint64_t n = 0;
  for (int k = 0; k < 8; ++k)
    n |= static_cast<std::uint64_t>(raw[static_cast<std::size_t>(k)]) << (8 * k);
  CHECK(n % 8 == 0);
  CHECK(raw[8] == '{');
  std::size_t const data_bytes = 24 + 32 + 6 + 32 + 0 + 4;
  CHECK(raw.size() == 8 + n + data_bytes);
  CHECK(std::memcmp(raw.data() + 8 + n, f32.data(), 24) == 0);  // first tensor first

  TensorFile const f = read_safetensors(p);
  CHECK(f.path() == p);
  CHECK(f.metadata() == meta);
  REQUIRE(f.tensors().size() == tw.size());
  for (std::size_t k = 0; k < tw.size(); ++k) {  // data order == given order
    auto const& r = f.tensors()[k];
    CHECK(r.name == tw[k].name);
    CHECK(r.dtype == tw[k].dtype);
    CHECK(r.shape == tw[k].shape);
    REQUIRE(r.bytes.size() == static_cast<std::size_t>(r.numel()) * mambabyte::dtype_size(r.dtype));
    if (!r.bytes.empty()) CHECK(std::memcmp(r.bytes.data(), tw[k].data, r.bytes.size()) == 0);
  }
  CHECK(f.at("empty").numel() == 0);
  CHECK(f.at("empty").bytes.empty());
  CHECK(f.at("scalar").numel() == 1);
  CHECK(values(f.at("bf")) == std::vector<double>{1.0, -0.5, 3.0});
  CHECK(values(f.at("f64")) == std::vector<double>(f64.begin(), f64.end()));
  CHECK(f.find("nope") == nullptr);
  REQUIRE_THROWS_WITH(f.at("nope"), Contains("nope") && Contains(p.string()));

  // a copy keeps the mapping alive after the original is gone
  std::optional<TensorFile> tmp(f);
  TensorFile const copy = *tmp;
  tmp.reset();
  CHECK(values(copy.at("layer.f32"))[2] == 3.25);

  // dispatch by content
  CHECK(read_tensor_file(p).tensors().size() == tw.size());

  // overwriting an existing file works
  std::vector<TensorWrite> tw2{{"only", DType::kF32, {1}, &scalar}};
  write_safetensors(p, tw2);
  TensorFile const g = read_safetensors(p);
  REQUIRE(g.tensors().size() == 1);
  CHECK(g.metadata().empty());
}

TEST_CASE("convert_to reads every float dtype, unaligned, and rejects misuse", "[io]") {
  // bytes at an odd address: convert_to must not assume alignment
  auto record = [](std::string name, DType dt, std::vector<std::int64_t> shape,
                   Bytes const& payload, Bytes& storage) {
    storage.assign(1, 0xAA);
    append(storage, payload);
    return TensorRecord{std::move(name), dt, std::move(shape),
                        std::as_bytes(std::span(storage)).subspan(1)};
  };
  Bytes s1, s2, s3, s4, s5;
  auto const f32 =
      record("f32", DType::kF32, {3}, bytes_of(std::vector<float>{1.5f, -2.f, 0.1f}), s1);
  auto const f64 = record("f64", DType::kF64, {2}, bytes_of(std::vector<double>{0.1, -1e-300}), s2);
  auto const f16 =
      record("f16", DType::kF16, {5},
             bytes_of(std::vector<std::uint16_t>{0x3C00, 0xC000, 0x3555, 0x0001, 0x7C00}), s3);
  auto const b16 =
      record("b16", DType::kBF16, {2}, bytes_of(std::vector<std::uint16_t>{0x3F80, 0xC0A0}), s4);
  auto const i64 = record("ids", DType::kI64, {1}, bytes_of(std::vector<std::int64_t>{3}), s5);

  std::vector<float> vf(3);
  convert_to<float>(f32, vf);
  CHECK(vf == std::vector<float>{1.5f, -2.f, 0.1f});
  std::vector<double> vd(3);
  convert_to<double>(f32, vd);
  CHECK(vd[2] == static_cast<double>(0.1f));

  std::vector<double> d2(2);
  convert_to<double>(f64, d2);
  CHECK(d2 == std::vector<double>{0.1, -1e-300});
  std::vector<float> f2(2);
  convert_to<float>(f64, f2);
  CHECK(f2[0] == 0.1f);
  CHECK(f2[1] == -0.0f);

  std::vector<float> h(5);
  convert_to<float>(f16, h);
  CHECK(h[0] == 1.0f);
  CHECK(h[1] == -2.0f);
  CHECK(h[2] == Approx(0.33325195f));
  CHECK(h[3] == Approx(5.9604645e-8f));
  CHECK(std::isinf(h[4]));

  std::vector<double> bb(2);
  convert_to<double>(b16, bb);
  CHECK(bb == std::vector<double>{1.0, -5.0});

  std::vector<float> wrong(4);
  REQUIRE_THROWS_WITH(convert_to<float>(f32, wrong, "model.safetensors"),
                      Contains("f32") && Contains("model.safetensors"));
  std::vector<float> one(1);
  REQUIRE_THROWS_WITH(convert_to<float>(i64, one, "model.safetensors"),
                      Contains("ids") && Contains("I64") && Contains("model.safetensors"));
  REQUIRE_THROWS_AS(convert_to<double>(i64, std::span<double>()), Error);
}

TEST_CASE("malformed safetensors files throw Errors naming the file", "[io][safetensors]") {
  std::string const ok_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}})";
  Bytes const ok = st_raw(ok_header, 16);
  {
    fs::path const p = tmp_dir() / "st_ok.safetensors";
    write_file(p, ok);
    REQUIRE(read_safetensors(p).tensors().size() == 2);
  }
  std::size_t const n = ok.size() - 16 - 8;
  // truncation anywhere: inside the length, inside the header, inside the data
  for (std::size_t cut : {std::size_t{0}, std::size_t{4}, std::size_t{7}, std::size_t{8}, 8 + n / 2,
                          8 + n, ok.size() - 9, ok.size() - 1}) {
    expect_st_error("st_cut_" + std::to_string(cut) + ".safetensors",
                    Bytes(ok.begin(), ok.begin() + static_cast<std::ptrdiff_t>(cut)));
  }
  {
    Bytes b = ok;  // header length beyond the file
    std::uint64_t const len = b.size();
    for (int k = 0; k < 8; ++k)
      b[static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(len >> (8 * k));
    expect_st_error("st_len_beyond.safetensors", b, "header length");
    for (int k = 0; k < 8; ++k) b[static_cast<std::size_t>(k)] = 0xff;  // 2^64-1: no overflow
    expect_st_error("st_len_huge.safetensors", b, "header length");
  }
  expect_st_error("st_bad_json.safetensors", st_raw(R"({"a": {"dtype": )", 0), "JSON");
  expect_st_error("st_not_object.safetensors", st_raw("[1, 2, 3]", 0), "not an object");
  expect_st_error("st_empty_header.safetensors", st_raw("", 0), "JSON");
  expect_st_error("st_beyond.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "'a'");
  expect_st_error("st_end_before_begin.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 8),
                  "end before begin");
  expect_st_error("st_nbytes.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
                  "need 12");
  expect_st_error("st_dtype.safetensors",
                  st_raw(R"({"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8), "F31");
  expect_st_error("st_dtype_type.safetensors",
                  st_raw(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8), "dtype");
  expect_st_error("st_overlap.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         12),
                  "overlap");
  expect_st_error("st_neg_shape.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "shape");
  expect_st_error("st_float_shape.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
                  "shape");
  expect_st_error(
      "st_shape_overflow.safetensors",
      st_raw(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
      "overflows");
  expect_st_error("st_offsets_arity.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
                  "data_offsets");
  expect_st_error("st_offsets_huge.safetensors",
                  st_raw(R"({"a":{"dtype":"U8","shape":[1],)"
                         R"("data_offsets":[18446744073709551615,18446744073709551615]}})",
                         8),
                  "'a'");
  expect_st_error("st_missing_shape.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "shape");
  expect_st_error("st_dup_key.safetensors",
                  st_raw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                         8),
                  "duplicate");
  expect_st_error(
      "st_meta.safetensors",
      st_raw(R"({"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
      "__metadata__");
  expect_st_error("st_deep.safetensors", st_raw(std::string(5000, '[') + std::string(5000, ']'), 0),
                  "nesting");
  expect_st_error("st_bad_utf8.safetensors", st_raw("{\"\xff\xfe\":{}}", 0), "JSON");
  fs::path const missing = tmp_dir() / "st_missing.safetensors";
  REQUIRE_THROWS_WITH(read_safetensors(missing), Contains(missing.string()));
  REQUIRE_THROWS_WITH(read_tensor_file(missing), Contains(missing.string()));
}

TEST_CASE("safetensors reader survives every truncation and byte flip", "[io][safetensors][fuzz]") {
  float vals[3] = {1, 2, 3};
  std::int64_t ids[2] = {7, 8};
  std::vector<TensorWrite> tw{{"w", DType::kF32, {3}, vals}, {"ids", DType::kI64, {2}, ids}};
  fs::path const good = tmp_dir() / "fuzz_src.safetensors";
  write_safetensors(good, tw, {{"k", "v"}});
  Bytes const src = read_file(good);
  fs::path const p = tmp_dir() / "fuzz.safetensors";
  int errors = 0;
  auto attempt = [&](Bytes const& b) {
    write_file(p, b);
    try {
      TensorFile f = read_safetensors(p);
      for (auto const& r : f.tensors())
        REQUIRE(r.bytes.size() ==
                static_cast<std::size_t>(r.numel()) * mambabyte::dtype_size(r.dtype));
    } catch (Error const& e) {
      ++errors;
      REQUIRE_THAT(e.what(), Contains(p.string()));
    }
  };
  for (std::size_t cut = 0; cut < src.size(); ++cut)
    attempt(Bytes(src.begin(), src.begin() + static_cast<std::ptrdiff_t>(cut)));
  for (std::size_t k = 0; k < src.size(); ++k)
    for (std::uint8_t x : {std::uint8_t{0x01}, std::uint8_t{0x80}, std::uint8_t{0xff}}) {
      Bytes b = src;
      b[k] ^= x;
      attempt(b);
    }
  CHECK(errors > static_cast<int>(src.size()));  // every truncation at least
}

TEST_CASE("write_safetensors is atomic", "[io][safetensors]") {
  float v[4] = {1, 2, 3, 4};
  std::vector<TensorWrite> tw{{"v", DType::kF32, {4}, v}};

  SECTION("a nonexistent directory throws and creates nothing") {
    fs::path const dir = tmp_dir() / "no_such_dir";
    fs::remove_all(dir);
    fs::path const p = dir / "out.safetensors";
    REQUIRE_THROWS_WITH(write_safetensors(p, tw), Contains(p.string()));
    CHECK_FALSE(fs::exists(dir));
  }
  SECTION("a failed write leaves the previous file byte-identical and no temp files") {
    fs::path const dir = tmp_dir() / "atomic";
    fs::remove_all(dir);
    fs::create_directories(dir);
    fs::path const p = dir / "model.safetensors";
    write_safetensors(p, tw, {{"version", "1"}});
    Bytes const before = read_file(p);
    auto const listing = dir_listing(dir);
    REQUIRE(listing == std::set<std::string>{"model.safetensors"});

    std::vector<TensorWrite> null_data{{"v", DType::kF32, {4}, v},
                                       {"w", DType::kF32, {2}, nullptr}};
    REQUIRE_THROWS_WITH(write_safetensors(p, null_data), Contains(p.string()) && Contains("'w'"));
    std::vector<TensorWrite> dup{{"v", DType::kF32, {4}, v}, {"v", DType::kF32, {4}, v}};
    REQUIRE_THROWS_WITH(write_safetensors(p, dup), Contains(p.string()) && Contains("duplicate"));
    std::vector<TensorWrite> meta_name{{"__metadata__", DType::kF32, {4}, v}};
    REQUIRE_THROWS_WITH(write_safetensors(p, meta_name), Contains(p.string()));
    std::vector<TensorWrite> neg{{"v", DType::kF32, {-4}, v}};
    REQUIRE_THROWS_WITH(write_safetensors(p, neg), Contains(p.string()) && Contains("shape"));
    std::vector<TensorWrite> bad_utf8{{"\xff", DType::kF32, {4}, v}};
    REQUIRE_THROWS_WITH(write_safetensors(p, bad_utf8), Contains(p.string()));

    CHECK(read_file(p) == before);
    CHECK(dir_listing(dir) == listing);

    // rename onto a directory fails late (after the data was written): temp file removed
    fs::path const d2 = dir / "is_a_dir.safetensors";
    fs::create_directories(d2 / "child");
    REQUIRE_THROWS_WITH(write_safetensors(d2, tw), Contains(d2.string()));
    CHECK(dir_listing(dir) == std::set<std::string>{"model.safetensors", "is_a_dir.safetensors"});
  }
}

// ---- ZIP --------------------------------------------------------------------------------------

TEST_CASE("ZipReader reads stored entries, ZIP64 records, and checks CRCs", "[io][zip]") {
  for (bool zip64 : {false, true}) {
    INFO("zip64 " << zip64);
    auto const z =
        build_zip({{"a.txt", Bytes{'h', 'i'}}, {"dir/b.bin", Bytes(300, 7)}, {"e", {}}}, zip64);
    ZipReader r(std::as_bytes(std::span(z.bytes)), "mem.zip");
    CHECK(r.names() == std::vector<std::string>{"a.txt", "dir/b.bin", "e"});
    auto a = r.entry("a.txt");
    REQUIRE(a);
    CHECK(a->size() == 2);
    CHECK(static_cast<char>((*a)[1]) == 'i');
    CHECK(r.entry("dir/b.bin")->size() == 300);
    CHECK(r.entry("e")->empty());
    CHECK_FALSE(r.entry("missing"));
  }
  auto const compressed = build_zip({{"x", Bytes{1, 2, 3}, 8}});
  ZipReader rc(std::as_bytes(std::span(compressed.bytes)), "c.zip");
  REQUIRE_THROWS_WITH(rc.entry("x"),
                      Contains("compressed (method 8)") && Contains("c.zip") && Contains("'x'"));
  auto const corrupt = build_zip({{"x", Bytes{1, 2, 3}, 0, true}});
  ZipReader rb(std::as_bytes(std::span(corrupt.bytes)), "b.zip");
  REQUIRE_THROWS_WITH(rb.entry("x"), Contains("CRC") && Contains("b.zip"));
  CHECK(rb.entry("x", /*verify_crc=*/false)->size() == 3);

  Bytes junk(100, 0x41);
  REQUIRE_THROWS_WITH(ZipReader(std::as_bytes(std::span(junk)), "junk.bin"),
                      Contains("junk.bin") && Contains("end-of-central-directory"));
  auto dup = build_zip({{"x", Bytes{1}}, {"x", Bytes{2}}});
  REQUIRE_THROWS_WITH(ZipReader(std::as_bytes(std::span(dup.bytes)), "dup.zip"),
                      Contains("duplicate"));
}

TEST_CASE("ZipReader survives every truncation and byte flip", "[io][zip][fuzz]") {
  for (bool zip64 : {false, true}) {
    auto const z = build_zip({{"a", Bytes{'h', 'i'}}, {"b", Bytes(40, 9)}}, zip64);
    auto const try_read = [](Bytes const& b) {
      try {
        ZipReader r(std::as_bytes(std::span(b)), "fuzz.zip");
        for (auto const& n : r.names()) (void)r.entry(n);
      } catch (Error const& e) {
        REQUIRE_THAT(e.what(), Contains("fuzz.zip"));
      }
    };
    for (std::size_t cut = 0; cut < z.bytes.size(); ++cut)
      try_read(Bytes(z.bytes.begin(), z.bytes.begin() + static_cast<std::ptrdiff_t>(cut)));
    for (std::size_t k = 0; k < z.bytes.size(); ++k)
      for (std::uint8_t x : {std::uint8_t{0x01}, std::uint8_t{0x80}, std::uint8_t{0xff}}) {
        Bytes b = z.bytes;
        b[k] ^= x;
        try_read(b);
      }
  }
}

// ---- pickle -----------------------------------------------------------------------------------

TEST_CASE("pickle VM handles the protocol 2-5 opcode subset", "[io][pickle]") {
  Pk p;
  p.proto(4).raw({0x95});
  put_le(p.b, 0, 8);  // FRAME length (patched below)
  std::size_t const frame_start = p.b.size();
  p.op('}').raw({0x94}).mark();           // EMPTY_DICT, MEMOIZE(0), MARK
  auto key = [&](std::string const& s) {  // SHORT_BINUNICODE
    p.raw({0x8c, static_cast<int>(s.size())});
    append(p.b, s);
  };
  key("i1");
  p.raw({'K', 200});
  key("i2");
  p.raw({'M', 0x60, 0xea});  // 60000
  key("i4");
  p.raw({'J', 0xfb, 0xff, 0xff, 0xff});  // -5
  key("l0");
  p.raw({0x8a, 0});  // 0
  key("l1");
  p.raw({0x8a, 2, 0x00, 0xff});  // -256
  key("l9");
  p.raw({0x8a, 9, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff});  // -3
  key("f");
  p.raw({'G', 0x3f, 0xf8, 0, 0, 0, 0, 0, 0});  // 1.5
  key("n");
  p.op('N');
  key("t");
  p.raw({0x88});
  key("fa");
  p.raw({0x89});
  key("s8");
  p.raw({0x8d});
  put_le(p.b, 4, 8);
  append(p.b, "long");
  key("ss");
  p.raw({'U', 3});
  append(p.b, "py2");
  key("bs");
  p.raw({'T', 4, 0, 0, 0});
  append(p.b, "py2b");
  key("tup3");
  p.i(1).i(2).i(3).raw({0x87});
  key("lst");
  p.op(']').i(1).op('a').mark().i(2).i(3).op('e');
  key("dup");
  p.op(']').op('2').op('0');  // DUP then POP: one list left
  key("pm");
  p.mark().i(1).i(2).op('1').i(9);  // POP_MARK drops 1, 2
  key("od");
  p.raw({0x8c, 11});
  append(p.b, "collections");
  p.raw({0x8c, 11});
  append(p.b, "OrderedDict");
  p.raw({0x93}).op(')').raw({0x81});  // STACK_GLOBAL + NEWOBJ
  key("memo");
  p.i(77).raw({'r', 0xe8, 0x03, 0, 0});  // LONG_BINPUT 1000
  key("again");
  p.raw({'j', 0xe8, 0x03, 0, 0});  // LONG_BINGET 1000
  key("self");
  p.raw({'h', 0});  // BINGET 0: the dict itself (cycle)
  p.i(5);
  key("int key");
  key("i1");
  p.i(201);  // same key: replaced in place
  p.op('u').stop();
  std::uint64_t const frame_len = p.b.size() - frame_start;
  for (int k = 0; k < 8; ++k)
    p.b[frame_start - 8 + static_cast<std::size_t>(k)] =
        static_cast<std::uint8_t>(frame_len >> (8 * k));

  pickle::Unpickler up(std::as_bytes(std::span(p.b)), "mem.pkl");
  CHECK(up.protocol() == 4);
  pickle::Dict const* d = up.root().dict();
  REQUIRE(d != nullptr);
  auto int_of = [&](std::string const& k) { return *d->find(k)->get_if<std::int64_t>(); };
  CHECK(int_of("i1") == 201);
  CHECK(d->items[0].first.string()->compare("i1") == 0);  // replaced, not moved
  CHECK(int_of("i2") == 60000);
  CHECK(int_of("i4") == -5);
  CHECK(int_of("l0") == 0);
  CHECK(int_of("l1") == -256);
  CHECK(int_of("l9") == -3);
  CHECK(*d->find("f")->get_if<double>() == 1.5);
  CHECK(d->find("n")->is<pickle::None>());
  CHECK(*d->find("t")->get_if<bool>() == true);
  CHECK(*d->find("fa")->get_if<bool>() == false);
  CHECK(*d->find("s8")->string() == "long");
  CHECK(*d->find("ss")->string() == "py2");
  CHECK(*d->find("bs")->string() == "py2b");
  REQUIRE(d->find("tup3")->tuple() != nullptr);
  CHECK(d->find("tup3")->tuple()->items.size() == 3);
  CHECK(*d->find("tup3")->tuple()->items[2].get_if<std::int64_t>() == 3);
  REQUIRE(d->find("lst")->list() != nullptr);
  CHECK(d->find("lst")->list()->items.size() == 3);
  CHECK(d->find("dup")->list() != nullptr);
  CHECK(int_of("pm") == 9);
  REQUIRE(d->find("od")->dict() != nullptr);
  CHECK(d->find("od")->dict()->items.empty());
  CHECK(int_of("memo") == 77);
  CHECK(int_of("again") == 77);
  CHECK(d->find("self")->dict() == d);
  REQUIRE(d->find(std::int64_t{5}) != nullptr);
  CHECK(*d->find(std::int64_t{5})->string() == "int key");
}

TEST_CASE("pickle VM rejects hostile programs with precise Errors", "[io][pickle]") {
  auto run = [](Pk const& p, pickle::Limits lim = {}) {
    pickle::Unpickler up(std::as_bytes(std::span(p.b)), "evil.pkl", lim);
  };
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({0xff})),
                      Contains("evil.pkl") && Contains("0xff") && Contains("offset 2"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({'i'})), Contains("0x69"));  // INST: not supported
  REQUIRE_THROWS_WITH(
      run(Pk().proto(2).global("os", "system").str("ls").raw({0x85}).reduce().stop()),
      Contains("os.system") && Contains("evil.pkl"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).global("torch.storage", "_load_from_bytes")),
                      Contains("torch.storage._load_from_bytes"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).global("builtins", "eval")), Contains("builtins.eval"));
  {
    Pk p;  // STACK_GLOBAL goes through the same allow-list
    p.proto(4).raw({0x8c, 2});
    append(p.b, "os");
    p.raw({0x8c, 6});
    append(p.b, "system");
    p.raw({0x93});
    REQUIRE_THROWS_WITH(run(p), Contains("os.system"));
  }
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({0x85})), Contains("stack underflow"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).mark().raw({0x85})), Contains("stack underflow"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).op('0')), Contains("stack underflow"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).op('t')), Contains("MARK"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({'h', 7})), Contains("memo index 7"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({'q', 0})), Contains("stack underflow"));
  {
    Pk p;
    p.proto(2).op('X');
    put_le(p.b, 100, 4);
    append(p.b, "abc");
    REQUIRE_THROWS_WITH(run(p), Contains("truncated") && Contains("offset 2"));
  }
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({'J', 1, 2})), Contains("truncated"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).op('c').raw({'o', 's'})), Contains("truncated"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).odict()), Contains("no STOP"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).stop()), Contains("STOP"));
  REQUIRE_THROWS_WITH(run(Pk().proto(9)), Contains("protocol 9"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).raw({0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1})),
                      Contains("64 bits"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).i(1).i(2).op('a')), Contains("not a list"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).op('}').op(']').i(1).op('s')), Contains("dict key"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).i(3).op(')').reduce()), Contains("not a global"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).global("torch", "FloatStorage").op(')').reduce()),
                      Contains("cannot be called"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).i(3).op('Q')), Contains("persistent id"));
  REQUIRE_THROWS_WITH(
      run(Pk().proto(2).global("torch._utils", "_rebuild_tensor_v2").mark().i(1).tuple().reduce()),
      Contains("6 or 7 arguments"));
  REQUIRE_THROWS_WITH(run(Pk().proto(2).mark().op('N').stop()), Contains("MARK"));

  // Deep nesting is fine (no recursion): 100k nested lists, then a self-cycle.
  {
    Pk p;
    p.proto(2);
    for (int k = 0; k < 100000; ++k) p.op(']');
    for (int k = 0; k < 99999; ++k) p.op('a');
    p.raw({'q', 0, 'h', 0, 'a'}).stop();
    run(p);
  }
  // Resource cap: many values fail cleanly.
  {
    Pk p;
    p.proto(2).op(']').raw({'q', 0});
    for (int k = 0; k < 1000; ++k) p.raw({'h', 0, 'a'});  // append the list to itself
    p.stop();
    pickle::Limits lim;
    lim.max_values = 500;
    REQUIRE_THROWS_WITH(run(p, lim), Contains("limit"));
    run(p);  // default limits accept it
  }
}

// ---- PyTorch zip checkpoints --------------------------------------------------------------------

TEST_CASE("read_pytorch_bin reads a synthetic torch.save archive", "[io][pytorch]") {
  Synthetic const s = synthetic_state_dict();
  for (bool zip64 : {false, true}) {
    INFO("zip64 " << zip64);
    auto const z = torch_zip(s.pkl.b, s.storages, "my_model", zip64);
    fs::path const p = tmp_dir() / (zip64 ? "synthetic64.pt" : "synthetic.pt");
    write_file(p, z.bytes);
    TensorFile const f = read_pytorch_bin(p);
    check_synthetic(f);
    // contiguous tensors point into the mapping: their distance equals the file distance
    auto const off_a = static_cast<std::ptrdiff_t>(z.data_offset.at("my_model/data/0"));
    auto const off_c = static_cast<std::ptrdiff_t>(z.data_offset.at("my_model/data/2"));
    CHECK(f.at("c").bytes.data() - f.at("a").bytes.data() == off_c - off_a);
    check_synthetic(read_tensor_file(p));
  }
}

TEST_CASE("read_pytorch_bin unwraps state_dict / model and skips non-tensors", "[io][pytorch]") {
  Synthetic const s = synthetic_state_dict();
  Bytes inner(s.pkl.b.begin() + 2, s.pkl.b.end() - 1);  // without PROTO and STOP
  for (std::string const wrapper : {"state_dict", "model"}) {
    Pk p;
    p.proto(2).op('}').mark().str("epoch").i(3).str("optimizer").op('}').str(wrapper);
    append(p.b, inner);
    p.op('u').stop();
    fs::path const pth = tmp_dir() / ("wrapped_" + wrapper + ".pt");
    write_file(pth, torch_zip(p.b, s.storages).bytes);
    check_synthetic(read_pytorch_bin(pth));
  }
  {  // a plain dict (not OrderedDict) of tensors with a _rebuild_parameter entry
    Pk p;
    p.proto(2).op('}').mark().str("w");
    p.global("torch._utils", "_rebuild_parameter").mark();
    p.tensor("FloatStorage", "2", 4, 1, {2}, {2}).raw({0x88}).odict().tuple().reduce();
    p.op('u').stop();
    fs::path const pth = tmp_dir() / "param.pt";
    write_file(pth, torch_zip(p.b, {{"2", bytes_of(std::vector<float>{1, 2, 3, 4})}}).bytes);
    TensorFile const f = read_pytorch_bin(pth);
    REQUIRE(f.tensors().size() == 1);
    CHECK(values(f.at("w")) == std::vector<double>{2, 4});
  }
}

TEST_CASE("malformed PyTorch checkpoints throw Errors naming the file", "[io][pytorch]") {
  Synthetic const s = synthetic_state_dict();
  auto with_pickle = [&](Pk const& p) { return torch_zip(p.b, s.storages).bytes; };

  expect_pt_error("pt_unknown_op.pt", with_pickle(Pk().proto(2).raw({0xfe})), "0xfe");
  expect_pt_error(
      "pt_forbidden.pt",
      with_pickle(Pk().proto(2).global("os", "system").str("rm -rf /").raw({0x85}).reduce().stop()),
      "os.system");
  {
    Pk p;
    p.proto(2).odict().mark().str("x").tensor("FloatStorage", "9", 6, 0, {6}, {1}).op('u').stop();
    expect_pt_error("pt_missing_storage.pt", with_pickle(p), "archive/data/9");
  }
  {
    Pk p;  // (4, 4) contiguous needs 16 elements, storage has 6
    p.proto(2)
        .odict()
        .mark()
        .str("x")
        .tensor("FloatStorage", "0", 6, 0, {4, 4}, {4, 1})
        .op('u')
        .stop();
    expect_pt_error("pt_small_storage.pt", with_pickle(p), "beyond storage");
  }
  {
    Pk p;  // strides reach past the end: offset 2 + (2-1)*4 = 6 >= 6
    p.proto(2)
        .odict()
        .mark()
        .str("x")
        .tensor("FloatStorage", "0", 6, 2, {2, 1}, {4, 1})
        .op('u')
        .stop();
    expect_pt_error("pt_stride_oob.pt", with_pickle(p), "beyond storage");
  }
  {
    Pk p;  // declared numel does not match the entry size
    p.proto(2).odict().mark().str("x").tensor("FloatStorage", "0", 7, 0, {7}, {1}).op('u').stop();
    expect_pt_error("pt_numel.pt", with_pickle(p), "storage '0'");
  }
  {
    Pk p;  // offset beyond the storage
    p.proto(2).odict().mark().str("x").tensor("FloatStorage", "0", 6, 7, {0}, {1}).op('u').stop();
    expect_pt_error("pt_offset.pt", with_pickle(p), "offset");
  }
  {
    Pk p;  // huge broadcast view: the copy is refused instead of exhausting memory
    p.proto(2)
        .odict()
        .mark()
        .str("x")
        .tensor("FloatStorage", "0", 6, 0, {std::int64_t{1} << 40}, {0})
        .op('u')
        .stop();
    expect_pt_error("pt_broadcast.pt", with_pickle(p), "limit");
  }
  expect_pt_error("pt_list.pt", with_pickle(Pk().proto(2).op(']').stop()), "not a dict");
  {
    Pk p;
    p.proto(2).odict().mark().i(1).tensor("FloatStorage", "0", 6, 0, {6}, {1}).op('u').stop();
    expect_pt_error("pt_int_key.pt", with_pickle(p), "non-string key");
  }
  {
    std::vector<ZipItem> items{{"archive/data.pkl", s.pkl.b}};
    for (auto const& st : s.storages)
      items.push_back({"archive/data/" + st.key, st.data, std::uint16_t(st.key == "1" ? 8 : 0)});
    expect_pt_error("pt_deflated.pt", build_zip(items).bytes, "compressed (method 8)");
  }
  {
    std::vector<ZipItem> items{{"archive/data.pkl", s.pkl.b}};
    for (auto const& st : s.storages)
      items.push_back({"archive/data/" + st.key, st.data, 0, st.key == "2"});
    expect_pt_error("pt_bad_crc.pt", build_zip(items).bytes, "CRC");
  }
  {
    Bytes b = torch_zip(s.pkl.b, s.storages).bytes;  // flip a data byte: CRC catches it
    std::size_t const at = torch_zip(s.pkl.b, s.storages).data_offset.at("archive/data/1");
    b[at + 3] ^= 0x10;
    expect_pt_error("pt_flipped.pt", b, "CRC");
  }
  expect_pt_error("pt_no_pickle.pt", build_zip({{"archive/data/0", Bytes(4)}}).bytes, "data.pkl");
  expect_pt_error("pt_two_pickles.pt",
                  build_zip({{"a/data.pkl", s.pkl.b}, {"b/data.pkl", s.pkl.b}}).bytes, "several");
  {
    std::vector<ZipItem> items{{"archive/data.pkl", s.pkl.b},
                               {"archive/byteorder", Bytes{'b', 'i', 'g'}}};
    expect_pt_error("pt_big_endian.pt", build_zip(items).bytes, "byte order");
  }
  {
    Bytes const full = torch_zip(s.pkl.b, s.storages).bytes;
    for (std::size_t cut : {std::size_t{0}, std::size_t{3}, std::size_t{30}, full.size() / 2,
                            full.size() - 22, full.size() - 1})
      expect_pt_error("pt_cut_" + std::to_string(cut) + ".pt",
                      Bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(cut)));
  }
  {
    Bytes legacy{0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46,
                 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, '.'};
    std::string const msg =
        "legacy torch.save format (pre-1.6) is not supported; re-save it with torch>=1.6";
    expect_pt_error("pt_legacy.pt", legacy, msg);
    fs::path const p = tmp_dir() / "pt_legacy.pt";
    REQUIRE_THROWS_WITH(read_tensor_file(p), Contains(msg) && Contains(p.string()));
  }
  fs::path const missing = tmp_dir() / "pt_missing.pt";
  REQUIRE_THROWS_WITH(read_pytorch_bin(missing), Contains(missing.string()));
}

TEST_CASE("read_pytorch_bin survives every truncation and byte flip", "[io][pytorch][fuzz]") {
  Synthetic const s = synthetic_state_dict();
  Bytes const src = torch_zip(s.pkl.b, s.storages).bytes;
  fs::path const p = tmp_dir() / "pt_fuzz.pt";
  auto attempt = [&](Bytes const& b) {
    write_file(p, b);
    try {
      TensorFile const f = read_pytorch_bin(p);
      for (auto const& r : f.tensors())
        REQUIRE(r.bytes.size() ==
                static_cast<std::size_t>(r.numel()) * mambabyte::dtype_size(r.dtype));
    } catch (Error const& e) {
      REQUIRE_THAT(e.what(), Contains(p.string()));
    }
  };
  for (std::size_t cut = 0; cut < src.size(); cut += 3)
    attempt(Bytes(src.begin(), src.begin() + static_cast<std::ptrdiff_t>(cut)));
  for (std::size_t k = 0; k < src.size(); ++k) {
    Bytes b = src;
    b[k] ^= static_cast<std::uint8_t>(1u << (k % 8));
    attempt(b);
  }
}

// ---- real torch.save() fixtures (scripts/make_io_fixtures.py) ----------------------------------

namespace {
void compare_with_expected(TensorFile const& pt, TensorFile const& expected) {
  REQUIRE(pt.tensors().size() == expected.tensors().size());
  for (auto const& e : expected.tensors()) {
    INFO("tensor " << e.name);
    TensorRecord const* r = pt.find(e.name);
    REQUIRE(r != nullptr);
    CHECK(r->dtype == e.dtype);
    CHECK(r->shape == e.shape);
    CHECK(same_bytes(*r, e));
  }
}
}  // namespace

TEST_CASE("real torch.save fp32 state dicts (protocol 2 and 4) match safetensors",
          "[io][pytorch][fixtures]") {
  TensorFile const expected = read_safetensors(data_dir() / "fp32_expected.safetensors");
  CHECK(expected.metadata().at("fixture") == "fp32_state_dict.pt");
  for (char const* name : {"fp32_state_dict.pt", "fp32_state_dict_proto4.pt"}) {
    INFO(name);
    TensorFile const pt = read_pytorch_bin(data_dir() / name);
    std::vector<std::string> names;
    for (auto const& r : pt.tensors()) names.push_back(r.name);
    CHECK(names ==
          std::vector<std::string>{"0.weight", "0.bias", "1.weight", "1.bias", "2.weight"});
    compare_with_expected(pt, expected);
    for (auto const& r : pt.tensors())  // zero copy: torch aligns storages to 64 bytes
      CHECK(reinterpret_cast<std::uintptr_t>(r.bytes.data()) % 64 == 0);
    compare_with_expected(read_tensor_file(data_dir() / name), expected);
  }
  CHECK(values(read_pytorch_bin(data_dir() / "fp32_state_dict.pt").at("1.weight")) ==
        std::vector<double>{1, 1, 1, 1});  // LayerNorm's initial weight
}

TEST_CASE("real torch.save mixed checkpoint: bf16, int64, f16, views, wrapper",
          "[io][pytorch][fixtures]") {
  TensorFile const expected = read_safetensors(data_dir() / "mixed_expected.safetensors");
  TensorFile const pt = read_pytorch_bin(data_dir() / "mixed_checkpoint.pt");
  std::vector<std::string> names;
  for (auto const& r : pt.tensors()) names.push_back(r.name);
  CHECK(names == std::vector<std::string>{"emb.weight", "tokens", "proj.weight_t", "proj.slice",
                                          "half", "scalar", "empty"});
  compare_with_expected(pt, expected);
  CHECK(pt.at("emb.weight").dtype == DType::kBF16);
  CHECK(pt.at("half").dtype == DType::kF16);
  auto const& tok = pt.at("tokens");
  REQUIRE(tok.dtype == DType::kI64);
  std::vector<std::int64_t> ids(6);
  std::memcpy(ids.data(), tok.bytes.data(), 48);
  CHECK(ids ==
        std::vector<std::int64_t>{1, -2, 3, std::int64_t{1} << 40, -(std::int64_t{1} << 33), 0});
  // base = arange(24).reshape(4, 6) / 8 - 1
  auto base = [](int r, int c) { return (r * 6 + c) / 8.0 - 1.0; };
  auto const wt = values(pt.at("proj.weight_t"));  // (6, 4) = base.t()
  REQUIRE(pt.at("proj.weight_t").shape == std::vector<std::int64_t>{6, 4});
  for (int r = 0; r < 6; ++r)
    for (int c = 0; c < 4; ++c) CHECK(wt[static_cast<std::size_t>(r * 4 + c)] == base(c, r));
  auto const sl = values(pt.at("proj.slice"));  // base[1:3, 2:5]
  REQUIRE(pt.at("proj.slice").shape == std::vector<std::int64_t>{2, 3});
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 3; ++c)
      CHECK(sl[static_cast<std::size_t>(r * 3 + c)] == base(r + 1, c + 2));
  CHECK(values(pt.at("half"))[0] == -2.0);
  CHECK(values(pt.at("scalar")) == std::vector<double>{2.5});
  CHECK(pt.at("scalar").shape.empty());
  CHECK(pt.at("empty").numel() == 0);
  CHECK(pt.find("num_batches_tracked") == nullptr);
  CHECK(pt.find("epoch") == nullptr);
}

TEST_CASE("real legacy (pre-1.6) torch file is refused with a clear message",
          "[io][pytorch][fixtures]") {
  fs::path const p = data_dir() / "legacy.pt";
  REQUIRE_THROWS_WITH(read_pytorch_bin(p),
                      Contains("legacy torch.save format (pre-1.6) is not supported; re-save it "
                               "with torch>=1.6") &&
                          Contains(p.string()));
}
