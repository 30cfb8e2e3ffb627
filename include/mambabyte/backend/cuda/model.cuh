/*! \file
 *  \brief A Mamba language model on one GPU: device weights (fp32 master + a compute copy in
 *         the storage type S), and cuda::Model<S, ScanPolicy>, which runs the training step
 *         (forward keeping what the backward needs, mean next-byte cross-entropy, backward
 *         accumulating every parameter's fp32 gradient), the stateful forward used for
 *         evaluation and prefill, and the single-token decode step (captured in a CUDA graph;
 *         length-1 inference runs the fused kernels of decode.cuh: 3-4 per layer, chained with
 *         programmatic dependent launch on sm_90+, MAMBABYTE_NO_PDL=1 turns that off).
 *
 *  Precision (S = float or __nv_bfloat16): weights are kept in fp32 ("master") and, for
 *  bf16, mirrored into a bf16 copy after every optimizer step (fused into AdamW, see
 *  train_engine.cuh); activations between operators are stored in S; the residual stream, its
 *  gradient, the norms' statistics, the logits, the scan state and every accumulator are fp32;
 *  GEMMs take S inputs and accumulate in fp32 (cuBLAS, gemm.cuh); weight gradients are fp32.
 *  S = float is the backend's accuracy reference (fp32 everywhere, no TF32).
 *
 *  The step mirrors the CPU TrainingModel (model/training.hpp): per layer it keeps the
 *  residual r_l (fp32), in_proj's output xz_l and x_proj's output xdbl_l (S), and recomputes
 *  dt and the scan output y in the backward (and the normed input and the conv output u when
 *  activations are not kept: set_keep_activations). The
 *  logits (first 256 head rows only) are fp32; the loss is the mean over batch * length
 *  predictions, summed in a fixed order (deterministic, as every reduction of the backend:
 *  the same step on the same GPU gives bitwise the same gradients, so a resumed run continues
 *  exactly).
 *
 *  With set_keep_activations(true) (the default) the step also keeps each layer's conv output
 *  u and normed input (S), and the backward reads them instead of running the conv and the norm
 *  again. With set_keep_scan_states(true) (off by default: it is the largest buffer of the step)
 *  the forward scan of each layer also stores its state every 4 steps, and the scan backward
 *  starts from those instead of running its own checkpoint pass over the layer.
 *
 *  Activation bytes of a step (M = batch * length, X = dt_rank + 2 d_state, s = sizeof(S)):
 *      4 M (n_layer + 1) d_model + s M n_layer (2 d_inner + X)                    kept
 *    + s M n_layer (d_inner + d_model)            kept u, normed (keep_activations)
 *    + 4 M (d_model + 256) + s M (3 d_model + 8 d_inner + X + 256) + 12 M        scratch
 *      (s M d_inner less with keep_activations: no u scratch)
 *    + 4 n_layer batch ceil(length / 4) d_inner d_state    scan states (keep_scan_states)
 *    + 8 d_inner d_state + workspace (scan backward, conv/norm/embedding reductions)
 *  activation_bytes() reports what the last step allocated.
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numbers>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/decode.cuh"
#include "mambabyte/backend/cuda/decode_persistent.cuh"
#include "mambabyte/backend/cuda/gemm.cuh"
#include "mambabyte/backend/cuda/layers.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/backend/cuda/selective_scan_backward.cuh"
#include "mambabyte/backend/cuda/selective_state_update.cuh"
#include "mambabyte/decoding/evaluate.hpp"
#include "mambabyte/model/weights.hpp"

namespace mambabyte::cuda {

namespace bc = backend::cuda;
using bf16 = __nv_bfloat16;

namespace model_kernel {
/// A[i] = -exp(A_log[i])
MAMBABYTE_KERNEL void neg_exp(float const* MAMBABYTE_RESTRICT a_log, float* MAMBABYTE_RESTRICT A, int n) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) A[i] = -expf(a_log[i]);
}
/// dA_log[i] += dA[i] * A[i]   (d(-exp(x))/dx = -exp(x) = A)
MAMBABYTE_KERNEL void dalog_accumulate(float const* MAMBABYTE_RESTRICT dA, float const* MAMBABYTE_RESTRICT A,
                                       float* MAMBABYTE_RESTRICT dA_log, int n) {
  int const i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dA_log[i] += dA[i] * A[i];
}
/// y[r * ld + c] = value[c] for r < rows, c < cols
template <class T>
MAMBABYTE_KERNEL void broadcast_rows(float const* MAMBABYTE_RESTRICT value, T* MAMBABYTE_RESTRICT y, int rows,
                                     int cols, std::int64_t ld) {
  std::int64_t const n = static_cast<std::int64_t>(rows) * cols;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(blockDim.x) * gridDim.x) {
    std::int64_t const r = i / cols;
    int const c = static_cast<int>(i - r * cols);
    y[r * ld + c] = static_cast<T>(value[c]);
  }
}
}  // namespace model_kernel

inline unsigned blocks_for(std::int64_t n, unsigned threads = 256) {
  return static_cast<unsigned>(std::min<std::int64_t>((n + threads - 1) / threads, 65535));
}

/// The parameters of a model on one device: an fp32 master buffer in parameter_layout()
/// order (the same flat layout as ModelWeights, so transfers are single copies), typed views,
/// and for S = bf16 a bf16 copy of every tensor that the GEMMs read.
template <class S>
class DeviceWeights {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, bf16>, "storage is float or __nv_bfloat16");

 public:
  using compute_type = S;
  DeviceWeights() = default;
  DeviceWeights(ModelConfig cfg, backend::Cuda be) : be_(be), config_(std::move(cfg)) {
    config_.finalize();
    params_ = parameter_layout(config_, &total_);
    master_ = bc::DeviceBuffer<float>(total_, be);
    zero();
    f32_.bind_views(params_, config_.n_layer, master_.data());
    if constexpr (!std::is_same_v<S, float>) {
      copy_ = bc::DeviceBuffer<S>(total_, be);
      cs_.bind_views(params_, config_.n_layer, copy_.data());
      refresh();
    }
  }
  DeviceWeights(ModelWeights<float> const& w, backend::Cuda be) : DeviceWeights(w.config(), be) { upload(w); }
  DeviceWeights(DeviceWeights&&) noexcept = default;
  DeviceWeights& operator=(DeviceWeights&&) noexcept = default;

  ModelConfig const& config() const { return config_; }
  std::vector<ParamInfo> const& parameters() const { return params_; }
  backend::Cuda const& backend() const { return be_; }
  std::size_t size() const { return total_; }
  float* master_data() { return master_.data(); }
  float const* master_data() const { return master_.data(); }
  S* compute_data() {
    if constexpr (std::is_same_v<S, float>) return master_.data();
    else return copy_.data();
  }
  /// fp32 views (parameters of the element-wise operators; gradients when used as such).
  WeightViews<float> const& master() const { return f32_; }
  /// Views in S (what the GEMMs read).
  WeightViews<S> const& compute() const {
    if constexpr (std::is_same_v<S, float>) return f32_;
    else return cs_;
  }

  void zero() { MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(master_.data(), 0, total_ * sizeof(float), be_.stream)); }
  /// Copy host weights (same config) to the device; refreshes the compute copy.
  void upload(ModelWeights<float> const& w) {
    check_same(w.config(), w.flat().size());
    master_.copy_from_host(w.flat().data(), total_, be_.stream);
    refresh();
  }
  /// Copy the fp32 master weights to the host.
  void download(ModelWeights<float>& w) const {
    check_same(w.config(), w.flat().size());
    master_.copy_to_host(w.flat().data(), total_, be_.stream);
  }
  /// Recompute the bf16 copy from the master (no-op for float).
  void refresh() {
    if constexpr (!std::is_same_v<S, float>) bc::convert<S, float>(be_, master_.data(), copy_.data(), total_);
  }

 private:
  void check_same(ModelConfig const& c, std::size_t n) const {
    require(n == total_ && c.to_json() == config_.to_json(),
            "device weights: the host weights' config differs from the device model's");
  }
  backend::Cuda be_{};
  ModelConfig config_;
  std::vector<ParamInfo> params_;
  std::size_t total_ = 0;
  bc::DeviceBuffer<float> master_;
  bc::DeviceBuffer<S> copy_;
  WeightViews<float> f32_;
  WeightViews<S> cs_;
};

/// Recurrent state of a batch of sequences on the device, fp32: per layer the conv window
/// (batch, d_conv-1, d_inner) and the SSM state (batch, d_inner, d_state), in one buffer so
/// snapshot/restore are single device-to-device copies.
class DeviceState {
 public:
  DeviceState() = default;
  DeviceState(ModelConfig const& c, int batch, backend::Cuda be)
      : be_(be), batch_(batch), n_layer_(c.n_layer), conv_(static_cast<std::size_t>(c.d_conv - 1) * c.d_inner()),
        ssm_(static_cast<std::size_t>(c.d_inner()) * c.d_state) {
    require(batch > 0, "device state: batch must be positive (got ", batch, ")");
    data_ = bc::DeviceBuffer<float>(size(), be);
    reset();
  }
  int batch() const { return batch_; }
  std::size_t size() const { return static_cast<std::size_t>(n_layer_) * batch_ * (conv_ + ssm_); }
  float* conv(int l) { return data_.data() + conv_offset(l); }
  float* ssm(int l) { return data_.data() + ssm_offset(l); }
  float const* conv(int l) const { return data_.data() + conv_offset(l); }
  float const* ssm(int l) const { return data_.data() + ssm_offset(l); }
  float* data() { return data_.data(); }
  float const* data() const { return data_.data(); }
  void reset() { MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(data_.data(), 0, size() * sizeof(float), be_.stream)); }
  /// this = other (same shape), on the device, asynchronously on this state's stream.
  void copy_from(DeviceState const& other) {
    require(other.size() == size() && other.batch_ == batch_, "device state: copy between different shapes");
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(data_.data(), other.data_.data(), size() * sizeof(float),
                                         cudaMemcpyDeviceToDevice, be_.stream));
  }
  /// A device copy of this state (snapshot); restore with copy_from.
  DeviceState snapshot() const {
    DeviceState s;
    s.be_ = be_; s.batch_ = batch_; s.n_layer_ = n_layer_; s.conv_ = conv_; s.ssm_ = ssm_;
    s.data_ = bc::DeviceBuffer<float>(size(), be_);
    s.copy_from(*this);
    return s;
  }
  std::size_t conv_per_seq() const { return conv_; }
  std::size_t ssm_per_seq() const { return ssm_; }
  /// Sequence b of this state = sequence ob of `other` (same model), on the device.
  void copy_sequence(int b, DeviceState const& other, int ob) {
    require(b >= 0 && b < batch_ && ob >= 0 && ob < other.batch_ && other.conv_ == conv_ && other.ssm_ == ssm_ &&
                other.n_layer_ == n_layer_,
            "device state: copy_sequence(", b, ", other, ", ob, ") out of range or between different models");
    for (int l = 0; l < n_layer_; ++l) {
      if (conv_)
        MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(conv(l) + b * conv_, other.conv(l) + ob * conv_, conv_ * sizeof(float),
                                             cudaMemcpyDeviceToDevice, be_.stream));
      MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(ssm(l) + b * ssm_, other.ssm(l) + ob * ssm_, ssm_ * sizeof(float),
                                           cudaMemcpyDeviceToDevice, be_.stream));
    }
  }

 private:
  std::size_t conv_offset(int l) const { return static_cast<std::size_t>(l) * batch_ * conv_; }
  std::size_t ssm_offset(int l) const {
    return static_cast<std::size_t>(n_layer_) * batch_ * conv_ + static_cast<std::size_t>(l) * batch_ * ssm_;
  }
  backend::Cuda be_{};
  int batch_ = 0, n_layer_ = 0;
  std::size_t conv_ = 0, ssm_ = 0;
  bc::DeviceBuffer<float> data_;
};

/// A Mamba LM's computation on one GPU (see the file comment). One object owns its scratch
/// and cuBLAS handle: it runs one thing at a time, on be.stream.
template <class S = float, class ScanPolicy = scan::Auto>
class Model {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, bf16>, "storage is float or __nv_bfloat16");

 public:
  using storage_type = S;
  using Weights = DeviceWeights<S>;
  using Gradients = DeviceWeights<float>;
  static constexpr int kClasses = 256;

  explicit Model(backend::Cuda be = {}) : be_(be), blas_(be) {}
  Model(Model const&) = delete;
  Model& operator=(Model const&) = delete;
  ~Model() {
    if (graph_exec_) (void)cudaGraphExecDestroy(graph_exec_);
  }

  backend::Cuda const& backend() const { return be_; }

  // ---- training -----------------------------------------------------------------------------
  /// Forward + backward on host tokens (batch, L+1): returns the mean cross-entropy (nats)
  /// and ADDS grad_scale * d(loss)/d(parameters) into `grad` (fp32).
  double forward_backward(Weights const& w, std::span<std::int32_t const> tokens, int batch, Gradients& grad,
                          double grad_scale = 1.0) {
    require(grad.size() == w.size() && grad.config().to_json() == w.config().to_json(),
            "cuda::Model: the gradient container's config differs from the weights'");
    launch_forward_backward(w, tokens, batch, &grad, grad_scale);
    return read_loss();
  }
  /// The mean cross-entropy only.
  double loss(Weights const& w, std::span<std::int32_t const> tokens, int batch) {
    launch_forward_backward(w, tokens, batch, nullptr, 1.0);
    return read_loss();
  }
  /// Launches the step without waiting: the loss lands in loss_device() (a double on the device).
  void launch_forward_backward(Weights const& w, std::span<std::int32_t const> tokens, int batch, Gradients* grad,
                               double grad_scale) {
    prepare_training(w.config(), tokens, batch, grad != nullptr);
    train_forward(w, grad != nullptr, grad_scale);
    if (grad) train_backward(w, *grad);
  }
  double const* loss_device() const { return loss_dev_.data(); }
  /// Keep each layer's conv output u and normed input from the forward for the backward
  /// (default), or recompute them there (the conv and the norm run again per layer; the step
  /// then holds s M n_layer (d_inner + d_model) bytes less: 10 GiB at 4 x 8192 bytes of the
  /// 353M model in bf16, for ~3% more time per step: docs/cuda.md). Takes effect at the next
  /// training step; results are bitwise the same either way (the same kernels compute u and
  /// the normed input from the same inputs).
  void set_keep_activations(bool keep) {
    if (keep != keep_activations_) {  // give the other layout's memory back (the next step allocates)
      kept_ = bc::DeviceBuffer<S>();
      u_ = bc::DeviceBuffer<S>();
      ++generation_;
    }
    keep_activations_ = keep;
  }
  bool keep_activations() const { return keep_activations_; }
  /// Keep each layer's scan states every 4 steps from the forward (the forward scan writes them,
  /// MixedScanArguments::checkpoints) so that the scan backward skips its own checkpoint pass
  /// (one exponential per state and step over the layer, and the same bytes written and read
  /// back): 4 n_layer M d_inner d_state / 4 bytes more (53 GiB at 4 x 8192 bytes of the 353M
  /// model, 13 GiB at 1 x 8192), for a shorter backward (docs/cuda.md). Off by default. The
  /// gradients agree with the default path to rounding (the states come from the forward's chunked
  /// scan instead of the backward's segments), not bit for bit; either way a step is
  /// deterministic. Needs a ScanPolicy whose forward writes checkpoints (Auto, Sequential,
  /// Chunked<L> with L a multiple of 4). Takes effect at the next training step.
  void set_keep_scan_states(bool keep) {
    require(!keep || Scan::writes_checkpoints(),
            "cuda::Model::set_keep_scan_states: this scan policy's forward does not write the states "
            "(use scan::Auto, Sequential or Chunked<L> with L a multiple of 4)");
    if (keep != keep_scan_states_) {
      states_ = bc::DeviceBuffer<float>();
      ++generation_;
    }
    keep_scan_states_ = keep;
  }
  bool keep_scan_states() const { return keep_scan_states_; }
  double read_loss() {
    double v = 0;
    loss_dev_.copy_to_host(&v, 1, be_.stream);
    return v / static_cast<double>(counted_);
  }
  /// Bytes of activations, scratch and workspace the last call allocated.
  std::size_t activation_bytes() const {
    return r_.size_bytes() + kept_.size_bytes() + normed_.size_bytes() + h_.size_bytes() + dh_.size_bytes() +
           u_.size_bytes() + dt_.size_bytes() + y_.size_bytes() + dy_.size_bytes() + du_.size_bytes() +
           ddt_.size_bytes() + dxz_.size_bytes() + dxdbl_.size_bytes() + logits_.size_bytes() +
           dlogits_.size_bytes() + row_loss_.size_bytes() + dres_.size_bytes() + A_.size_bytes() +
           dA_.size_bytes() + in_.size_bytes() + tgt_.size_bytes() + ws_.size_bytes() + ones_.size_bytes() +
           xpart_.size_bytes() + words_.size_bytes() + states_.size_bytes();
  }

  // ---- inference ----------------------------------------------------------------------------
  /// Stateful forward of host tokens (batch, length) from `state` (updated to the end of the
  /// tokens); returns a device pointer to the fp32 logits (batch*length, 256), valid until the
  /// next call. length 1 runs the decode-step kernels.
  float const* forward(Weights const& w, std::span<std::int32_t const> tokens, int batch, int length,
                       DeviceState& state) {
    require(batch > 0 && length > 0 && tokens.size() == static_cast<std::size_t>(batch) * length,
            "cuda::Model::forward: ", tokens.size(), " tokens for batch ", batch, " x length ", length);
    require(state.batch() == batch, "cuda::Model::forward: the state holds ", state.batch(),
            " sequences, the tokens ", batch);
    check_tokens(tokens, w.config().vocab_size, 0, "input");
    prepare_inference(w.config(), batch, length);
    in_.copy_from_host(tokens.data(), tokens.size(), be_.stream);
    infer_forward(w, state);
    return logits_.data();
  }

  /// One decode step of every sequence (tokens: one per sequence) through a CUDA graph that is
  /// captured on first use for this (weights, state, batch) and replayed afterwards; returns
  /// the device logits (batch, 256). Equal to forward() with length 1 (same kernels).
  float const* step(Weights const& w, std::span<std::int32_t const> tokens, DeviceState& state) {
    int const batch = state.batch();
    require(tokens.size() == static_cast<std::size_t>(batch), "cuda::Model::step: ", tokens.size(),
            " tokens for ", batch, " sequences");
    check_tokens(tokens, w.config().vocab_size, 0, "input");
    bool const same = graph_exec_ && graph_w_ == &w && graph_state_ == &state && graph_batch_ == batch &&
                      graph_data_ == state.data() && graph_wdata_ == w.master_data() &&
                      graph_generation_ == generation_ && L_ == 1 && batch_ == batch;
    if (!same) {
      prepare_inference(w.config(), batch, 1);
      if (graph_exec_) {
        MAMBABYTE_CUDA_CHECK(cudaGraphExecDestroy(graph_exec_));
        graph_exec_ = nullptr;
      }
      bc::ScopedDevice guard(be_.device);
      require(be_.stream != nullptr, "cuda::Model::step: CUDA graphs need a non-default stream (Cuda::stream)");
      auto capture = [&] {
        cudaGraph_t graph = nullptr;
        MAMBABYTE_CUDA_CHECK(cudaStreamBeginCapture(be_.stream, cudaStreamCaptureModeThreadLocal));
        try {
          infer_forward(w, state);
        } catch (...) {
          (void)cudaStreamEndCapture(be_.stream, &graph);
          if (graph) (void)cudaGraphDestroy(graph);
          throw;
        }
        MAMBABYTE_CUDA_CHECK(cudaStreamEndCapture(be_.stream, &graph));
        cudaError_t const st = cudaGraphInstantiate(&graph_exec_, graph, 0);
        (void)cudaGraphDestroy(graph);
        if (st != cudaSuccess) graph_exec_ = nullptr;
        MAMBABYTE_CUDA_CHECK(st);
      };
      for (;;) {
        try {
          capture();
          break;
        } catch (Error const&) {
          // a launch attribute could not be captured here: drop it and capture again
          // (the cooperative attribute of the persistent step, then PDL of the fused kernels).
          // Without the attribute the persistent grid (at most one block per SM, and one block
          // fits an SM: persistent_decode_supported) is co-resident on an otherwise idle GPU;
          // if it is not, its exchange polls trap after kPollTimeoutNs and the step reports a
          // CUDA error instead of hanging.
          (void)cudaGetLastError();
          if (persistent_ && coop_) coop_ = false;
          else if (decode_ && !persistent_ && pdl_) pdl_ = false;
          else throw;
        }
      }
      graph_w_ = &w; graph_state_ = &state; graph_batch_ = batch;
      graph_data_ = state.data(); graph_wdata_ = w.master_data();
      graph_generation_ = generation_;
    }
    in_.copy_from_host(tokens.data(), tokens.size(), be_.stream);
    bc::ScopedDevice guard(be_.device);
    MAMBABYTE_CUDA_CHECK(cudaGraphLaunch(graph_exec_, be_.stream));
    return logits_.data();
  }

  /// Largest batch that uses decode.cuh's fused step (bf16 only). Measured on an H200 at the
  /// 353M shape (docs/cuda.md): fused bf16 batch 1 1432 us/step vs 1747 layer by layer; at
  /// batch 64 the fused kernels were 4.9x slower (8704 vs 1787 us) and in fp32 slower at batch 1
  /// too (1828 vs 1383 us), so those run the layer-by-layer path (cuBLAS + state update).
  static constexpr int kFusedDecodeMaxBatch = 4;
  /// Allow (default) or forbid the fused decode step (benchmarks compare the two paths).
  void set_fused_decode(bool allowed) {
    if (allowed != allow_fused_) ++generation_;  // recapture the step graph
    allow_fused_ = allowed;
    rows_ = 0;  // re-run prepare_inference's choice
  }
  /// Largest batch that uses the persistent step (decode_persistent.cuh; bf16 only).
  static constexpr int kPersistentDecodeMaxBatch = bc::persistent_detail::kMaxBatch;
  /// Allow (default) or forbid the persistent decode step (then the fused kernels of decode.cuh
  /// run where they apply; benchmarks compare the two).
  void set_persistent_decode(bool allowed) {
    if (allowed != allow_persistent_) ++generation_;
    allow_persistent_ = allowed;
    rows_ = 0;
  }
  /// The layer-by-layer single-token step computes dt_proj inside the state-update kernel
  /// (default: one GEMM launch fewer per layer; docs/cuda.md has the measurements) or by a
  /// separate GEMM (false; benchmarks compare the two).
  void set_step_dt_projection(bool fused) {
    if (fused != fuse_dt_) ++generation_;  // recapture the step graph
    fuse_dt_ = fused;
  }
  /// Largest bf16 batch whose layer-by-layer step runs the conv + x_proj kernel (fp32: every
  /// batch). Measured on an H200 at the 353M shape (docs/cuda.md, run 107), against the conv
  /// kernel + the x_proj GEMM in the same call: bf16 batch 16 1253-1258 vs 1376 us, 32 1521-1529
  /// vs 1529-1537, 64 1827-1829 vs 1790-1797 (cuBLAS's tensor-core GEMM wins there); fp32 batch 1
  /// 1188-1191 vs 1349-1360, 64 3518-3523 vs 3635-3648.
  static constexpr int kStepConvXprojMaxBatchBf16 = 32;
  /// The layer-by-layer single-token step runs the causal conv and x_proj as one kernel
  /// (default, where it is faster: kStepConvXprojMaxBatchBf16; decode_conv_xproj.cuh, one launch
  /// fewer per layer) or always as the conv kernel and a cuBLAS GEMM (false; benchmarks compare
  /// the two). The two differ by x_proj's summation order.
  void set_step_conv_xproj(bool fused) {
    if (fused != fuse_cx_) ++generation_;
    fuse_cx_ = fused;
  }
  /// Whether the last inference call, a layer-by-layer single-token step, ran the conv + x_proj
  /// kernel (set_step_conv_xproj).
  bool step_conv_xproj_used() const { return cx_step_; }
  /// Whether the last inference call ran the persistent single-kernel step.
  bool persistent_decode() const { return persistent_; }
  /// Whether the last inference call (forward / step) ran decode.cuh's fused single-token
  /// kernels (length 1, bf16, batch <= kFusedDecodeMaxBatch, supported dimensions) rather than
  /// the layer-by-layer path.
  bool fused_decode() const { return decode_; }
  /// Whether the fused step's kernels are chained with programmatic dependent launch.
  bool decode_pdl() const { return pdl_; }

  /// Per-row cross-entropy of the last forward()'s logits against host targets (one per
  /// row; negative = skip): returns the sum in nats (double) and the count.
  double sum_nll(std::span<std::int32_t const> targets) {
    std::size_t const rows = targets.size();
    require(rows <= rows_, "cuda::Model::sum_nll: ", rows, " targets for ", rows_, " rows of logits");
    check_tokens(targets, kClasses, -1, "target");
    tgt_.copy_from_host(targets.data(), rows, be_.stream);
    bc::cross_entropy<S>(be_, static_cast<int>(rows), kClasses, logits_.data(), kClasses, tgt_.data(), nullptr,
                         kClasses, 1.f, row_loss_.data());
    std::vector<float> loss(rows);
    row_loss_.copy_to_host(loss.data(), rows, be_.stream);
    double s = 0;
    for (float x : loss) s += x;
    return s;
  }

 private:
  using Scan = ssm::SelectiveScan<backend::Cuda, S, ScanPolicy>;
  using ScanBackward = ssm::SelectiveScanBackward<backend::Cuda, S, ScanPolicy>;

  /// Gives back every activation, scratch and workspace buffer (a failed step's partial sizes);
  /// the next call allocates what it needs, and captured decode graphs are stale.
  void release_scratch() {
    ++generation_;
    auto drop = [](auto&... b) { ((b = std::remove_reference_t<decltype(b)>()), ...); };
    drop(r_, logits_, row_loss_, dres_, A_, dA_, h_end_, xpart_, kept_, normed_, h_, dh_, u_, dt_, y_, dy_, du_,
         ddt_, dxz_, dxdbl_, dlogits_, ones_, in_, tgt_, loss_dev_, ws_, states_, cx_part_);
    rows_ = 0;
    after_training_ = true;  // the next inference call fits its buffers again
  }

  template <class V>
  void fit(bc::DeviceBuffer<V>& b, std::size_t n) {
    if (b.size() < n) {
      ++generation_;  // a captured decode graph that used the old buffer is stale (also if the allocation fails)
      b = bc::DeviceBuffer<V>();  // free first: peak memory is the new size, not old + new
      b = bc::DeviceBuffer<V>(n, be_);
    }
  }

  static void check_tokens(std::span<std::int32_t const> t, int limit, int lowest, char const* what) {
    for (std::size_t i = 0; i < t.size(); ++i)
      require(t[i] >= lowest && t[i] < limit, "cuda::Model: ", what, " token ", t[i], " at position ", i,
              " outside [", lowest, ", ", limit, ")");
  }

  void set_dims(ModelConfig const& c, int batch, int length) {
    c_ = c;
    batch_ = batch; L_ = length;
    M_ = static_cast<std::size_t>(batch) * length;
    require(M_ <= static_cast<std::size_t>(std::numeric_limits<int>::max() / 4),
            "cuda::Model: batch * length too large (", M_, ")");
    dm_ = c.d_model; di_ = c.d_inner(); N_ = c.d_state; R_ = c.dt_rank; X_ = c.x_proj_out(); nl_ = c.n_layer;
    require(c.vocab_size >= kClasses, "cuda::Model: the vocabulary (", c.vocab_size, ") is smaller than 256 bytes");
  }

  /// Scratch common to training and inference for M rows; `layers_kept` slots of xz/xdbl.
  void fit_common(std::size_t layers_kept, std::size_t r_slots) {
    std::size_t const M = M_, dm = dm_, di = di_;
    fit(r_, r_slots * M * dm);
    fit(kept_, layers_kept * layer_stride(keeping_));
    fit(normed_, M * dm);
    fit(h_, M * dm);
    if (!keeping_) fit(u_, M * di);  // a step that keeps activations writes u into kept_
    fit(dt_, M * di);
    fit(y_, M * di);
    fit(logits_, M * kClasses);
    fit(row_loss_, M);
    fit(A_, di * N_);
    fit(in_, M);
    fit(tgt_, M);
    fit(loss_dev_, 1);
    if (c_.bias) {
      fit(ones_, M);
      std::vector<S> one(M, static_cast<S>(1.f));
      ones_.copy_from_host(one.data(), M, be_.stream);
    }
  }

  static std::size_t round64(std::size_t n) { return (n + 63) / 64 * 64; }
  /// Elements of kept_ per layer: xz and xdbl, then (keeping_) the conv output u and the normed
  /// input, each of those starting on a 128-byte boundary.
  std::size_t layer_stride(bool keeping) const {
    return round64(M_ * (2 * di_ + X_)) + (keeping ? round64(M_ * di_) + round64(M_ * dm_) : 0);
  }
  S* xz_at(int l) { return kept_.data() + static_cast<std::size_t>(l) * layer_stride(keeping_); }
  S* xdbl_at(int l) { return xz_at(l) + M_ * 2 * di_; }
  /// The conv output u and the normed input of layer l: kept per layer by a training step that
  /// keeps activations (the backward reads them instead of recomputing), else the scratch.
  S* u_at(int l) { return keeping_ ? xz_at(l) + round64(M_ * (2 * di_ + X_)) : u_.data(); }
  S* normed_at(int l) { return keeping_ ? u_at(l) + round64(M_ * di_) : normed_.data(); }
  float* r_at(int l) { return r_.data() + static_cast<std::size_t>(l) * M_ * dm_; }
  /// Floats of one layer's scan states (keep_scan_states), rounded up to 16-byte multiples.
  std::size_t states_stride() const { return (bc::checkpoint_floats(batch_, L_, di_, N_) + 3) / 4 * 4; }
  /// Layer l's scan states from the forward for the backward, or null (not kept).
  float* states_at(int l) {
    return keeping_states_ ? states_.data() + static_cast<std::size_t>(l) * states_stride() : nullptr;
  }

  /// backward: a gradient step (loss() alone keeps nothing extra for a backward).
  void prepare_training(ModelConfig const& c, std::span<std::int32_t const> tokens, int batch, bool backward) {
    require(batch > 0, "training: batch must be positive (got ", batch, ")");
    require(tokens.size() % static_cast<std::size_t>(batch) == 0, "training: ", tokens.size(),
            " tokens do not split into ", batch, " sequences of equal length");
    std::size_t const per = tokens.size() / static_cast<std::size_t>(batch);
    require(per >= 2, "training: every sequence needs at least 2 tokens (inputs + next-byte targets), got ", per);
    int const L = static_cast<int>(per - 1);
    set_dims(c, batch, L);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      bool const is_target = i % per != 0;
      int const lim = is_target ? kClasses : c.vocab_size;
      require(tokens[i] >= 0 && tokens[i] < lim, "training: token ", tokens[i], " at position ", i, " outside [0, ",
              lim, ")", is_target ? " (targets are bytes)" : "");
    }
    std::vector<std::int32_t> in(M_), tgt(M_);
    for (int b = 0; b < batch; ++b)
      for (int t = 0; t < L; ++t) {
        in[static_cast<std::size_t>(b) * L + t] = tokens[b * per + t];
        tgt[static_cast<std::size_t>(b) * L + t] = tokens[b * per + t + 1];
      }
    counted_ = M_;
    std::size_t const M = M_, dm = dm_, di = di_, X = X_;
    keeping_ = keep_activations_ && backward;
    keeping_states_ = keep_scan_states_ && backward;
    after_training_ = true;
    try {
      fit_common(nl_, nl_ + 1);
      fit(dh_, M * dm);
      fit(dy_, M * di);
      fit(du_, M * di);
      fit(ddt_, M * di);
      fit(dxz_, M * 2 * di);
      fit(dxdbl_, M * X);
      fit(dlogits_, M * kClasses);
      fit(dres_, M * dm);
      fit(dA_, di * N_);
      if (keeping_states_) fit(states_, static_cast<std::size_t>(nl_) * states_stride());
      fit(ws_, workspace_bytes(true));
      rows_ = M;
    } catch (bc::OutOfMemory const& e) {
      // what the step needs, and what the memory options would give back (docs/cuda.md); the
      // buffers this call did allocate are given back, so that a smaller step fits as in a fresh model
      auto gib = [](double b) { return b / double(1ull << 30); };
      double const resid = double(nl_ + 1) * double(M) * double(dm) * sizeof(float);
      double const kept = double(nl_) * double(layer_stride(keeping_)) * sizeof(S);
      // recomputing keeps u and the normed input of one layer at a time (u_ and normed_ scratch)
      double const kept_extra =
          keeping_ ? double(nl_) * double(round64(M * di) + round64(M * dm)) * sizeof(S) - double(M * di) * sizeof(S) : 0.0;
      double const states = keeping_states_ ? double(nl_) * double(states_stride()) * sizeof(float) : 0.0;
      release_scratch();
      std::ostringstream os;
      os.setf(std::ios::fixed);
      os.precision(1);
      os << "cuda::Model: the training step at " << batch << " x " << L << " bytes does not fit in device memory ("
         << e.what() << "). Its largest buffers: the residual stream of every layer, " << gib(resid)
         << " GiB; the per-layer activations kept for the backward, " << gib(kept) << " GiB";
      if (keeping_)
        os << " (set_keep_activations(false), CLI --recompute-activations, saves " << gib(kept_extra) << " GiB)";
      if (keeping_states_)
        os << "; the scan states kept from the forward, " << gib(states)
           << " GiB (set_keep_scan_states(false), CLI without --keep-scan-states)";
      os << ". A smaller batch or sequence length shrinks all of them in proportion.";
      fail(os.str());
    }
    in_.copy_from_host(in.data(), M, be_.stream);
    tgt_.copy_from_host(tgt.data(), M, be_.stream);
  }

  void prepare_inference(ModelConfig const& c, int batch, int length) {
    bool same = c.to_json() == c_.to_json() && batch == batch_ && length == L_ && rows_ == M_;
    set_dims(c, batch, length);
    if (after_training_) {  // a training step sized the scratch (and u_ may be unallocated): fit it again
      keeping_ = false;
      keeping_states_ = false;
      after_training_ = false;
      same = false;
    }
    if (!same) {
      rows_ = 0;  // set once every buffer below is there: a failed allocation leaves the shape "not ready"
      fit_common(1, 1);
      fit(ws_, workspace_bytes(false));
      if (h_end_.size() != std::size_t(batch) * di_ * N_) {
        ++generation_;
        h_end_ = bc::DeviceBuffer<float>();
        h_end_ = bc::DeviceBuffer<float>(std::size_t(batch) * di_ * N_, be_);
      }
      rows_ = M_;
    }
    bool const fusable = allow_fused_ && std::is_same_v<S, bf16> && length == 1;
    persistent_ = fusable && allow_persistent_ && batch <= kPersistentDecodeMaxBatch &&
                  bc::persistent_decode_supported(decode_dims(), be_.device);
    decode_ = persistent_ || (fusable && batch <= kFusedDecodeMaxBatch && bc::decode_supported<S>(decode_dims(), be_.device));
    if (persistent_) {
      std::size_t const words = bc::persistent_decode_words(decode_dims(), be_.device);
      bool const fresh = words_.size() < words || sync_.size() == 0;
      fit(words_, words);
      if (sync_.size() == 0) sync_ = bc::DeviceBuffer<unsigned>(2, be_);
      // the exchange words carry flags from step to step: zeroed when their layout may change
      if (fresh || !same) bc::persistent_decode_reset(be_, words_.data(), words_.size(), sync_.data());
      bc::persistent_decode_setup(be_);
    } else if (decode_) {
      fit(xpart_, std::max<std::size_t>(bc::decode_xpart_floats<S>(decode_dims()), 4));
      bc::decode_setup<S>(be_, decode_dims());
    }
    cx_step_ = length == 1 && !decode_ && step_conv_xproj(batch);
    if (cx_step_) {  // the layer-by-layer step's conv + x_proj workspace
      fit(cx_part_, std::max<std::size_t>(bc::conv_xproj_partial_floats(batch, di_, X_), 1));
      std::size_t const nc = bc::conv_xproj_counters(batch, di_);
      if (cx_count_.size() < nc) {  // fresh counters start at zero; the kernel leaves them zero
        fit(cx_count_, nc);
        bc::conv_xproj_reset(be_, cx_count_.data(), cx_count_.size());
      }
      bc::conv_xproj_setup<S>(be_);  // its shared-memory limit, before a graph capture
    }
  }

  bc::MixedScanArguments<S> scan_args(WeightViews<float> const& fw, int l, S const* xz, S const* xdbl, S const* u) {
    bc::MixedScanArguments<S> sa{};
    sa.batch = batch_; sa.length = L_; sa.d_inner = di_; sa.d_state = N_;
    sa.u = u; sa.ld_u = di_;
    sa.delta = dt_.data(); sa.ld_delta = di_;
    sa.delta_bias = fw.layers[l].dt_proj_b; sa.delta_softplus = true;
    sa.A = A_.data();
    sa.B = xdbl + R_; sa.ld_B = X_;
    sa.C = xdbl + R_ + N_; sa.ld_C = X_;
    sa.D = fw.layers[l].D;
    sa.z = xz + di_; sa.ld_z = 2 * di_;
    sa.out = y_.data(); sa.ld_out = di_;
    return sa;
  }

  std::size_t workspace_bytes(bool training) const {
    bc::MixedScanArguments<S> sa{};
    sa.batch = batch_; sa.length = L_; sa.d_inner = di_; sa.d_state = N_;
    std::size_t ws = Scan::workspace_bytes(sa, be_);
    if (training) {
      bc::MixedScanBackwardArguments<S> ba{};
      ba.batch = batch_; ba.length = L_; ba.d_inner = di_; ba.d_state = N_;
      ba.delta_softplus = true;
      // with the forward's states the backward needs no checkpoint workspace (only presence matters)
      if (keeping_states_) ba.checkpoints = reinterpret_cast<float const*>(this);
      ba.z = reinterpret_cast<S const*>(this);  // only presence matters for the size
      ba.D = reinterpret_cast<float const*>(this);
      ba.delta_bias = reinterpret_cast<float const*>(this);
      ws = std::max(ws, ScanBackward::workspace_bytes(ba, be_));
      ws = std::max(ws, bc::conv1d_backward_workspace_bytes(batch_, L_, di_, c_.d_conv));
      ws = std::max(ws, bc::add_norm_backward_workspace_bytes(static_cast<int>(M_), dm_));
      ws = std::max(ws, bc::embedding_backward_workspace_bytes(static_cast<int>(M_), dm_, c_.vocab_size));
    }
    ws = std::max(ws, bc::reduce_workspace_bytes(M_));
    return std::max<std::size_t>(ws, 16);
  }

  float eps() const { return static_cast<float>(c_.norm_eps); }
  bool rms() const { return c_.rms_norm; }

  /// y(M, N) = x W^T (+ bias)
  void linear(S const* x, std::int64_t ld_x, S const* W, float const* bias, S* y, std::int64_t ld_y, int N, int K) {
    int const M = static_cast<int>(M_);
    if (bias) model_kernel::broadcast_rows<S><<<blocks_for(std::int64_t(M) * N), 256, 0, be_.stream>>>(bias, y, M, N, ld_y);
    bc::linear_forward<S, S>(blas_, be_, M, N, K, x, ld_x, W, y, ld_y, bias != nullptr);
  }

  /// Whether the layer-by-layer single-token step at this batch runs conv_xproj_step.
  bool step_conv_xproj(int batch) const {
    return fuse_cx_ && (std::is_same_v<S, float> || batch <= kStepConvXprojMaxBatchBf16) &&
           bc::conv_xproj_supported<S>(X_, be_.device);
  }

  void compute_A(float const* A_log) {
    int const n = di_ * N_;
    model_kernel::neg_exp<<<blocks_for(n), 256, 0, be_.stream>>>(A_log, A_.data(), n);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
  }

  /// normed -> h_ through the mixer of layer l, reading/writing xz, xdbl and the conv output
  /// u; with a state: the conv window and the SSM state are read and updated.
  void mixer_forward(Weights const& w, int l, S const* normed, S* xz, S* xdbl, S* u, DeviceState* state) {
    auto const& cw = w.compute().layers[l];
    auto const& fw = w.master().layers[l];
    int const di = di_, X = X_, K = c_.d_conv;
    bool const step = state && L_ == 1;
    linear(normed, dm_, cw.in_proj_w, fw.in_proj_b, xz, 2 * di, 2 * di, dm_);
    if (step && cx_step_) {  // conv + x_proj in one kernel (prepare_inference chose it and sized its workspace)
      bc::conv_xproj_step<S>(be_, batch_, di, K, xz, 2 * di, fw.conv_w, fw.conv_b, state->conv(l), u, di,
                             cw.x_proj_w, X, xdbl, X, cx_part_.data(), cx_count_.data());
    } else {
      bc::conv1d_forward<S>(be_, batch_, L_, di, K, xz, 2 * di, fw.conv_w, fw.conv_b, u, di,
                            state ? state->conv(l) : nullptr, true);
      linear(u, di, cw.x_proj_w, nullptr, xdbl, X, X, di);
    }
    // the single-token step computes dt_proj inside the state update (one GEMM launch fewer)
    bc::DeltaProjection<S> proj;
    if (step && fuse_dt_) {
      proj.x = xdbl; proj.ld_x = X; proj.W = cw.dt_proj_w; proj.rank = R_;
    } else {
      linear(xdbl, X, cw.dt_proj_w, nullptr, dt_.data(), di, di, R_);
    }
    if (step) {  // A = -exp(A_log) inside the step kernel (one launch fewer per layer)
      bc::selective_state_update<S>(be_, batch_, di, N_, state->ssm(l), u, di, dt_.data(), di, fw.dt_proj_b,
                                    true, fw.A_log, xdbl + R_, X, xdbl + R_ + N_, X, fw.D, xz + di, 2 * di,
                                    y_.data(), di, /*A_is_log=*/true, proj);
    } else {
      compute_A(fw.A_log);
      auto sa = scan_args(w.master(), l, xz, xdbl, u);
      if (!state) sa.checkpoints = states_at(l);  // a training step keeping the scan states
      if (state) {  // separate in and out buffers: chunks of one launch read the first and write the second
        sa.initial_state = state->ssm(l);
        sa.final_state = h_end_.data();
      }
      Scan::run(sa, ws_.data(), be_);
      if (state)
        MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(state->ssm(l), h_end_.data(), h_end_.size_bytes(),
                                             cudaMemcpyDeviceToDevice, be_.stream));
    }
    linear(y_.data(), di, cw.out_proj_w, fw.out_proj_b, h_.data(), dm_, dm_, di);
  }

  void head_logits(Weights const& w) {
    bc::linear_forward<S, float>(blas_, be_, static_cast<int>(M_), kClasses, dm_, normed_.data(), dm_,
                                 w.compute().lm_head, logits_.data(), kClasses);
  }

  void train_forward(Weights const& w, bool keep_grad, double grad_scale) {
    auto const& fw = w.master();
    int const M = static_cast<int>(M_);
    bc::embedding_forward(be_, M, dm_, in_.data(), fw.embedding, r_at(0));
    for (int l = 0; l < nl_; ++l) {
      if (l == 0)
        bc::add_norm_forward<S, S>(be_, M, dm_, r_at(0), nullptr, r_at(0), fw.layers[0].norm_w, fw.layers[0].norm_b,
                                   normed_at(0), eps(), rms());
      else
        bc::add_norm_forward<S, S>(be_, M, dm_, r_at(l - 1), h_.data(), r_at(l), fw.layers[l].norm_w,
                                   fw.layers[l].norm_b, normed_at(l), eps(), rms());
      mixer_forward(w, l, normed_at(l), xz_at(l), xdbl_at(l), u_at(l), nullptr);
    }
    bc::add_norm_forward<S, S>(be_, M, dm_, r_at(nl_ - 1), h_.data(), r_at(nl_), fw.norm_f_w, fw.norm_f_b,
                               normed_.data(), eps(), rms());
    head_logits(w);
    bc::cross_entropy<S>(be_, M, kClasses, logits_.data(), kClasses, tgt_.data(),
                         keep_grad ? dlogits_.data() : nullptr, kClasses,
                         static_cast<float>(grad_scale / static_cast<double>(M_)), row_loss_.data());
    bc::deterministic_sum(be_, row_loss_.data(), M_, loss_dev_.data(), ws_.data());
  }

  void infer_forward(Weights const& w, DeviceState& state) {
    if (L_ == 1 && decode_) {
      decode_forward(w, state);
      return;
    }
    auto const& fw = w.master();
    int const M = static_cast<int>(M_);
    float* r = r_at(0);
    bc::embedding_forward(be_, M, dm_, in_.data(), fw.embedding, r);
    for (int l = 0; l < nl_; ++l) {
      bc::add_norm_forward<S, S>(be_, M, dm_, r, l == 0 ? nullptr : h_.data(), r, fw.layers[l].norm_w,
                                 fw.layers[l].norm_b, normed_.data(), eps(), rms());
      mixer_forward(w, l, normed_.data(), xz_at(0), xdbl_at(0), u_.data(), &state);
    }
    bc::add_norm_forward<S, S>(be_, M, dm_, r, h_.data(), r, fw.norm_f_w, fw.norm_f_b, normed_.data(), eps(), rms());
    head_logits(w);
  }

  bc::DecodeDims decode_dims() const {
    bc::DecodeDims d;
    d.batch = batch_; d.d_model = dm_; d.d_inner = di_; d.d_state = N_; d.dt_rank = R_; d.d_conv = c_.d_conv;
    d.n_layer = nl_; d.classes = kClasses; d.eps = eps(); d.rms = rms();
    return d;
  }

  /// The fused single-token step (backend/cuda/decode.cuh): 3 or 4 kernels per layer + the head.
  /// A = -exp(A_log) is computed inside the SSM kernel from the master A_log on every launch, so
  /// weights updated between replays of a captured graph are always used (no cached copy).
  void decode_forward(Weights const& w, DeviceState& state) {
    auto const& fw = w.master();
    auto const& cw = w.compute();
    bc::DecodeArgs<S> a;
    a.dims = decode_dims();
    a.tokens = in_.data();
    a.embedding = fw.embedding;
    a.layers.resize(static_cast<std::size_t>(nl_));
    for (int l = 0; l < nl_; ++l) {
      auto const& f = fw.layers[l];
      auto const& c = cw.layers[l];
      auto& L = a.layers[static_cast<std::size_t>(l)];
      L.norm_w = f.norm_w; L.norm_b = f.norm_b;
      L.in_proj_w = c.in_proj_w; L.in_proj_b = f.in_proj_b;
      L.conv_w = f.conv_w; L.conv_b = f.conv_b;
      L.x_proj_w = c.x_proj_w; L.dt_proj_w = c.dt_proj_w; L.dt_proj_b = f.dt_proj_b;
      L.A_log = f.A_log; L.D = f.D;
      L.out_proj_w = c.out_proj_w; L.out_proj_b = f.out_proj_b;
      L.conv_state = state.conv(l); L.ssm_state = state.ssm(l);
    }
    a.norm_f_w = fw.norm_f_w; a.norm_f_b = fw.norm_f_b; a.lm_head = cw.lm_head;
    a.resid = r_at(0);
    a.u = u_.data();
    a.z = dt_.data();  // dt_ is free in the fused step: it holds z
    a.xdbl = xdbl_at(0);
    a.y = y_.data();
    a.xpart = xpart_.data();
    a.logits = logits_.data();
    if constexpr (std::is_same_v<S, bf16>) {
      if (persistent_) {
        // DeviceWeights / DeviceState / the scratch are cudaMalloc'd and, with the dimensions
        // persistent_decode_supported accepts, every view starts on a 16-byte boundary
        // (persistent_decode_step checks it and names the failure otherwise).
        bc::persistent_decode_step(be_, a, words_.data(), sync_.data(), coop_);
        return;
      }
    }
    bc::decode_step<S>(be_, a, pdl_);
  }

  static bool default_pdl(int device) {
    if (char const* e = std::getenv("MAMBABYTE_NO_PDL"); e && *e && *e != '0') return false;
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return major >= 9;
  }

  void train_backward(Weights const& w, Gradients& grad) {
    auto const& cw = w.compute();
    auto const& fw = w.master();
    auto const& gw = grad.master();
    int const M = static_cast<int>(M_);
    // head (first 256 rows) and the final norm; normed_ still holds norm_f's output
    bc::linear_backward_weight<S>(blas_, be_, M, kClasses, dm_, dlogits_.data(), kClasses, normed_.data(), dm_,
                                  gw.lm_head);
    bc::linear_backward_data<S, S>(blas_, be_, M, kClasses, dm_, dlogits_.data(), kClasses, cw.lm_head,
                                   normed_.data(), dm_);  // normed_ now holds d(normed)
    MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(dres_.data(), 0, M_ * dm_ * sizeof(float), be_.stream));
    bc::add_norm_backward<S, S>(be_, M, dm_, r_at(nl_), fw.norm_f_w, normed_.data(), dres_.data(), dh_.data(),
                                gw.norm_f_w, gw.norm_f_b, eps(), rms(), ws_.data());
    for (int l = nl_ - 1; l >= 0; --l) {
      // recompute the normed input of layer l (r_l + 0 = r_l: the residual is unchanged)
      if (!keeping_)
        bc::add_norm_forward<S, S>(be_, M, dm_, r_at(l), nullptr, r_at(l), fw.layers[l].norm_w, fw.layers[l].norm_b,
                                   normed_at(l), eps(), rms());
      mixer_backward(w, grad, l);  // dh_ -> dxz_ -> d(normed) in h_
      bc::add_norm_backward<S, S>(be_, M, dm_, r_at(l), fw.layers[l].norm_w, h_.data(), dres_.data(),
                                  l > 0 ? dh_.data() : static_cast<S*>(nullptr), gw.layers[l].norm_w,
                                  gw.layers[l].norm_b, eps(), rms(), ws_.data());
    }
    bc::embedding_backward(be_, M, dm_, c_.vocab_size, in_.data(), dres_.data(), gw.embedding, ws_.data());
  }

  /// Gradient of the mixer of layer l: dh_ (d of its output) in; parameter gradients
  /// accumulated; d(normed input) written into h_ (free during the backward).
  void mixer_backward(Weights const& w, Gradients& grad, int l) {
    auto const& cw = w.compute().layers[l];
    auto const& fw = w.master().layers[l];
    auto const& gl = grad.master().layers[l];
    int const M = static_cast<int>(M_), di = di_, X = X_, K = c_.d_conv, dm = dm_;
    S* xz = xz_at(l);
    S* xdbl = xdbl_at(l);
    S* u = u_at(l);
    // recompute u (unless kept), dt, A
    if (!keeping_) bc::conv1d_forward<S>(be_, batch_, L_, di, K, xz, 2 * di, fw.conv_w, fw.conv_b, u, di, nullptr, true);
    linear(xdbl, X, cw.dt_proj_w, nullptr, dt_.data(), di, di, R_);
    compute_A(fw.A_log);
    // out_proj: dy = dh W_out
    bc::linear_backward_data<S, S>(blas_, be_, M, dm, di, dh_.data(), dm, cw.out_proj_w, dy_.data(), di);
    if (gl.out_proj_b) bc::linear_backward_bias<S>(blas_, be_, M, dm, dh_.data(), dm, ones_.data(), gl.out_proj_b);
    // the scan (recomputes y into y_)
    MAMBABYTE_CUDA_CHECK(cudaMemsetAsync(dA_.data(), 0, std::size_t(di) * N_ * sizeof(float), be_.stream));
    bc::MixedScanBackwardArguments<S> ba{};
    ba.batch = batch_; ba.length = L_; ba.d_inner = di; ba.d_state = N_;
    ba.checkpoints = states_at(l);  // the forward's (keep_scan_states), else the backward's own pass
    ba.u = u; ba.ld_u = di;
    ba.delta = dt_.data(); ba.ld_delta = di;
    ba.delta_bias = fw.dt_proj_b; ba.delta_softplus = true;
    ba.A = A_.data();
    ba.B = xdbl + R_; ba.ld_B = X;
    ba.C = xdbl + R_ + N_; ba.ld_C = X;
    ba.D = fw.D;
    ba.z = xz + di; ba.ld_z = 2 * di;
    ba.dout = dy_.data(); ba.ld_dout = di;
    ba.du = du_.data(); ba.ld_du = di;
    ba.ddelta = ddt_.data(); ba.ld_ddelta = di;
    ba.dB = dxdbl_.data() + R_; ba.ld_dB = X;
    ba.dC = dxdbl_.data() + R_ + N_; ba.ld_dC = X;
    ba.dz = dxz_.data() + di; ba.ld_dz = 2 * di;
    ba.out = y_.data(); ba.ld_out = di;
    ba.dA = dA_.data();
    ba.dD = gl.D;
    ba.ddelta_bias = gl.dt_proj_b;
    ScanBackward::run(ba, ws_.data(), be_);
    int const n = di * N_;
    model_kernel::dalog_accumulate<<<blocks_for(n), 256, 0, be_.stream>>>(dA_.data(), A_.data(), gl.A_log, n);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    bc::linear_backward_weight<S>(blas_, be_, M, dm, di, dh_.data(), dm, y_.data(), di, gl.out_proj_w);
    // dt_proj: d(xdbl[:, :R]) = ddt W_dt; dW_dt += ddt^T xdbl[:, :R]
    bc::linear_backward_data<S, S>(blas_, be_, M, di, R_, ddt_.data(), di, cw.dt_proj_w, dxdbl_.data(), X);
    bc::linear_backward_weight<S>(blas_, be_, M, di, R_, ddt_.data(), di, xdbl, X, gl.dt_proj_w);
    // x_proj: du += dxdbl W_x; dW_x += dxdbl^T u
    bc::linear_backward_data<S, S>(blas_, be_, M, X, di, dxdbl_.data(), X, cw.x_proj_w, du_.data(), di, true);
    bc::linear_backward_weight<S>(blas_, be_, M, X, di, dxdbl_.data(), X, u, di, gl.x_proj_w);
    // conv + SiLU: d(xz[:, :di])
    bc::conv1d_backward<S>(be_, batch_, L_, di, K, xz, 2 * di, fw.conv_w, fw.conv_b, true, du_.data(), di,
                           dxz_.data(), 2 * di, gl.conv_w, gl.conv_b, ws_.data());
    // in_proj: d(normed) = dxz W_in; dW_in += dxz^T normed
    bc::linear_backward_data<S, S>(blas_, be_, M, 2 * di, dm, dxz_.data(), 2 * di, cw.in_proj_w, h_.data(), dm);
    bc::linear_backward_weight<S>(blas_, be_, M, 2 * di, dm, dxz_.data(), 2 * di, normed_at(l), dm,
                                  gl.in_proj_w);
    if (gl.in_proj_b)
      bc::linear_backward_bias<S>(blas_, be_, M, 2 * di, dxz_.data(), 2 * di, ones_.data(), gl.in_proj_b);
  }

  backend::Cuda be_;
  bc::Blas blas_;
  ModelConfig c_;
  int batch_ = 0, L_ = 0, dm_ = 0, di_ = 0, N_ = 0, R_ = 0, X_ = 0, nl_ = 0;
  std::size_t M_ = 0, rows_ = 0, counted_ = 1;
  bc::DeviceBuffer<float> r_, logits_, row_loss_, dres_, A_, dA_, h_end_, xpart_;
  bc::DeviceBuffer<S> kept_, normed_, h_, dh_, u_, dt_, y_, dy_, du_, ddt_, dxz_, dxdbl_, dlogits_, ones_;
  bc::DeviceBuffer<std::int32_t> in_, tgt_;
  bc::DeviceBuffer<double> loss_dev_;
  bc::DeviceBuffer<std::byte> ws_;
  cudaGraphExec_t graph_exec_ = nullptr;
  void const* graph_w_ = nullptr;
  void const* graph_state_ = nullptr;
  void const* graph_data_ = nullptr;
  void const* graph_wdata_ = nullptr;
  int graph_batch_ = 0;
  std::uint64_t generation_ = 0, graph_generation_ = 0;
  bool keep_activations_ = true;          ///< set_keep_activations
  bool keep_scan_states_ = false;         ///< set_keep_scan_states
  bool keeping_states_ = false;           ///< states_ holds every layer's scan states (training step)
  bc::DeviceBuffer<float> states_;        ///< per layer: the forward scan's states every 4 steps
  bool fuse_dt_ = true;                   ///< set_step_dt_projection
  bool fuse_cx_ = true;                   ///< set_step_conv_xproj
  bool cx_step_ = false;                  ///< the current inference shape's step runs conv_xproj_step
  bc::DeviceBuffer<float> cx_part_;       ///< conv_xproj_step's partial sums
  bc::DeviceBuffer<unsigned> cx_count_;   ///< and its counters (zero between launches)
  bool keeping_ = false;                  ///< kept_ holds u and the normed input per layer (training step)
  bool after_training_ = false;           ///< the last call was a training step (prepare_inference refits)
  bool allow_fused_ = true;
  bool allow_persistent_ = true;
  bool persistent_ = false;               ///< the current inference shape runs the persistent step
  bool coop_ = true;                      ///< launch it with the cooperative attribute
  bc::DeviceBuffer<unsigned long long> words_;  ///< its exchange words (decode_persistent.cuh)
  bc::DeviceBuffer<unsigned> sync_;       ///< its epoch and finished-block counter
  bool decode_ = false;                   ///< the current inference shape runs decode.cuh's fused step
  bool pdl_ = default_pdl(be_.device);    ///< chain the fused step's kernels with PDL
};

