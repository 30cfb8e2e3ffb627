/*! \file
 *  \brief The synthetic noise of the MambaByte paper's robustness experiment (its Table 6),
 *         applied to text before scoring it. The paper gives the kinds but not byte-exact
 *         definitions; ours, seeded and reproducible, are:
 *
 *   drop:P        delete each character with probability P
 *   repeat:P      after each character, with probability P, insert 1-3 extra copies of it
 *   antspeak      upper-case every letter and put a space between all characters
 *                 ("hi you" -> "H I   Y O U")
 *   uppercase:P   upper-case each letter with probability P
 *   randomcase    give each letter a random case (upper or lower with probability 1/2)
 *   swap:P        with probability P, swap a character with the next one (a swapped pair is
 *                 not touched again)
 *
 *  "Character" means a UTF-8 code point: noise never splits a multi-byte character, so a
 *  noisy text is valid UTF-8 whenever the clean one is. Case changes touch ASCII letters only.
 */
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "mambabyte/core/error.hpp"
#include "mambabyte/decoding/sampling.hpp"  // Rng

namespace mambabyte {

struct Noise {
  enum class Kind { kNone, kDrop, kRepeat, kAntspeak, kUppercase, kRandomCase, kSwap };
  Kind kind = Kind::kNone;
  double p = 0;

  /// "drop:0.05", "antspeak", "swap" (P defaults to 0.05 where the kind takes one).
  static Noise parse(std::string_view spec) {
    std::string_view name = spec, prob;
    if (auto colon = spec.find(':'); colon != std::string_view::npos) {
      name = spec.substr(0, colon);
      prob = spec.substr(colon + 1);
    }
    Noise n;
    if (name == "none") n.kind = Kind::kNone;
    else if (name == "drop") n.kind = Kind::kDrop;
    else if (name == "repeat") n.kind = Kind::kRepeat;
    else if (name == "antspeak") n.kind = Kind::kAntspeak;
    else if (name == "uppercase") n.kind = Kind::kUppercase;
    else if (name == "randomcase") n.kind = Kind::kRandomCase;
    else if (name == "swap") n.kind = Kind::kSwap;
    else
      fail("unknown noise \"", std::string(name),
           "\": expected drop, repeat, antspeak, uppercase, randomcase or swap (with :P where it applies)");
    bool const takes_p = n.kind == Kind::kDrop || n.kind == Kind::kRepeat || n.kind == Kind::kUppercase ||
                         n.kind == Kind::kSwap;
    if (!prob.empty()) {
      require(takes_p, "noise \"", std::string(name), "\" takes no probability");
      std::string const s(prob);
      std::size_t used = 0;
      double v = 0;
      try {
        v = std::stod(s, &used);
      } catch (...) {
        used = 0;
      }
      require(used == s.size() && v >= 0 && v <= 1, "noise probability must be a number in [0, 1], got \"", s, "\"");
      n.p = v;
    } else {
      n.p = takes_p ? 0.05 : (n.kind == Kind::kRandomCase ? 0.5 : 0.0);
    }
    return n;
  }

  std::string name() const {
    switch (kind) {
      case Kind::kNone: return "none";
      case Kind::kDrop: return "drop:" + num(p);
      case Kind::kRepeat: return "repeat:" + num(p);
      case Kind::kAntspeak: return "antspeak";
      case Kind::kUppercase: return "uppercase:" + num(p);
      case Kind::kRandomCase: return "randomcase";
      case Kind::kSwap: return "swap:" + num(p);
    }
    return "?";
  }

 private:
  static std::string num(double v) {
    std::string s = std::to_string(v);
    while (s.size() > 1 && s.back() == '0') s.pop_back();
    if (!s.empty() && s.back() == '.') s.pop_back();
    return s;
  }
};

namespace detail {
/// Length of the UTF-8 character starting at s[i] (1 for a stray or invalid byte).
inline std::size_t utf8_char_len(std::string_view s, std::size_t i) {
  auto const c = static_cast<unsigned char>(s[i]);
  std::size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (i + n > s.size()) return 1;
  for (std::size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  return n;
}
inline char ascii_upper(char c) { return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 32) : c; }
inline char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; }
}  // namespace detail

/// Apply `noise` to `text` with a seeded, portable generator.
inline std::string apply_noise(std::string_view text, Noise const& noise, std::uint64_t seed) {
  using K = Noise::Kind;
  if (noise.kind == K::kNone) return std::string(text);
  Rng rng = Rng::stream(seed, 0x6e6f697365ull);  // "noise"
  // split into characters
  std::vector<std::string_view> ch;
  ch.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    std::size_t const n = detail::utf8_char_len(text, i);
    ch.push_back(text.substr(i, n));
    i += n;
  }
  std::string out;
  out.reserve(text.size() * (noise.kind == K::kAntspeak ? 2 : 1) + 16);
  switch (noise.kind) {
    case K::kDrop:
      for (auto c : ch)
        if (!(rng.uniform_double() < noise.p)) out += c;
      break;
    case K::kRepeat:
      for (auto c : ch) {
        out += c;
        if (rng.uniform_double() < noise.p) {
          int const extra = 1 + static_cast<int>(rng.next_u64() % 3);
          for (int k = 0; k < extra; ++k) out += c;
        }
      }
      break;
    case K::kAntspeak:
      for (std::size_t i = 0; i < ch.size(); ++i) {
        if (i) out += ' ';
        for (char b : ch[i]) out += detail::ascii_upper(b);
      }
      break;
    case K::kUppercase:
      for (auto c : ch) {
        bool const up = rng.uniform_double() < noise.p;
        for (char b : c) out += up ? detail::ascii_upper(b) : b;
      }
      break;
    case K::kRandomCase:
      for (auto c : ch) {
        bool const up = rng.uniform_double() < 0.5;
        for (char b : c) out += up ? detail::ascii_upper(b) : detail::ascii_lower(b);
      }
      break;
    case K::kSwap:
      for (std::size_t i = 0; i < ch.size(); ++i) {
        if (i + 1 < ch.size() && rng.uniform_double() < noise.p) {
          out += ch[i + 1];
          out += ch[i];
          ++i;
        } else {
          out += ch[i];
        }
      }
      break;
    case K::kNone: break;
  }
  return out;
}

}  // namespace mambabyte
