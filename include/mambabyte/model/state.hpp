/*! \file
 *  \brief InferenceState: the recurrent state of a batch of sequences, constant in the length
 *         of the text. Per layer and sequence: the conv window (d_conv-1, d_inner), oldest input
 *         first, and the SSM state (d_inner, d_state). One allocation; snapshot/restore copy it.
 */
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mambabyte/core/aligned.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/model/config.hpp"

namespace mambabyte {

template <class T>
class InferenceState {
 public:
  InferenceState() = default;
  InferenceState(ModelConfig const& c, int batch)
      : batch_(batch), n_layer_(c.n_layer), d_inner_(c.d_inner()), d_state_(c.d_state), d_conv_(c.d_conv) {
    require(batch > 0, "inference state: batch must be positive (got ", batch, ")");
    data_.assign(static_cast<std::size_t>(n_layer_) * batch_ * (conv_per_seq() + ssm_per_seq()), T(0));
  }

  int batch() const { return batch_; }
  int n_layer() const { return n_layer_; }
  std::size_t conv_per_seq() const { return static_cast<std::size_t>(d_conv_ - 1) * d_inner_; }
  std::size_t ssm_per_seq() const { return static_cast<std::size_t>(d_inner_) * d_state_; }

  /// (batch, d_conv-1, d_inner) of layer l
  T* conv(int l) { return data_.data() + static_cast<std::size_t>(l) * batch_ * conv_per_seq(); }
  T const* conv(int l) const { return data_.data() + static_cast<std::size_t>(l) * batch_ * conv_per_seq(); }
  /// (batch, d_inner, d_state) of layer l
  T* ssm(int l) { return ssm_base() + static_cast<std::size_t>(l) * batch_ * ssm_per_seq(); }
  T const* ssm(int l) const { return data_.data() + static_cast<std::size_t>(n_layer_) * batch_ * conv_per_seq() + static_cast<std::size_t>(l) * batch_ * ssm_per_seq(); }

  void reset() { std::fill(data_.begin(), data_.end(), T(0)); }
  /// A copy to restore later (rollback for speculative decoding, prompt caching).
  InferenceState snapshot() const { return *this; }
  void restore(InferenceState const& s) {
    require(s.batch_ == batch_ && s.data_.size() == data_.size(),
            "inference state: restore from a snapshot of a different shape");
    std::copy(s.data_.begin(), s.data_.end(), data_.begin());
  }
  /// Copy sequence `from` of `src` into sequence `to` of this state (same model).
  void copy_sequence(int to, InferenceState const& src, int from) {
    require(src.n_layer_ == n_layer_ && src.conv_per_seq() == conv_per_seq() && src.ssm_per_seq() == ssm_per_seq(),
            "inference state: copy_sequence between states of different models");
    require(to >= 0 && to < batch_ && from >= 0 && from < src.batch_, "inference state: sequence index out of range");
    for (int l = 0; l < n_layer_; ++l) {
      std::copy_n(src.conv(l) + from * conv_per_seq(), conv_per_seq(), conv(l) + to * conv_per_seq());
      std::copy_n(src.ssm(l) + from * ssm_per_seq(), ssm_per_seq(), ssm(l) + to * ssm_per_seq());
    }
  }
  std::size_t bytes() const { return data_.size() * sizeof(T); }
  aligned_vector<T> const& data() const { return data_; }

 private:
  T* ssm_base() { return data_.data() + static_cast<std::size_t>(n_layer_) * batch_ * conv_per_seq(); }
  int batch_ = 0, n_layer_ = 0, d_inner_ = 0, d_state_ = 0, d_conv_ = 1;
  aligned_vector<T> data_;
};

}  // namespace mambabyte
