// `mambabyte ngram --data FILE [--val-fraction F | --val-data FILE] [--order N]`: the baseline
// the demo reports next to the model: an interpolated Witten-Bell byte n-gram model counted on
// the training part and scored (bits per byte) on the validation part, for orders 0..N.
//
// Witten-Bell: P(c | h) = (n(h,c) + t(h) * P(c | h')) / (n(h) + t(h)), with h' the context one
// byte shorter, n(h) the count of h, t(h) the number of distinct bytes seen after h, and the
// order -1 distribution uniform over 256 bytes. Unseen contexts fall through to h'.
#pragma once

#include <cmath>
#include <cstdio>
#include <iostream>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/common.hpp"
#include <mambabyte/train/data.hpp>

namespace mbcli {

struct NgramCliOptions {
  std::string data, val_data;
  double val_fraction = 0.05;
  int order = 5;
  bool json = false;
};

class ByteNgram {
 public:
  static constexpr int kMaxOrder = 6;
  explicit ByteNgram(int order) : order_(order), ctx_(static_cast<std::size_t>(order) + 1), next_(ctx_.size()) {}

  void fit(std::span<std::uint8_t const> text) {
    for (std::size_t i = 0; i < text.size(); ++i)
      for (int k = 0; k <= order_ && static_cast<std::size_t>(k) <= i; ++k) {
        std::uint64_t const h = key(text, i, k);
        Context& c = ctx_[static_cast<std::size_t>(k)][h];
        if (next_[static_cast<std::size_t>(k)][h | (std::uint64_t(text[i]) << 56)]++ == 0) ++c.distinct;
        ++c.total;
      }
  }

  /// Bits per byte of text[1..] (each byte predicted from up to `order` previous bytes of text).
  double bits_per_byte(std::span<std::uint8_t const> text, int order) const {
    double nll = 0;
    for (std::size_t i = 1; i < text.size(); ++i) nll -= std::log2(prob(text, i, order));
    return nll / static_cast<double>(text.size() - 1);
  }

 private:
  struct Context {
    std::uint64_t total = 0;
    std::uint32_t distinct = 0;
  };
  // the k <= 6 bytes before position i, 8 bits each, with k in bits 48..55 (bits 56..63 are
  // left for the predicted byte in next_'s keys)
  static std::uint64_t key(std::span<std::uint8_t const> t, std::size_t i, int k) {
    std::uint64_t h = static_cast<std::uint64_t>(k) << 48;
    for (int j = 1; j <= k; ++j) h |= static_cast<std::uint64_t>(t[i - static_cast<std::size_t>(j)]) << (8 * (j - 1));
    return h;
  }
  double prob(std::span<std::uint8_t const> t, std::size_t i, int order) const {
    double p = 1.0 / 256;
    for (int k = 0; k <= order && static_cast<std::size_t>(k) <= i; ++k) {
      std::uint64_t const h = key(t, i, k);
      auto it = ctx_[static_cast<std::size_t>(k)].find(h);
      if (it == ctx_[static_cast<std::size_t>(k)].end()) break;  // longer contexts are unseen too
      auto const& nx = next_[static_cast<std::size_t>(k)];
      auto jt = nx.find(h | (std::uint64_t(t[i]) << 56));
      double const count = jt == nx.end() ? 0.0 : static_cast<double>(jt->second);
      double const n = static_cast<double>(it->second.total), d = static_cast<double>(it->second.distinct);
      p = (count + d * p) / (n + d);
    }
    return p;
  }
  int order_;
  std::vector<std::unordered_map<std::uint64_t, Context>> ctx_;
  std::vector<std::unordered_map<std::uint64_t, std::uint32_t>> next_;
};

inline int run_ngram(NgramCliOptions const& o) {
  require(o.order >= 0 && o.order <= ByteNgram::kMaxOrder, "--order must be in [0, ", ByteNgram::kMaxOrder, "], got ", o.order);
  auto all = train::ByteCorpus::from_file(o.data);
  train::ByteCorpus tr = all, va;
  if (!o.val_data.empty()) {
    va = train::ByteCorpus::from_file(o.val_data);
  } else {
    auto [a, b] = all.split(o.val_fraction);
    tr = a;
    va = b;
  }
  require(va.size() >= 2, "validation text has fewer than 2 bytes");
  ByteNgram model(o.order);
  model.fit(tr.bytes());
  nlohmann::json rows = nlohmann::json::array();
  double best = INFINITY;
  int best_order = 0;
  std::printf("byte n-gram (interpolated Witten-Bell), trained on %zu bytes, scored on %zu bytes\n", tr.size(), va.size());
  for (int k = 0; k <= o.order; ++k) {
    double const bpb = model.bits_per_byte(va.bytes(), k);
    std::printf("  order %d: %.4f bits/byte\n", k, bpb);
    rows.push_back({{"order", k}, {"bits_per_byte", bpb}});
    if (bpb < best) { best = bpb; best_order = k; }
  }
  if (o.json)
    std::cout << nlohmann::json{{"best_bits_per_byte", best}, {"best_order", best_order}, {"orders", rows},
                                {"train_bytes", tr.size()}, {"val_bytes", va.size()}}.dump()
              << std::endl;
  return 0;
}

}  // namespace mbcli