/// The host-facing interface that generate() (decoding/generate.hpp) and the CPU Model share,
/// over device weights: make_state, forward and step with host logits (rows of vocab_size;
/// the first 256 of each row are written, the rest are never read by the sampler). The
/// decode step runs through cuda::Model::step (a CUDA graph).
template <class S = bf16, class ScanPolicy = scan::Auto>
class Generator {
 public:
  using value_type = float;
  Generator(ModelWeights<float> const& w, backend::Cuda be) : w_(w, be), m_(be) {}
  ModelConfig const& config() const { return w_.config(); }
  DeviceState make_state(int batch) const { return DeviceState(w_.config(), batch, m_.backend()); }
  void forward(std::span<std::int32_t const> tokens, int batch, int length, DeviceState* state,
               std::span<float> logits) {
    require(state != nullptr, "cuda::Generator::forward needs a state");
    copy_rows(m_.forward(w_, tokens, batch, length, *state), static_cast<std::size_t>(batch) * length, logits);
  }
  void step(std::span<std::int32_t const> tokens, DeviceState& state, std::span<float> logits) {
    copy_rows(m_.step(w_, tokens, state), static_cast<std::size_t>(state.batch()), logits);
  }
  DeviceWeights<S> const& weights() const { return w_; }

 private:
  void copy_rows(float const* dev, std::size_t rows, std::span<float> logits) {
    std::size_t const V = static_cast<std::size_t>(w_.config().vocab_size);
    require(logits.size() >= rows * V, "cuda::Generator: logits buffer too small");
    MAMBABYTE_CUDA_CHECK(cudaMemcpy2DAsync(logits.data(), V * sizeof(float), dev, 256 * sizeof(float),
                                           256 * sizeof(float), rows, cudaMemcpyDeviceToHost, m_.backend().stream));
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(m_.backend().stream));
  }
  DeviceWeights<S> w_;
  Model<S, ScanPolicy> m_;
};

