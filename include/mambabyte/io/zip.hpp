/*! \file
 *  \brief Minimal read-only ZIP archive reader over a byte span (what torch.save writes):
 *         End Of Central Directory search, ZIP64 records and extra fields, stored (method 0)
 *         entries only, every offset and size checked against the buffer, CRC-32 verified
 *         when an entry is read. Also a table-driven CRC-32 (slicing-by-8).
 */
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mambabyte/core/error.hpp"

namespace mambabyte::io {

namespace detail {

using Crc32Tables = std::array<std::array<std::uint32_t, 256>, 8>;

/// Tables for the reflected CRC-32 polynomial 0xEDB88320; table k advances k extra zero bytes.
constexpr Crc32Tables make_crc32_tables() {
  Crc32Tables t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0xEDB88320u : (c >> 1);
    t[0][i] = c;
  }
  for (std::size_t k = 1; k < 8; ++k)
    for (std::size_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xffu];
  return t;
}

inline constexpr Crc32Tables kCrc32Tables = make_crc32_tables();

}  // namespace detail

/// Update a running CRC-32 (ZIP/zlib flavour). Start with crc = 0.
inline std::uint32_t crc32_update(std::uint32_t crc, std::span<const std::byte> data) noexcept {
  auto const& t = detail::kCrc32Tables;
  std::uint32_t c = ~crc;
  std::byte const* p = data.data();
  std::size_t n = data.size();
  while (n >= 8) {
    std::uint32_t const lo =
        c ^ (static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
             static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24);
    c = t[7][lo & 0xffu] ^ t[6][(lo >> 8) & 0xffu] ^ t[5][(lo >> 16) & 0xffu] ^ t[4][lo >> 24] ^
        t[3][static_cast<std::uint32_t>(p[4])] ^ t[2][static_cast<std::uint32_t>(p[5])] ^
        t[1][static_cast<std::uint32_t>(p[6])] ^ t[0][static_cast<std::uint32_t>(p[7])];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ static_cast<std::uint32_t>(*p++)) & 0xffu];
  return ~c;
}

/// CRC-32 of a whole buffer.
inline std::uint32_t crc32(std::span<const std::byte> data) noexcept {
  return crc32_update(0, data);
}

/// One central-directory entry.
struct ZipEntry {
  std::string name;
  std::uint16_t flags = 0;
  std::uint16_t method = 0;
  std::uint32_t crc = 0;
  std::uint64_t compressed_size = 0;
  std::uint64_t uncompressed_size = 0;
  std::uint64_t local_header_offset = 0;
};

/// A ZIP archive held in memory (typically a MappedFile). The archive's bytes must outlive
/// the reader and the spans it returns. All parsing errors throw mambabyte::Error naming
/// `name_for_messages` (the file).
class ZipReader {
 public:
  ZipReader(std::span<const std::byte> data, std::string name_for_messages)
      : data_(data), file_(std::move(name_for_messages)) {
    parse();
  }

  std::string const& file() const noexcept { return file_; }
  std::vector<ZipEntry> const& entries() const noexcept { return entries_; }

