/*! \file
 *  \brief Element types: the runtime DType tag used by file formats and dispatch, the
 *         library-owned bf16 host type, and dtype_traits (storage type vs compute type).
 */
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/error.hpp"

namespace mambabyte {

/// Runtime element type, as named by safetensors ("F32", "BF16", ...).
enum class DType : std::uint8_t { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

inline constexpr std::size_t dtype_size(DType d) noexcept {
  switch (d) {
    case DType::kF64: case DType::kI64: return 8;
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: case DType::kI16: return 2;
    case DType::kI8: case DType::kU8: case DType::kBool: return 1;
  }
  return 0;
}

inline constexpr std::string_view dtype_name(DType d) noexcept {
  switch (d) {
    case DType::kF64: return "F64";
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI64: return "I64";
    case DType::kI32: return "I32";
    case DType::kI16: return "I16";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kBool: return "BOOL";
  }
  return "?";
}

/// Parse a safetensors dtype string; throws mambabyte::Error naming the bad string.
inline DType parse_dtype(std::string_view s) {
  for (DType d : {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64, DType::kI32,
                  DType::kI16, DType::kI8, DType::kU8, DType::kBool})
    if (dtype_name(d) == s) return d;
  fail("unknown dtype \"", s, "\"");
}

/// bfloat16 storage type usable on host and device (conversion rounds to nearest even).
struct alignas(2) bf16 {
  std::uint16_t bits = 0;
  bf16() = default;
  MAMBABYTE_HOST_DEVICE explicit bf16(float f) : bits(from_float(f)) {}
  MAMBABYTE_HOST_DEVICE explicit operator float() const { return to_float(bits); }

  MAMBABYTE_HOST_DEVICE static std::uint16_t from_float(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu))  // NaN stays a quiet NaN
      return static_cast<std::uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>(u >> 16);
  }
  MAMBABYTE_HOST_DEVICE static float to_float(std::uint16_t b) {
    std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

/// IEEE binary16 -> float (host only; used when reading F16 checkpoints).
inline float half_bits_to_float(std::uint16_t h) {
  std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// float -> IEEE binary16 bits, rounding to nearest even; overflow gives +-inf, NaN stays NaN.
inline std::uint16_t float_to_half_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  std::uint32_t const sign = (u >> 16) & 0x8000u;
  std::uint32_t const absu = u & 0x7fffffffu;
  if (absu >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u | (absu > 0x7f800000u ? 0x200u : 0u));
  if (absu >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (absu < 0x38800000u) {  // result is subnormal (or zero): value / 2^-24, rounded to even
    if (absu < 0x33000000u) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
    std::uint32_t const e = absu >> 23, mant = (absu & 0x7fffffu) | 0x800000u;
    int const shift = static_cast<int>(126 - e);  // value / 2^-24 = mant * 2^(e - 126)
    std::uint32_t const q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    std::uint32_t const r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t const v = absu - (112u << 23);  // rebias 127 -> 15
  std::uint32_t const q = v >> 13, rem = v & 0x1fffu;
  std::uint32_t const r = q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u);
  return static_cast<std::uint16_t>(sign | r);
}

/// Storage type vs compute type. Scan state and all reductions use compute_t.
template <class T> struct dtype_traits;
template <> struct dtype_traits<double> { using storage_t = double; using compute_t = double; static constexpr DType dtype = DType::kF64; };
template <> struct dtype_traits<float>  { using storage_t = float;  using compute_t = float;  static constexpr DType dtype = DType::kF32; };
template <> struct dtype_traits<bf16>   { using storage_t = bf16;   using compute_t = float;  static constexpr DType dtype = DType::kBF16; };

template <class T> using compute_t = typename dtype_traits<T>::compute_t;

}  // namespace mambabyte
