/*! \file
 *  \brief PyTorch checkpoint reader (torch.save zip format, torch >= 1.6) without Python:
 *         mmap the zip, run the restricted pickle VM on <archive>/data.pkl, resolve storages
 *         to <archive>/data/<key> entries. Contiguous tensors point into the mapping (zero
 *         copy); non-contiguous views are gathered into owned contiguous buffers. Also
 *         read_tensor_file(), which picks the reader (PyTorch zip or safetensors) by content.
 */
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/io/mapped_file.hpp"
#include "mambabyte/io/pickle.hpp"
#include "mambabyte/io/safetensors.hpp"
#include "mambabyte/io/tensor_file.hpp"
#include "mambabyte/io/zip.hpp"

namespace mambabyte::io {

namespace detail {

/// Pre-1.6 torch.save files begin with a protocol-2 pickle of the magic number
/// 0x1950a86a20f9469cfc6c: PROTO 2, LONG1 of 10 bytes.
inline bool is_legacy_torch(std::span<const std::byte> b) noexcept {
  static constexpr std::array<unsigned char, 14> kMagic = {
      0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  return b.size() >= kMagic.size() && std::memcmp(b.data(), kMagic.data(), kMagic.size()) == 0;
}

/// A ZIP local file header signature "PK\x03\x04" at the start.
inline bool is_zip(std::span<const std::byte> b) noexcept {
  return b.size() >= 4 && std::memcmp(b.data(), "PK\x03\x04", 4) == 0;
}

inline TensorFile read_pytorch_mapped(std::shared_ptr<MappedFile> map) {
  std::string const file = map->path().string();
  auto bad = [&file](auto&&... args) -> Error {
    return Error(mambabyte::detail::concat("PyTorch file '", file, "': ", args...));
  };
  std::span<const std::byte> const all = map->bytes();
  if (is_legacy_torch(all))
    throw bad("legacy torch.save format (pre-1.6) is not supported; re-save it with torch>=1.6");

  ZipReader const zip(all, file);

  // ---- the pickle: exactly one "<archive>/data.pkl" at the top level ----
  std::string pkl_name, prefix;
  for (ZipEntry const& e : zip.entries()) {
    std::size_t const slash = e.name.find('/');
    if (slash == 0 || slash == std::string::npos) continue;
    if (std::string_view(e.name).substr(slash) != "/data.pkl") continue;
    if (!pkl_name.empty())
      throw bad("several pickles ('", pkl_name, "', '", e.name, "'): ambiguous archive");
    pkl_name = e.name;
    prefix = e.name.substr(0, slash);
  }
  if (pkl_name.empty()) throw bad("no '<archive>/data.pkl' entry: not a torch.save checkpoint");
  if (auto bo = zip.entry(prefix + "/byteorder")) {
    std::string_view const s(reinterpret_cast<char const*>(bo->data()), bo->size());
    if (s != "little") throw bad("byte order '", s, "' is not supported (only little-endian)");
  }

  pickle::Unpickler const up(*zip.entry(pkl_name), file + ":" + pkl_name);
  pickle::Dict const* dict = up.root().dict();
  if (dict == nullptr)
    throw bad("the pickled object is a ", up.root().kind_name(), ", not a dict of tensors");
  for (char const* key : {"state_dict", "model"}) {
    pickle::Value const* inner = dict->find(std::string(key));
    if (inner != nullptr && inner->dict() != nullptr) {
      dict = inner->dict();
      break;
    }
  }

  // ---- storages (verified once per key) and tensors ----
  std::map<std::string, std::span<const std::byte>> storages;
  auto storage_bytes = [&](pickle::StorageRef const& s,
                           std::string const& tensor) -> std::span<const std::byte> {
    auto it = storages.find(s.key);
    if (it == storages.end()) {
      std::string const entry = prefix + "/data/" + s.key;
      auto bytes = zip.entry(entry);
      if (!bytes)
        throw bad("tensor '", tensor, "': storage entry '", entry, "' is missing from the archive");
      it = storages.emplace(s.key, *bytes).first;
    }
    std::uint64_t need = 0;
    if (!mul_u64(static_cast<std::uint64_t>(s.numel), dtype_size(s.dtype), need) ||
        need != it->second.size())
      throw bad("tensor '", tensor, "': storage '", s.key, "' has ", it->second.size(),
                " bytes but the pickle declares ", s.numel, " x ", dtype_name(s.dtype));
    return it->second;
  };

  std::uint64_t copy_budget = 2 * static_cast<std::uint64_t>(all.size()) + (1ull << 30);
  std::vector<TensorRecord> records;
  std::vector<std::shared_ptr<const void>> owners{std::shared_ptr<const void>(map)};

  for (auto const& [k, v] : dict->items) {
    pickle::Tensor const* t = v.tensor();
    if (t == nullptr) continue;  // ints, strings, nested dicts... are not tensors
    std::string const* name = k.string();
    if (name == nullptr) throw bad("a tensor is stored under a non-string key");
    pickle::StorageRef const& s = *t->storage;
    std::span<const std::byte> const st = storage_bytes(s, *name);
    std::size_t const es = dtype_size(s.dtype);
    std::string const shape_s = shape_string(t->shape);

    std::int64_t numel = 0;
    std::uint64_t nbytes = 0;
    if (!checked_numel(t->shape, numel) || !mul_u64(static_cast<std::uint64_t>(numel), es, nbytes))
      throw bad("tensor '", *name, "': size ", shape_s, " overflows");
    auto const offset = static_cast<std::uint64_t>(t->storage_offset);
    auto const storage_numel = static_cast<std::uint64_t>(s.numel);
    if (offset > storage_numel)
      throw bad("tensor '", *name, "': storage offset ", offset, " is beyond storage '", s.key,
                "' of ", storage_numel, " elements");

    TensorRecord rec;
    rec.name = *name;
    rec.dtype = s.dtype;
    rec.shape = t->shape;
    if (numel == 0) {
      rec.bytes = st.subspan(0, 0);
      records.push_back(std::move(rec));
      continue;
    }
    // Last element reached: offset + sum((size_i - 1) * stride_i); must be inside the storage.
    std::uint64_t last = offset;
    bool ok = true;
    for (std::size_t i = 0; i < t->shape.size() && ok; ++i) {
      std::uint64_t step = 0;
      ok = mul_u64(static_cast<std::uint64_t>(t->shape[i] - 1),
                   static_cast<std::uint64_t>(t->stride[i]), step) &&
           add_u64(last, step, last);
    }
    if (!ok || last >= storage_numel)
      throw bad("tensor '", *name, "': size ", shape_s, ", stride ", shape_string(t->stride),
                " and offset ", offset, " reach beyond storage '", s.key, "' of ", storage_numel,
                " elements");

    bool contiguous = true;
    std::uint64_t expect = 1;
    for (std::size_t i = t->shape.size(); i-- > 0;) {
      if (t->shape[i] != 1 && static_cast<std::uint64_t>(t->stride[i]) != expect) {
        contiguous = false;
        break;
      }
      expect *= static_cast<std::uint64_t>(t->shape[i]);  // <= numel: no overflow
    }
    if (contiguous) {
      rec.bytes =
          st.subspan(static_cast<std::size_t>(offset * es), static_cast<std::size_t>(nbytes));
    } else {
      if (nbytes > copy_budget)
        throw bad("tensor '", *name, "': a non-contiguous view of size ", shape_s,
                  " would need a copy of ", nbytes, " bytes, beyond the loader's limit");
      copy_budget -= nbytes;
      auto buf = std::make_shared<std::vector<std::byte>>(static_cast<std::size_t>(nbytes));
      std::size_t const nd = t->shape.size();
      std::vector<std::int64_t> idx(nd, 0);
      std::size_t const inner = nd - 1;  // nd >= 1: a scalar is always contiguous
      auto const inner_n = static_cast<std::size_t>(t->shape[inner]);
      auto const inner_stride = static_cast<std::size_t>(t->stride[inner]);
      std::byte* out = buf->data();
      std::byte const* base = st.data() + offset * es;
      for (;;) {
        std::size_t src = 0;  // element index relative to the offset (bounded by `last`)
        for (std::size_t i = 0; i < inner; ++i)
          src += static_cast<std::size_t>(idx[i]) * static_cast<std::size_t>(t->stride[i]);
        for (std::size_t j = 0; j < inner_n; ++j, out += es)
          std::memcpy(out, base + (src + j * inner_stride) * es, es);
        bool done = true;
        for (std::size_t d = inner; d-- > 0;) {
          if (++idx[d] < t->shape[d]) {
            done = false;
            break;
          }
          idx[d] = 0;
        }
        if (done) break;
      }
      rec.bytes = std::span<const std::byte>(buf->data(), buf->size());
      owners.push_back(std::shared_ptr<const void>(std::move(buf)));
    }
    records.push_back(std::move(rec));
  }
  std::filesystem::path p = map->path();
  return TensorFile(std::move(p), std::move(records), {}, std::move(owners));
}

}  // namespace detail

/// Read a torch.save() checkpoint (zip format). The pickled object must be a dict of tensors,
/// or a dict holding one under "state_dict" or "model"; non-tensor values are skipped; tensor
/// order is the dict's insertion order. Throws mambabyte::Error naming the file on anything
/// malformed or unsupported (legacy format, compressed entries, other globals, ...).
inline TensorFile read_pytorch_bin(std::filesystem::path const& path) {
  return detail::read_pytorch_mapped(std::make_shared<MappedFile>(path));
}

/// Read a checkpoint of either format, chosen by content: a ZIP (or legacy torch pickle) is
/// read as a PyTorch file, anything else as safetensors.
inline TensorFile read_tensor_file(std::filesystem::path const& path) {
  auto map = std::make_shared<MappedFile>(path);
  if (detail::is_zip(map->bytes()) || detail::is_legacy_torch(map->bytes()))
    return detail::read_pytorch_mapped(std::move(map));
  return detail::read_safetensors_mapped(std::move(map));
}

}  // namespace mambabyte::io
