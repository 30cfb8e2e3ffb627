/*! \file
 *  \brief CudaStepEngine: the Trainer's steps on one GPU (train::StepEngine<float>), mixed
 *         precision when S = __nv_bfloat16: fp32 master weights and AdamW moments on the
 *         device, bf16 weight copy refreshed inside the fused AdamW kernel, bf16 activations,
 *         fp32 accumulation and gradients (cuda::Model, model.cuh).
 *
 *  A step: zero the gradient, forward + backward (cuda::Model::launch_forward_backward), the
 *  squared global norm (deterministic sum in double), one host synchronisation to read the
 *  loss and the norm (the trainer logs them and stops on a non-finite value before anything is
 *  updated), then clip scale and fused AdamW (decay per tensor as train::AdamW; fp32 math).
 *  Every reduction is in a fixed order, so the same run on the same GPU is bitwise
 *  reproducible and a resumed run continues exactly (the checkpoint holds the fp32 master
 *  weights, both moments and the step count).
 */
#pragma once

#if !defined(__CUDACC__)
#error "backend/cuda headers need nvcc; include <mambabyte/cuda.hpp> from a .cu file"
#endif

#include <chrono>
#include <cmath>
#include <optional>
#include <string>

#include "mambabyte/backend/cuda/layers.cuh"
#include "mambabyte/backend/cuda/model.cuh"
#include "mambabyte/train/trainer.hpp"

namespace mambabyte::cuda {

template <class S = bf16, class ScanPolicy = scan::Auto>
class CudaStepEngine final : public train::StepEngine<float> {
 public:
  CudaStepEngine(ModelConfig const& config, backend::Cuda be)
      : be_(be), weights_(config, be), grads_(config, be), model_(be) {
    m_ = bc::DeviceBuffer<float>(weights_.size(), be);
    v_ = bc::DeviceBuffer<float>(weights_.size(), be);
    scalars_ = bc::DeviceBuffer<double>(2, be);
    scale_ = bc::DeviceBuffer<float>(1, be);
    std::vector<bc::AdamWSegment> segs;
    for (ParamInfo const& p : weights_.parameters()) segs.push_back({p.offset, p.numel, !p.no_weight_decay});
    plan_ = bc::AdamWPlan(segs, be);
    red_ws_ = bc::DeviceBuffer<std::byte>(std::max<std::size_t>(bc::reduce_workspace_bytes(weights_.size()), 16), be);
  }

  std::string name() const override {
    cudaDeviceProp prop{};
    (void)cudaGetDeviceProperties(&prop, be_.device);
    return "cuda:" + std::to_string(be_.device) + " (" + prop.name + ") " +
           (std::is_same_v<S, float> ? "fp32" : "bf16 mixed precision");
  }

  void load(ModelWeights<float> const& w, train::AdamW<float> const& opt) override {
    weights_.upload(w);
    require(opt.first_moment().size() == weights_.size(), "cuda engine: optimizer state of another layout");
    m_.copy_from_host(opt.first_moment().data(), weights_.size(), be_.stream);
    v_.copy_from_host(opt.second_moment().data(), weights_.size(), be_.stream);
    opt_ = opt.options();
    t_ = opt.step_count();
  }

  train::StepResult step(std::span<std::int32_t const> tokens, int batch, double lr, double clip) override {
    grads_.zero();
    model_.launch_forward_backward(weights_, tokens, batch, &grads_, 1.0);
    bc::sum_of_squares(be_, grads_.master_data(), grads_.size(), scalars_.data() + 1, red_ws_.data());
    MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(scalars_.data(), model_.loss_device(), sizeof(double),
                                         cudaMemcpyDeviceToDevice, be_.stream));
    double host[2] = {0, 0};
    scalars_.copy_to_host(host, 2, be_.stream);  // the step's one synchronisation
    train::StepResult r;
    r.loss = host[0] / static_cast<double>(static_cast<std::size_t>(batch) * (tokens.size() / batch - 1));
    r.grad_norm = std::sqrt(host[1]);
    if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) return r;  // nothing updated
    bc::clip_scale(be_, scalars_.data() + 1, static_cast<float>(clip), scale_.data());
    ++t_;
    double const c1 = 1 - std::pow(opt_.beta1, double(t_)), c2 = 1 - std::pow(opt_.beta2, double(t_));
    bf16* copy = nullptr;
    if constexpr (!std::is_same_v<S, float>) copy = weights_.compute_data();
    bc::adamw_step(be_, plan_, weights_.master_data(), grads_.master_data(), m_.data(), v_.data(), copy,
                   static_cast<float>(lr), static_cast<float>(opt_.beta1), static_cast<float>(opt_.beta2),
                   static_cast<float>(opt_.eps), static_cast<float>(opt_.weight_decay), static_cast<float>(c1),
                   static_cast<float>(c2), scale_.data());
    return r;
  }

  double time_step(std::span<std::int32_t const> tokens, int batch) override {
    auto const t0 = std::chrono::steady_clock::now();
    grads_.zero();
    (void)model_.forward_backward(weights_, tokens, batch, grads_);
    MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(be_.stream));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  void store(ModelWeights<float>& w, train::AdamW<float>& opt) override {
    weights_.download(w);
    m_.copy_to_host(opt.first_moment().data(), weights_.size(), be_.stream);
    v_.copy_to_host(opt.second_moment().data(), weights_.size(), be_.stream);
    opt.set_step_count(t_);
  }

  std::optional<EvalResult> evaluate(std::span<std::uint8_t const> data, EvalOptions const& o) override {
    return evaluate_bits_per_byte(model_, weights_, data, o);
  }

  std::size_t activation_bytes() const override { return model_.activation_bytes(); }
  std::int64_t step_count() const override { return t_; }

  DeviceWeights<S> const& weights() const { return weights_; }
  Model<S, ScanPolicy>& model() { return model_; }

 private:
  backend::Cuda be_;
  DeviceWeights<S> weights_;
  DeviceWeights<float> grads_;
  Model<S, ScanPolicy> model_;
  bc::DeviceBuffer<float> m_, v_, scale_;
  bc::DeviceBuffer<double> scalars_;
  bc::DeviceBuffer<std::byte> red_ws_;
  bc::AdamWPlan plan_;
  train::AdamWOptions opt_;
  std::int64_t t_ = 0;
};

}  // namespace mambabyte::cuda
