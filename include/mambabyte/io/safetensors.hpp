/*! \file
 *  \brief safetensors reader (mmap, zero copy, every header field validated with
 *         overflow-safe arithmetic) and atomic writer (temp file in the target directory,
 *         fflush + fsync, then rename over the target).
 *
 *  Layout: u64 little-endian header length N, N bytes of JSON header
 *  {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
 *  "data_offsets": [begin, end]}, ...}, then the data section; offsets are relative to it.
 */
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/io/mapped_file.hpp"
#include "mambabyte/io/tensor_file.hpp"

namespace mambabyte::io {

/// Largest accepted safetensors JSON header (the reference implementation's limit).
inline constexpr std::uint64_t kSafetensorsMaxHeader = 100ull * 1024 * 1024;

namespace detail {

/// Read an unsigned little-endian integer of `n` bytes (n <= 8) at p.
inline std::uint64_t load_le(std::byte const* p, std::size_t n) noexcept {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}

/// A JSON integer >= 0 as uint64 (false for floats, negatives, non-numbers).
inline bool json_to_u64(nlohmann::json const& j, std::uint64_t& out) {
  if (j.is_number_unsigned()) {
    out = j.get<std::uint64_t>();
    return true;
  }
  if (j.is_number_integer()) {
    std::int64_t const v = j.get<std::int64_t>();
    if (v < 0) return false;
    out = static_cast<std::uint64_t>(v);
    return true;
  }
  return false;
}

struct SafetensorsHeaderReject {
  std::string why;
};

/// Parse the header JSON, rejecting duplicate keys and nesting deeper than the format needs
/// (bounds memory and work on hostile headers).
inline nlohmann::json parse_safetensors_header(std::string_view text, std::string const& file) {
  std::vector<std::set<std::string>> keys;  // one key set per open object
  auto cb = [&keys](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (ev) {
      case E::object_start:
      case E::array_start:
        if (depth > 2)
          throw SafetensorsHeaderReject{"nesting deeper than the safetensors format allows"};
        if (ev == E::object_start) keys.emplace_back();
        break;
      case E::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case E::key:
        if (!keys.empty() && parsed.is_string() &&
            !keys.back().insert(parsed.get<std::string>()).second)
          throw SafetensorsHeaderReject{"duplicate key \"" + parsed.get<std::string>() + "\""};
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb);
  } catch (SafetensorsHeaderReject const& r) {
    fail("safetensors file '", file, "': invalid JSON header: ", r.why);
  } catch (nlohmann::json::exception const& e) {
    std::string why = e.what();  // may quote raw header bytes: keep the message printable
    for (char& c : why)
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
    fail("safetensors file '", file, "': invalid JSON header: ", why);
  }
}

inline TensorFile read_safetensors_mapped(std::shared_ptr<MappedFile> map) {
  std::string const file = map->path().string();
  std::span<const std::byte> const all = map->bytes();
  auto bad = [&file](auto&&... args) -> Error {
    return Error(mambabyte::detail::concat("safetensors file '", file, "': ", args...));
  };

  if (all.size() < 8)
    throw bad("file is too short (", all.size(), " bytes) to hold the 8-byte header length");
  std::uint64_t const n = load_le(all.data(), 8);
  if (n > all.size() - 8)
    throw bad("header length ", n, " exceeds the ", all.size() - 8,
              " bytes that follow it (file truncated or not a safetensors file)");
  if (n > kSafetensorsMaxHeader)
    throw bad("header length ", n, " exceeds the limit of ", kSafetensorsMaxHeader, " bytes");

  std::string_view const text(reinterpret_cast<char const*>(all.data() + 8),
                              static_cast<std::size_t>(n));
  nlohmann::json const header = parse_safetensors_header(text, file);
  if (!header.is_object()) throw bad("the JSON header is not an object");

  std::span<const std::byte> const data = all.subspan(8 + static_cast<std::size_t>(n));
  std::uint64_t const data_size = data.size();

  struct Item {
    std::uint64_t begin, end;
    TensorRecord rec;
  };
  std::vector<Item> items;
  items.reserve(header.size());
  std::map<std::string, std::string> metadata;

  for (auto const& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (!info.is_object()) throw bad("\"__metadata__\" is not a JSON object");
      for (auto const& [k, v] : info.items()) {
        if (!v.is_string())
          throw bad("\"__metadata__\" entry \"", k, "\" is not a string (", v.type_name(), ")");
        metadata.emplace(k, v.get<std::string>());
      }
      continue;
    }
    if (!info.is_object()) throw bad("tensor '", name, "': entry is not a JSON object");

    auto const dt = info.find("dtype");
    if (dt == info.end() || !dt->is_string())
      throw bad("tensor '", name, "': missing or non-string \"dtype\"");
    DType dtype{};
    try {
      dtype = parse_dtype(dt->get<std::string>());
    } catch (Error const& e) {
      throw bad("tensor '", name, "': ", e.what());
    }

    auto const sh = info.find("shape");
    if (sh == info.end() || !sh->is_array())
      throw bad("tensor '", name, "': missing or non-array \"shape\"");
    std::vector<std::int64_t> shape;
    shape.reserve(sh->size());
    for (auto const& d : *sh) {
      std::uint64_t v = 0;
      if (!json_to_u64(d, v) || v > static_cast<std::uint64_t>(INT64_MAX))
        throw bad("tensor '", name, "': shape entry ", d.dump(), " is not a non-negative integer");
      shape.push_back(static_cast<std::int64_t>(v));
    }
    std::int64_t numel = 0;
    std::uint64_t nbytes = 0;
    if (!checked_numel(shape, numel) ||
        !mul_u64(static_cast<std::uint64_t>(numel), dtype_size(dtype), nbytes))
      throw bad("tensor '", name, "': shape ", shape_string(shape), " overflows");

    auto const off = info.find("data_offsets");
    if (off == info.end() || !off->is_array() || off->size() != 2)
      throw bad("tensor '", name, "': \"data_offsets\" must be an array [begin, end]");
    std::uint64_t begin = 0, end = 0;
    if (!json_to_u64((*off)[0], begin) || !json_to_u64((*off)[1], end))
      throw bad("tensor '", name, "': data_offsets ", off->dump(),
                " are not non-negative integers");
    if (end < begin)
      throw bad("tensor '", name, "': data_offsets ", off->dump(), " end before begin");
    if (end > data_size)
      throw bad("tensor '", name, "': data_offsets ", off->dump(), " exceed the data section (",
                data_size, " bytes; file truncated?)");
    if (end - begin != nbytes)
      throw bad("tensor '", name, "': data_offsets ", off->dump(), " span ", end - begin,
                " bytes but dtype ", dtype_name(dtype), " and shape ", shape_string(shape),
                " need ", nbytes);

    TensorRecord rec;
    rec.name = name;
    rec.dtype = dtype;
    rec.shape = std::move(shape);
    rec.bytes = data.subspan(static_cast<std::size_t>(begin), static_cast<std::size_t>(nbytes));
    items.push_back(Item{begin, end, std::move(rec)});
  }

