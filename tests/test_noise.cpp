// The synthetic noise of the robustness experiment: each kind does what decoding/noise.hpp
// says, is reproducible from its seed, never splits a UTF-8 character, and bad specs are errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>

#include "mambabyte/decoding/noise.hpp"

using namespace mambabyte;

namespace {
std::string const kText =
    "It was the best of times, it was the worst of times; caf\xC3\xA9 na\xC3\xAFve \xE2\x82\xAC 42! "
    "The quick brown fox jumps over the lazy dog.";

std::size_t count_chars(std::string const& s) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < s.size(); i += detail::utf8_char_len(s, i)) ++n;
  return n;
}
bool valid_utf8(std::string const& s) {
  for (std::size_t i = 0; i < s.size();) {
    auto const c = static_cast<unsigned char>(s[i]);
    std::size_t const n = detail::utf8_char_len(s, i);
    if (n == 1 && c >= 0x80) return false;
    i += n;
  }
  return true;
}
std::string upper(std::string s) {
  for (auto& c : s) c = detail::ascii_upper(c);
  return s;
}
std::string lower(std::string s) {
  for (auto& c : s) c = detail::ascii_lower(c);
  return s;
}
}  // namespace

TEST_CASE("noise specs parse and print", "[noise]") {
  CHECK(Noise::parse("drop:0.3").kind == Noise::Kind::kDrop);
  CHECK(Noise::parse("drop:0.3").p == 0.3);
  CHECK(Noise::parse("swap").p == 0.05);
  CHECK(Noise::parse("antspeak").name() == "antspeak");
  CHECK(Noise::parse("repeat:0.25").name() == "repeat:0.25");
  CHECK_THROWS_WITH(Noise::parse("shout"), Catch::Contains("unknown noise"));
  CHECK_THROWS_WITH(Noise::parse("drop:1.5"), Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(Noise::parse("drop:abc"), Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(Noise::parse("drop:0.1x"), Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(Noise::parse("antspeak:0.2"), Catch::Contains("takes no probability"));
}

TEST_CASE("each noise kind does what it says", "[noise]") {
  std::size_t const n = count_chars(kText);
  SECTION("p = 0 changes nothing; p = 1 drops / upper-cases everything") {
    for (char const* k : {"drop:0", "repeat:0", "uppercase:0", "swap:0"}) CHECK(apply_noise(kText, Noise::parse(k), 1) == kText);
    CHECK(apply_noise(kText, Noise::parse("drop:1"), 1).empty());
    CHECK(apply_noise(kText, Noise::parse("uppercase:1"), 1) == upper(kText));
  }
  SECTION("drop removes about p of the characters, keeping order") {
    auto const out = apply_noise(kText, Noise::parse("drop:0.3"), 7);
    double const kept = double(count_chars(out)) / double(n);
    CHECK(kept > 0.5);
    CHECK(kept < 0.9);
    // a subsequence of the original
    std::size_t j = 0;
    for (char c : out) {
      while (j < kText.size() && kText[j] != c) ++j;
      REQUIRE(j < kText.size());
      ++j;
    }
  }
  SECTION("repeat only duplicates characters in place") {
    auto const out = apply_noise(kText, Noise::parse("repeat:0.3"), 3);
    CHECK(out.size() > kText.size());
    // removing consecutive duplicates of both gives the same text
    auto squeeze = [](std::string s) { s.erase(std::unique(s.begin(), s.end()), s.end()); return s; };
    CHECK(squeeze(out) == squeeze(kText));
  }
  SECTION("antspeak: upper case, spaces between all characters") {
    CHECK(apply_noise("hi you", Noise::parse("antspeak"), 0) == "H I   Y O U");
    auto const out = apply_noise(kText, Noise::parse("antspeak"), 0);
    CHECK(count_chars(out) == 2 * n - 1);
  }
  SECTION("case noise changes only case") {
    for (char const* k : {"uppercase:0.3", "randomcase"}) {
      auto const out = apply_noise(kText, Noise::parse(k), 5);
      CHECK(out != kText);
      CHECK(lower(out) == lower(kText));
    }
  }
  SECTION("swap exchanges neighbours, a permutation of the characters") {
    auto const out = apply_noise(kText, Noise::parse("swap:0.3"), 9);
    CHECK(out != kText);
    CHECK(out.size() == kText.size());
    std::string a = out, b = kText;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    CHECK(a == b);
  }
}

TEST_CASE("noise is seeded and keeps UTF-8 valid", "[noise]") {
  for (char const* k : {"drop:0.3", "repeat:0.3", "antspeak", "uppercase:0.3", "randomcase", "swap:0.5"}) {
    INFO(k);
    Noise const z = Noise::parse(k);
    auto const a = apply_noise(kText, z, 11), b = apply_noise(kText, z, 11);
    CHECK(a == b);
    CHECK(valid_utf8(a));
    if (z.kind != Noise::Kind::kAntspeak) CHECK(apply_noise(kText, z, 12) != a);
  }
}
