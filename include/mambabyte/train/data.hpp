/*! \file
 *  \brief Training data: a byte corpus (a memory-mapped file, or bytes in memory), a
 *         train/validation split, and a seeded window sampler.
 *
 *  The sampler is counter-based: the start of window `b` of step `s` is a hash of
 *  (seed, s, b), so its whole state is the step number. Resuming at step s therefore draws
 *  exactly the windows an uninterrupted run would have drawn, on any platform.
 */
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mambabyte/core/error.hpp"
#include "mambabyte/io/mapped_file.hpp"

namespace mambabyte::train {

/// Bytes to train or evaluate on: a read-only mapping of a file, or an owned buffer.
class ByteCorpus {
 public:
  ByteCorpus() = default;
  /// Map `path`; throws mambabyte::Error naming it when it is missing, unreadable or empty.
  static ByteCorpus from_file(std::filesystem::path const& path) {
    ByteCorpus c;
    c.map_ = std::make_shared<io::MappedFile>(path);
    auto const b = c.map_->bytes();
    require(!b.empty(), "data file '", path.string(), "' is empty");
    c.view_ = {reinterpret_cast<std::uint8_t const*>(b.data()), b.size()};
    c.name_ = path.string();
    return c;
  }
  static ByteCorpus from_bytes(std::vector<std::uint8_t> bytes, std::string name = "<memory>") {
    ByteCorpus c;
    c.owned_ = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
    c.view_ = {c.owned_->data(), c.owned_->size()};
    c.name_ = std::move(name);
    return c;
  }

  std::span<std::uint8_t const> bytes() const { return view_; }
  std::size_t size() const { return view_.size(); }
  std::string const& name() const { return name_; }

  /// [begin, end) of this corpus, sharing its storage.
  ByteCorpus slice(std::size_t begin, std::size_t end, std::string name) const {
    require(begin <= end && end <= view_.size(), "corpus slice [", begin, ", ", end, ") out of range");
    ByteCorpus c = *this;
    c.view_ = view_.subspan(begin, end - begin);
    c.name_ = std::move(name);
    return c;
  }

  /// The last `fraction` of the bytes as validation, the rest as training data.
  std::pair<ByteCorpus, ByteCorpus> split(double fraction) const {
    require(fraction > 0 && fraction < 1, "validation fraction must be in (0, 1), got ", fraction);
    std::size_t const n_val = static_cast<std::size_t>(static_cast<double>(size()) * fraction);
    require(n_val >= 2 && size() - n_val >= 2, "data '", name_, "' (", size(),
            " bytes) is too small to split into training and validation parts");
    return {slice(0, size() - n_val, name_ + " [train]"), slice(size() - n_val, size(), name_ + " [validation]")};
  }

 private:
  std::shared_ptr<io::MappedFile> map_;
  std::shared_ptr<std::vector<std::uint8_t>> owned_;
  std::span<std::uint8_t const> view_;
  std::string name_;
};

/// Reproducible random windows of `seq_len + 1` bytes (inputs + next-byte targets).
class WindowSampler {
 public:
  WindowSampler(std::uint64_t seed, int seq_len) : seed_(seed), seq_len_(seq_len) {
    require(seq_len >= 1, "sequence length must be >= 1, got ", seq_len);
  }

  int seq_len() const { return seq_len_; }
  std::uint64_t seed() const { return seed_; }

  /// Window start of sequence b at step `step`, uniform over [0, n_bytes - seq_len - 1].
  std::size_t start(std::uint64_t step, int b, std::size_t n_bytes) const {
    std::size_t const span = n_bytes - static_cast<std::size_t>(seq_len_);  // number of valid starts
    std::uint64_t h = mix(seed_ ^ mix(step * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(b) + 1));
    // multiply-shift range reduction (bias < span / 2^64: negligible)
    return static_cast<std::size_t>((static_cast<unsigned __int128>(h) * span) >> 64);
  }

  /// Fill tokens (batch x (seq_len + 1), row-major) with the windows of `step`.
  void fill(ByteCorpus const& corpus, std::uint64_t step, int batch, std::span<std::int32_t> tokens) const {
    std::size_t const n = corpus.size(), w = static_cast<std::size_t>(seq_len_) + 1;
    require(n >= w, "data '", corpus.name(), "' has ", n, " bytes, fewer than one training window of ", w,
            " (seq_len + 1): use a smaller --seq-len or more data");
    require(tokens.size() == static_cast<std::size_t>(batch) * w, "window sampler: token buffer has the wrong size");
    auto const bytes = corpus.bytes();
    for (int b = 0; b < batch; ++b) {
      std::size_t const s = start(step, b, n);
      for (std::size_t i = 0; i < w; ++i) tokens[static_cast<std::size_t>(b) * w + i] = bytes[s + i];
    }
  }

 private:
  static constexpr std::uint64_t mix(std::uint64_t z) noexcept {  // SplitMix64's finaliser
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  std::uint64_t seed_;
  int seq_len_;
};

}  // namespace mambabyte::train