  std::sort(items.begin(), items.end(), [](Item const& a, Item const& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.rec.name < b.rec.name;
  });
  Item const* prev = nullptr;  // last non-empty tensor
  for (Item const& it : items) {
    if (it.begin == it.end) continue;
    if (prev != nullptr && it.begin < prev->end)
      throw bad("tensors '", prev->rec.name, "' [", prev->begin, ", ", prev->end, ") and '",
                it.rec.name, "' [", it.begin, ", ", it.end, ") overlap");
    prev = &it;
  }

  std::vector<TensorRecord> records;
  records.reserve(items.size());
  for (Item& it : items) records.push_back(std::move(it.rec));
  std::filesystem::path p = map->path();
  return TensorFile(std::move(p), std::move(records), std::move(metadata),
                    {std::shared_ptr<const void>(std::move(map))});
}

/// Removes a temporary file unless released; closes its FILE*.
class TempFileGuard {
 public:
  TempFileGuard() = default;
  TempFileGuard(TempFileGuard const&) = delete;
  TempFileGuard& operator=(TempFileGuard const&) = delete;
  ~TempFileGuard() {
    if (fp != nullptr) std::fclose(fp);
    if (!path.empty()) ::unlink(path.c_str());
  }
  std::FILE* fp = nullptr;
  std::string path;  // empty once renamed
};

inline std::atomic<unsigned>& temp_counter() {
  static std::atomic<unsigned> c{0};
  return c;
}

}  // namespace detail

/// Read a safetensors file (memory-mapped; records point into the mapping). Throws
/// mambabyte::Error naming the file (and the tensor, where relevant) on any malformed input.
inline TensorFile read_safetensors(std::filesystem::path const& path) {
  return detail::read_safetensors_mapped(std::make_shared<MappedFile>(path));
}