/// Bits per byte of device weights on `data` (see decoding/evaluate.hpp: same definition and
/// chunking with one carried batch-1 state; the per-byte losses are fp32 on the device and
/// summed in double on the host).
template <class S, class ScanPolicy>
EvalResult evaluate_bits_per_byte(Model<S, ScanPolicy>& model, DeviceWeights<S> const& w,
                                  std::span<std::uint8_t const> data, EvalOptions const& options = {}) {
  auto const t0 = std::chrono::steady_clock::now();
  require(options.chunk > 0, "evaluate: chunk must be positive, got ", options.chunk);
  std::int64_t n = static_cast<std::int64_t>(data.size());
  if (options.max_bytes >= 0) n = std::min(n, options.max_bytes);
  require(n >= 2, "evaluate: need at least 2 bytes (the first is context only), got ", n);
  std::int64_t const inputs = n - 1;
  std::int64_t const chunk = std::min<std::int64_t>(options.chunk, inputs);
  DeviceState state(w.config(), 1, model.backend());
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(chunk)), targets(static_cast<std::size_t>(chunk));
  double nll = 0;
  for (std::int64_t start = 0; start < inputs; start += chunk) {
    std::int64_t const len = std::min(chunk, inputs - start);
    std::size_t const ulen = static_cast<std::size_t>(len);
    for (std::size_t i = 0; i < ulen; ++i) {
      tokens[i] = data[static_cast<std::size_t>(start) + i];
      targets[i] = data[static_cast<std::size_t>(start) + i + 1];
    }
    model.forward(w, std::span<std::int32_t const>(tokens.data(), ulen), 1, static_cast<int>(len), state);
    double const x = model.sum_nll(std::span<std::int32_t const>(targets.data(), ulen));
    require(std::isfinite(x), "evaluate: the model produced non-finite logits in bytes ", start + 1, "..",
            start + len);
    nll += x;
    if (options.progress) options.progress(start + len, inputs);
  }
  EvalResult r;
  r.bytes_predicted = inputs;
  r.nll_nats_sum = nll;
  r.bits_per_byte = nll / std::numbers::ln2 / static_cast<double>(inputs);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.bytes_per_second = r.seconds > 0 ? static_cast<double>(inputs) / r.seconds : 0.0;
  return r;
}

}  // namespace mambabyte::cuda
