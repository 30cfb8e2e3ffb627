/*! \file
 *  \brief TensorFile: the in-memory view of a checkpoint (safetensors or PyTorch zip): named,
 *         typed, shaped byte ranges plus string metadata, keeping its backing storage (a file
 *         mapping and/or owned buffers) alive. convert_to() turns a float tensor of any stored
 *         precision into float/double; TensorWrite describes a tensor to write.
 */
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"

namespace mambabyte::io {

static_assert(
    std::endian::native == std::endian::little,
    "mambabyte::io reads little-endian checkpoint data in place: little-endian hosts only");

namespace detail {

/// a + b, or false on uint64 overflow.
inline bool add_u64(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  return !__builtin_add_overflow(a, b, &out);
}
/// a * b, or false on uint64 overflow.
inline bool mul_u64(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  return !__builtin_mul_overflow(a, b, &out);
}

/// Product of a shape (1 for a scalar) if every dim is >= 0 and the product fits in int64;
/// otherwise false.
inline bool checked_numel(std::span<const std::int64_t> shape, std::int64_t& out) noexcept {
  std::int64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, d, &n)) return false;
  }
  out = n;
  return true;
}

/// "[2, 3]" for messages.
inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// " in file 'x'" or "" when no file is known.
inline std::string in_file(std::string_view file) {
  if (file.empty()) return {};
  std::string s = " in file '";
  s.append(file);
  s += "'";
  return s;
}

}  // namespace detail

/// One tensor of a checkpoint: a view of bytes owned by its TensorFile (row-major, contiguous,
/// little-endian, possibly unaligned: read through memcpy or convert_to()).
struct TensorRecord {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;

  /// Number of elements (1 for a scalar, 0 if any dim is 0). Shapes are validated on load.
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
};

/// A loaded checkpoint. Copies share the backing storage; records stay valid as long as any
/// copy of the TensorFile lives.
class TensorFile {
 public:
  TensorFile() = default;

  /// Assemble a file view. `owners` keep the bytes the records point into alive. Throws
  /// mambabyte::Error (naming the file) on duplicate tensor names or a record whose byte count
  /// does not match its dtype and shape.
  TensorFile(std::filesystem::path path, std::vector<TensorRecord> tensors,
             std::map<std::string, std::string> metadata,
             std::vector<std::shared_ptr<const void>> owners)
      : path_(std::move(path)),
        tensors_(std::move(tensors)),
        metadata_(std::move(metadata)),
        owners_(std::move(owners)) {
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      TensorRecord const& r = tensors_[i];
      std::int64_t n = 0;
      require(detail::checked_numel(r.shape, n), "tensor '", r.name, "' in file '", path_.string(),
              "' has an invalid shape ", detail::shape_string(r.shape));
      std::uint64_t nbytes = 0;
      require(detail::mul_u64(static_cast<std::uint64_t>(n), dtype_size(r.dtype), nbytes) &&
                  nbytes == r.bytes.size(),
              "tensor '", r.name, "' in file '", path_.string(), "' has ", r.bytes.size(),
              " bytes but its shape ", detail::shape_string(r.shape), " and dtype ",
              dtype_name(r.dtype), " need ", n, " x ", dtype_size(r.dtype));
      require(index_.emplace(r.name, i).second, "duplicate tensor name '", r.name, "' in file '",
              path_.string(), "'");
    }
  }

  std::filesystem::path const& path() const noexcept { return path_; }
  /// Tensors in file order (safetensors: data offset order; PyTorch: state-dict order).
  std::vector<TensorRecord> const& tensors() const noexcept { return tensors_; }
  /// The tensor called `name`, or nullptr.
  TensorRecord const* find(std::string_view name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor called `name`; throws mambabyte::Error naming the file when it is absent.
  TensorRecord const& at(std::string_view name) const {
    TensorRecord const* r = find(name);
    if (r == nullptr) fail("tensor '", name, "' not found in file '", path_.string(), "'");
    return *r;
  }
  /// String metadata (safetensors "__metadata__"; empty for PyTorch files).
  std::map<std::string, std::string> const& metadata() const noexcept { return metadata_; }

 private:
  std::filesystem::path path_;
  std::vector<TensorRecord> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::shared_ptr<const void>> owners_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

/// Convert a floating-point tensor (F64, F32, F16 or BF16) to T (float or double), writing
/// exactly numel() values into `dst`. Throws mambabyte::Error naming the tensor (and
/// `file_for_messages` when given) on a size mismatch or a non-float dtype.
template <class T>
void convert_to(TensorRecord const& r, std::span<T> dst, std::string_view file_for_messages = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "convert_to: T must be float or double");
  std::int64_t n = 0;
  require(detail::checked_numel(r.shape, n), "tensor '", r.name, "'",
          detail::in_file(file_for_messages), " has an invalid shape ",
          detail::shape_string(r.shape));
  require(static_cast<std::uint64_t>(n) == dst.size(), "tensor '", r.name, "'",
          detail::in_file(file_for_messages), " has ", n, " elements (shape ",
          detail::shape_string(r.shape), ") but the destination holds ", dst.size());
  std::size_t const es = dtype_size(r.dtype);
  bool const is_float = r.dtype == DType::kF64 || r.dtype == DType::kF32 ||
                        r.dtype == DType::kF16 || r.dtype == DType::kBF16;
  require(is_float, "tensor '", r.name, "'", detail::in_file(file_for_messages), " has dtype ",
          dtype_name(r.dtype), ", which is not a floating-point type");
  require(r.bytes.size() / es == dst.size() && r.bytes.size() % es == 0, "tensor '", r.name, "'",
          detail::in_file(file_for_messages), " has ", r.bytes.size(), " bytes, expected ",
          dst.size(), " x ", es);
  std::byte const* src = r.bytes.data();
  std::size_t const count = dst.size();
  switch (r.dtype) {
    case DType::kF32:
      if constexpr (std::is_same_v<T, float>) {
        if (count) std::memcpy(dst.data(), src, count * 4);
      } else {
        for (std::size_t i = 0; i < count; ++i) {
          float v;
          std::memcpy(&v, src + i * 4, 4);
          dst[i] = static_cast<T>(v);
        }
      }
      break;
    case DType::kF64:
      if constexpr (std::is_same_v<T, double>) {
        if (count) std::memcpy(dst.data(), src, count * 8);
      } else {
        for (std::size_t i = 0; i < count; ++i) {
          double v;
          std::memcpy(&v, src + i * 8, 8);
          dst[i] = static_cast<T>(v);
        }
      }
      break;
    case DType::kF16:
      for (std::size_t i = 0; i < count; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + i * 2, 2);
        dst[i] = static_cast<T>(half_bits_to_float(h));
      }
      break;
    case DType::kBF16:
      for (std::size_t i = 0; i < count; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + i * 2, 2);
        dst[i] = static_cast<T>(bf16::to_float(h));
      }
      break;
    default:
      break;  // rejected above
  }
}

/// A tensor to write: `data` points to numel(shape) * dtype_size(dtype) contiguous row-major
/// bytes (may be null only when the tensor is empty).
struct TensorWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

}  // namespace mambabyte::io