/// Write a safetensors file atomically: the header (padded with spaces to a multiple of 8)
/// and the tensors' data in the given order, contiguous, to a temporary file in the target's
/// directory, flushed and fsync'ed, then renamed over `path`. On any failure the temporary
/// file is removed, `path` is left as it was, and mambabyte::Error names the path.
inline void write_safetensors(std::filesystem::path const& path,
                              std::span<const TensorWrite> tensors,
                              std::map<std::string, std::string> const& metadata = {}) {
  std::string const file = path.string();
  auto bad = [&file](auto&&... args) -> Error {
    return Error(
        mambabyte::detail::concat("cannot write safetensors file '", file, "': ", args...));
  };
  if (!path.has_filename()) throw bad("the path names no file");

  // ---- validate everything and build the header before touching the disk ----
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (auto const& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string_view> names;
  std::vector<std::uint64_t> sizes;
  sizes.reserve(tensors.size());
  std::uint64_t offset = 0;
  for (TensorWrite const& t : tensors) {
    if (t.name == "__metadata__") throw bad("\"__metadata__\" cannot be a tensor name");
    if (!names.insert(t.name).second) throw bad("duplicate tensor name '", t.name, "'");
    std::int64_t numel = 0;
    std::uint64_t nbytes = 0, end = 0;
    if (!detail::checked_numel(t.shape, numel) ||
        !detail::mul_u64(static_cast<std::uint64_t>(numel), dtype_size(t.dtype), nbytes) ||
        !detail::add_u64(offset, nbytes, end))
      throw bad("tensor '", t.name, "' has an invalid shape ", detail::shape_string(t.shape));
    if (nbytes > 0 && t.data == nullptr)
      throw bad("tensor '", t.name, "' has ", nbytes, " bytes of data but a null data pointer");
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, end}}};
    sizes.push_back(nbytes);
    offset = end;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (nlohmann::json::exception const& e) {
    throw bad("cannot encode the header (names and metadata must be UTF-8): ", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  std::byte len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = static_cast<std::byte>((static_cast<std::uint64_t>(text.size()) >> (8 * i)) & 0xff);

  // ---- temp file in the same directory ----
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  detail::TempFileGuard tmp;
  int fd = -1;
  std::string tmp_name;
  for (int attempt = 0; attempt < 64 && fd < 0; ++attempt) {
    tmp_name = (dir / ("." + path.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                       std::to_string(detail::temp_counter().fetch_add(1))))
                   .string();
    fd = ::open(tmp_name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST && errno != EINTR) break;
  }
  if (fd < 0) {
    int const e = errno;
    throw bad("cannot create a temporary file in '", dir.string(), "': ", std::strerror(e));
  }
  tmp.path = tmp_name;
  tmp.fp = ::fdopen(fd, "wb");
  if (tmp.fp == nullptr) {
    int const e = errno;
    ::close(fd);
    throw bad("fdopen failed: ", std::strerror(e));
  }
  auto put = [&](void const* p, std::size_t n, std::string_view what) {
    if (n == 0) return;
    if (std::fwrite(p, 1, n, tmp.fp) != n) {
      int const e = errno;
      throw bad("write of ", what, " to '", tmp_name, "' failed: ", std::strerror(e));
    }
  };
  put(len, 8, "the header length");
  put(text.data(), text.size(), "the header");
  for (std::size_t i = 0; i < tensors.size(); ++i)
    put(tensors[i].data, static_cast<std::size_t>(sizes[i]), "tensor '" + tensors[i].name + "'");
  if (std::fflush(tmp.fp) != 0) {
    int const e = errno;
    throw bad("flush of '", tmp_name, "' failed: ", std::strerror(e));
  }
  if (::fsync(::fileno(tmp.fp)) != 0) {
    int const e = errno;
    throw bad("fsync of '", tmp_name, "' failed: ", std::strerror(e));
  }
  std::FILE* fp = std::exchange(tmp.fp, nullptr);
  if (std::fclose(fp) != 0) {
    int const e = errno;
    throw bad("close of '", tmp_name, "' failed: ", std::strerror(e));
  }
  std::error_code ec;
  std::filesystem::rename(tmp_name, path, ec);
  if (ec) throw bad("rename from '", tmp_name, "' failed: ", ec.message());
  tmp.path.clear();  // now the target: keep it
  // Make the rename itself durable (best effort).
  int const dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace mambabyte::io