  /// Entry names in central-directory order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (ZipEntry const& e : entries_) out.push_back(e.name);
    return out;
  }

  /// The central-directory record of `name`, or nullptr.
  ZipEntry const* find(std::string_view name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &entries_[it->second];
  }

  /// The stored bytes of entry `name` (std::nullopt if there is no such entry). Throws
  /// mambabyte::Error if the entry is compressed or encrypted, its local header or data lie
  /// outside the archive, or (when verify_crc) its CRC-32 does not match.
  std::optional<std::span<const std::byte>> entry(std::string_view name,
                                                  bool verify_crc = true) const {
    ZipEntry const* e = find(name);
    if (e == nullptr) return std::nullopt;
    return read(*e, verify_crc);
  }

 private:
  template <class... A>
  [[noreturn]] void bad(A&&... a) const {
    fail("zip archive '", file_, "': ", std::forward<A>(a)...);
  }

  /// Bounds-checked little-endian read of n <= 8 bytes at offset `at`.
  std::uint64_t le(std::uint64_t at, std::size_t n, char const* what) const {
    if (at > data_.size() || n > data_.size() - at)
      bad(what, " at offset ", at, " lies beyond the end of the archive (", data_.size(),
          " bytes; truncated?)");
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i)
      v |= static_cast<std::uint64_t>(data_[static_cast<std::size_t>(at) + i]) << (8 * i);
    return v;
  }

  bool has(std::uint64_t at, std::uint64_t n) const noexcept {
    return at <= data_.size() && n <= data_.size() - at;
  }

  void parse() {
    constexpr std::uint64_t kEocdSize = 22;
    std::uint64_t const size = data_.size();
    if (size < kEocdSize) bad("file is too short (", size, " bytes) to be a zip archive");

    // ---- End Of Central Directory: search backwards over at most 64 KiB of comment ----
    std::uint64_t const lowest = size - kEocdSize > 0xffff ? size - kEocdSize - 0xffff : 0;
    std::optional<std::uint64_t> eocd;
    for (std::uint64_t at = size - kEocdSize + 1; at-- > lowest;) {
      if (le(at, 4, "end of central directory") != 0x06054b50u) continue;
      std::uint64_t const comment = le(at + 20, 2, "end of central directory");
      if (at + kEocdSize + comment <= size) {
        eocd = at;
        break;
      }
    }
    if (!eocd) bad("no end-of-central-directory record found (not a zip file, or truncated)");
    std::uint64_t const e = *eocd;
    std::uint64_t disk = le(e + 4, 2, "EOCD"), cd_disk = le(e + 6, 2, "EOCD");
    std::uint64_t n_disk = le(e + 8, 2, "EOCD"), n_total = le(e + 10, 2, "EOCD");
    std::uint64_t cd_size = le(e + 12, 4, "EOCD"), cd_offset = le(e + 16, 4, "EOCD");

    // ---- ZIP64: locator right before the EOCD, pointing at the ZIP64 EOCD record ----
    bool const zip64_marked =
        n_disk == 0xffff || n_total == 0xffff || cd_size == 0xffffffffu || cd_offset == 0xffffffffu;
    if (e >= 20 && le(e - 20, 4, "ZIP64 locator") == 0x07064b50u) {
      std::uint64_t const rec = le(e - 20 + 8, 8, "ZIP64 locator");
      if (!has(rec, 56) || rec + 56 > e - 20)
        bad("ZIP64 end-of-central-directory offset ", rec, " is out of range");
      if (le(rec, 4, "ZIP64 EOCD") != 0x06064b50u)
        bad("no ZIP64 end-of-central-directory record at offset ", rec);
      disk = le(rec + 16, 4, "ZIP64 EOCD");
      cd_disk = le(rec + 20, 4, "ZIP64 EOCD");
      n_disk = le(rec + 24, 8, "ZIP64 EOCD");
      n_total = le(rec + 32, 8, "ZIP64 EOCD");
      cd_size = le(rec + 40, 8, "ZIP64 EOCD");
      cd_offset = le(rec + 48, 8, "ZIP64 EOCD");
    } else if (zip64_marked) {
      bad("the end-of-central-directory record needs ZIP64 but no ZIP64 locator is present");
    }
    if (disk != 0 || cd_disk != 0 || n_disk != n_total)
      bad("multi-disk (split) archives are not supported");
    if (!has(cd_offset, cd_size) || cd_offset + cd_size > e)
      bad("central directory [", cd_offset, ", +", cd_size, ") lies outside the archive (", size,
          " bytes)");
    constexpr std::uint64_t kCdFixed = 46;
    if (n_total > cd_size / kCdFixed)
      bad("central directory claims ", n_total, " entries but has only ", cd_size, " bytes");

    // ---- central directory ----
    entries_.reserve(static_cast<std::size_t>(n_total));
    std::uint64_t const cd_end = cd_offset + cd_size;
    std::uint64_t at = cd_offset;
    for (std::uint64_t i = 0; i < n_total; ++i) {
      if (cd_end - at < kCdFixed)
        bad("central directory entry ", i, " at offset ", at, " is truncated");
      if (le(at, 4, "central directory entry") != 0x02014b50u)
        bad("bad central directory signature for entry ", i, " at offset ", at);
      ZipEntry z;
      z.flags = static_cast<std::uint16_t>(le(at + 8, 2, "central directory entry"));
      z.method = static_cast<std::uint16_t>(le(at + 10, 2, "central directory entry"));
      z.crc = static_cast<std::uint32_t>(le(at + 16, 4, "central directory entry"));
      z.compressed_size = le(at + 20, 4, "central directory entry");
      z.uncompressed_size = le(at + 24, 4, "central directory entry");
      std::uint64_t const name_len = le(at + 28, 2, "central directory entry");
      std::uint64_t const extra_len = le(at + 30, 2, "central directory entry");
      std::uint64_t const comment_len = le(at + 32, 2, "central directory entry");
      std::uint64_t const disk_start = le(at + 34, 2, "central directory entry");
      z.local_header_offset = le(at + 42, 4, "central directory entry");
      std::uint64_t const var = name_len + extra_len + comment_len;
      if (cd_end - at - kCdFixed < var)
        bad("central directory entry ", i, " at offset ", at, " overruns the directory");
      std::uint64_t const name_at = at + kCdFixed;
      z.name.assign(reinterpret_cast<char const*>(data_.data() + name_at),
                    static_cast<std::size_t>(name_len));

      // ZIP64 extended information: present fields follow the order of the 0xFFFF.. markers.
      bool const need_u = z.uncompressed_size == 0xffffffffu;
      bool const need_c = z.compressed_size == 0xffffffffu;
      bool const need_o = z.local_header_offset == 0xffffffffu;
      if (need_u || need_c || need_o || disk_start == 0xffff) {
        std::uint64_t x = name_at + name_len, x_end = x + extra_len;
        bool found = false;
        while (x_end - x >= 4) {
          std::uint64_t const id = le(x, 2, "extra field"), len = le(x + 2, 2, "extra field");
          if (x_end - x - 4 < len) bad("extra field of entry '", z.name, "' is truncated");
          if (id == 0x0001) {
            std::uint64_t f = x + 4, f_end = x + 4 + len;
            auto take = [&](std::uint64_t& v) {
              if (f_end - f < 8) bad("ZIP64 extra field of entry '", z.name, "' is too short");
              v = le(f, 8, "ZIP64 extra field");
              f += 8;
            };
            if (need_u) take(z.uncompressed_size);
            if (need_c) take(z.compressed_size);
            if (need_o) take(z.local_header_offset);
            found = true;
            break;
          }
          x += 4 + len;
        }
        if (!found && (need_u || need_c || need_o))
          bad("entry '", z.name, "' needs a ZIP64 extra field but has none");
      }
      if (disk_start != 0 && disk_start != 0xffff)
        bad("entry '", z.name, "' starts on disk ", disk_start, " (split archive)");
      if (!index_.emplace(z.name, entries_.size()).second)
        bad("duplicate entry name '", z.name, "'");
      entries_.push_back(std::move(z));
      at += kCdFixed + var;
    }
  }

  std::span<const std::byte> read(ZipEntry const& z, bool verify_crc) const {
    if (z.flags & 0x1u) bad("entry '", z.name, "' is encrypted, which is not supported");
    if (z.method != 0)
      bad("entry '", z.name, "' is compressed (method ", z.method,
          ") and not supported: only stored (method 0) entries can be read");
    if (z.compressed_size != z.uncompressed_size)
      bad("stored entry '", z.name, "' has compressed size ", z.compressed_size,
          " != uncompressed size ", z.uncompressed_size);
    constexpr std::uint64_t kLocalFixed = 30;
    std::uint64_t const h = z.local_header_offset;
    if (!has(h, kLocalFixed))
      bad("local header of entry '", z.name, "' at offset ", h, " lies outside the archive");
    if (le(h, 4, "local header") != 0x04034b50u)
      bad("bad local header signature for entry '", z.name, "' at offset ", h);
    std::uint64_t const name_len = le(h + 26, 2, "local header");
    std::uint64_t const extra_len = le(h + 28, 2, "local header");
    std::uint64_t const start = h + kLocalFixed + name_len + extra_len;
    if (!has(h + kLocalFixed, name_len) ||
        std::string_view(reinterpret_cast<char const*>(data_.data() + h + kLocalFixed),
                         static_cast<std::size_t>(name_len)) != z.name)
      bad("local header name of entry '", z.name, "' at offset ", h,
          " does not match the central directory");
    if (!has(start, z.compressed_size))
      bad("data of entry '", z.name, "' [", start, ", +", z.compressed_size,
          ") lies outside the archive (", data_.size(), " bytes; truncated?)");
    auto const out =
        data_.subspan(static_cast<std::size_t>(start), static_cast<std::size_t>(z.compressed_size));
    if (verify_crc) {
      std::uint32_t const c = crc32(out);
      if (c != z.crc) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "computed 0x%08x, expected 0x%08x", c, z.crc);
        bad("CRC-32 mismatch in entry '", z.name, "' (", buf, "): the archive is corrupt");
      }
    }
    return out;
  }

  std::span<const std::byte> data_;
  std::string file_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

}  // namespace mambabyte::io
