/*! \file
 *  \brief Trainer: autoregressive next-byte training of a MambaByte model on the CPU.
 *
 *  Each step draws `batch` windows of seq_len + 1 bytes (WindowSampler, counter-based),
 *  computes the mean cross-entropy and its gradient (TrainingModel), clips the global
 *  gradient norm, and applies AdamW with linear warmup + cosine decay. Every `eval_every`
 *  steps (and at the end) it scores the whole validation text with carried state
 *  (evaluate_bits_per_byte) and writes a checkpoint (train/checkpoint.hpp).
 *
 *  Determinism: with the same thread count, a run is a pure function of (data, options,
 *  seed); the checkpoint holds everything else (weights and moments exactly, the step, the
 *  schedule), so resuming at step s continues bit-exactly.
 */
#pragma once

#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mambabyte/decoding/evaluate.hpp"
#include "mambabyte/model/model.hpp"
#include "mambabyte/model/training.hpp"
#include "mambabyte/train/checkpoint.hpp"
#include "mambabyte/train/data.hpp"
#include "mambabyte/train/init.hpp"
#include "mambabyte/train/optimizer.hpp"

namespace mambabyte::train {

struct TrainerOptions {
  int seq_len = 256;
  int batch = 8;
  std::int64_t steps = 1000;      ///< total optimizer steps of the run (the schedule's length)
  double time_limit = 0;          ///< seconds of wall time for this invocation (0 = none)
  AdamWOptions adamw;             ///< adamw.lr is the peak learning rate
  double min_lr_ratio = 0.1;      ///< cosine decays to lr * min_lr_ratio
  std::int64_t warmup = 100;
  double grad_clip = 1.0;         ///< global-norm clipping threshold (0 = off)
  std::int64_t eval_every = 200;  ///< validation + checkpoint period in steps (0 = only at the end)
  std::int64_t eval_max_bytes = -1;  ///< bytes of the validation text to score (-1 = all)
  int eval_chunk = 2048;
  std::int64_t log_every = 10;
  std::uint64_t seed = 1;
  int keep_checkpoints = 2;

  void validate() const {
    require(seq_len >= 1, "--seq-len must be >= 1, got ", seq_len);
    require(batch >= 1, "--batch must be >= 1, got ", batch);
    require(steps >= 1, "--steps must be >= 1, got ", steps);
    require(time_limit >= 0 && std::isfinite(time_limit), "--time-limit must be >= 0 seconds");
    require(min_lr_ratio >= 0 && min_lr_ratio <= 1, "min lr ratio must be in [0, 1]");
    require(warmup >= 0, "warmup must be >= 0");
    require(grad_clip >= 0, "gradient clipping threshold must be >= 0");
    require(eval_every >= 0, "--eval-every must be >= 0");
    require(eval_chunk >= 1, "eval chunk must be >= 1");
    require(eval_max_bytes == -1 || eval_max_bytes >= 2, "--eval-bytes must be at least 2 (or -1 for all), got ",
            eval_max_bytes);
    require(log_every >= 1, "log period must be >= 1");
    require(keep_checkpoints >= 1, "keep at least one checkpoint");
    adamw.validate();
  }

  nlohmann::json to_json() const {
    return {{"seq_len", seq_len}, {"batch", batch}, {"steps", steps}, {"lr", adamw.lr}, {"beta1", adamw.beta1},
            {"beta2", adamw.beta2}, {"eps", adamw.eps}, {"weight_decay", adamw.weight_decay},
            {"min_lr_ratio", min_lr_ratio}, {"warmup", warmup}, {"grad_clip", grad_clip}, {"eval_every", eval_every},
            {"eval_max_bytes", eval_max_bytes}, {"eval_chunk", eval_chunk}, {"seed", seed}};
  }
  /// The options a checkpoint was trained with (what resume must keep identical).
  static TrainerOptions from_json(nlohmann::json const& j, TrainerOptions base) {
    try {
      base.seq_len = j.at("seq_len");
      base.batch = j.at("batch");
      base.steps = j.at("steps");
      base.adamw.lr = j.at("lr");
      base.adamw.beta1 = j.at("beta1");
      base.adamw.beta2 = j.at("beta2");
      base.adamw.eps = j.at("eps");
      base.adamw.weight_decay = j.at("weight_decay");
      base.min_lr_ratio = j.at("min_lr_ratio");
      base.warmup = j.at("warmup");
      base.grad_clip = j.at("grad_clip");
      base.eval_every = j.at("eval_every");
      base.eval_max_bytes = j.at("eval_max_bytes");
      base.eval_chunk = j.at("eval_chunk");
      base.seed = j.at("seed");
    } catch (nlohmann::json::exception const& e) {
      fail("trainer.json: bad or missing option: ", e.what());
    }
    return base;
  }
};

/// One optimizer step as reported to callbacks and the log.
struct StepStats {
  std::int64_t step = 0;        ///< steps done after this one
  double loss = 0;              ///< mean cross-entropy, nats per byte
  double bits_per_byte = 0;     ///< loss / ln 2
  double lr = 0;
  double grad_norm = 0;         ///< before clipping
  double bytes_per_second = 0;  ///< training bytes (batch * seq_len) per second of this step
  double elapsed = 0;           ///< seconds since this invocation started
};

struct EvalStats {
  std::int64_t step = 0;
  double bits_per_byte = 0;
  std::int64_t bytes = 0;
  double seconds = 0;
};

/// Why run() returned.
enum class StopReason { kDone, kTimeLimit, kInterrupted };

/// What one optimizer step of an engine reports.
struct StepResult {
  double loss = 0;       ///< mean cross-entropy (nats per byte)
  double grad_norm = 0;  ///< global gradient norm before clipping
};

/// Where a Trainer's steps run when they do not run on the CPU (e.g. a GPU:
/// backend/cuda/train_engine.cuh). The Trainer keeps the host weights and optimizer state
/// (checkpoints, resume); an engine keeps its own copies and writes them back on store().
/// An engine must be deterministic for resume to be exact, and must leave its weights
/// untouched by a step whose loss or gradient norm is not finite (the trainer then stops).
template <class T>
class StepEngine {
 public:
  virtual ~StepEngine() = default;
  /// Short description for logs ("cuda:0 bf16").
  virtual std::string name() const = 0;
  /// Take weights and optimizer state (moments and step count) from the host.
  virtual void load(ModelWeights<T> const& w, AdamW<T> const& opt) = 0;
  /// Loss and gradient of tokens (batch, seq_len + 1), global-norm clipping to `clip` (0 = off),
  /// then one AdamW update with learning rate lr.
  virtual StepResult step(std::span<std::int32_t const> tokens, int batch, double lr, double clip) = 0;
  /// Forward + backward only (nothing updated); returns its wall time in seconds.
  virtual double time_step(std::span<std::int32_t const> tokens, int batch) = 0;
  /// Write the engine's weights, moments and step count into the host objects.
  virtual void store(ModelWeights<T>& w, AdamW<T>& opt) = 0;
  /// Bits per byte on the engine's device from its current weights, or nullopt to let the
  /// trainer score the stored weights on the CPU.
  virtual std::optional<EvalResult> evaluate(std::span<std::uint8_t const>, EvalOptions const&) {
    return std::nullopt;
  }
  /// Bytes of activations and scratch of the last step.
  virtual std::size_t activation_bytes() const = 0;
  /// Optimizer steps taken (loaded + done here): the trainer's step counter while it runs.
  virtual std::int64_t step_count() const = 0;
};

template <class T, class ScanPolicy = scan::Auto>
class Trainer {
 public:
  struct Callbacks {
    std::function<void(StepStats const&)> on_step;
    std::function<void(EvalStats const&)> on_eval;
    std::function<void(std::filesystem::path const&)> on_checkpoint;
    /// Polled between steps; true stops the run cleanly (a checkpoint is written first).
    std::function<bool()> should_stop;
  };

  /// A fresh run: weights initialised from the seed (mamba_ssm init).
  Trainer(ModelConfig config, ByteCorpus train_data, std::optional<ByteCorpus> val_data, TrainerOptions opt,
          std::filesystem::path out, backend::Cpu be = {})
      : opt_(opt), out_(std::move(out)), be_(be), train_(std::move(train_data)), val_(std::move(val_data)),
        sampler_(opt.seed, opt.seq_len), tm_(be) {
    opt_.validate();
    config.finalize();
    check_data();
    weights_ = ModelWeights<T>(config);
    initialize_mamba(weights_, opt_.seed);
    optimizer_ = AdamW<T>(weights_.config(), opt_.adamw);
    grads_ = ModelWeights<T>(weights_.config());
  }

  /// Resume from OUT/latest: weights, moments, step and the original options (those that
  /// change the trajectory) come from the checkpoint; `time_limit`, `log_every` and
  /// `keep_checkpoints` from `opt`, as does a larger `steps` (to extend a finished run:
  /// the schedule then follows the new length).
  static Trainer resume(std::filesystem::path const& out, ByteCorpus train_data, std::optional<ByteCorpus> val_data,
                        TrainerOptions opt, backend::Cpu be = {}) {
    auto ck = load_checkpoint<T>(out, opt.adamw);
    require(ck.trainer_state.contains("options"), ck.directory.string(), "/trainer.json has no \"options\"");
    TrainerOptions o = TrainerOptions::from_json(ck.trainer_state["options"], opt);
    if (opt.steps > o.steps) o.steps = opt.steps;
    ck.optimizer.set_options(o.adamw);  // the run's own hyper-parameters, not the caller's
    // the same data, or the continuation would not be the same run
    std::uint64_t const want_size = ck.trainer_state.value("train_bytes", std::uint64_t(0));
    std::string const want_hash = ck.trainer_state.value("train_fingerprint", std::string());
    require(want_size == train_data.size() && (want_hash.empty() || want_hash == fingerprint(train_data)),
            "--resume: the training data differs from the run's (", train_data.name(), ": ", train_data.size(),
            " bytes; the checkpoint was trained on ", ck.trainer_state.value("train_data", std::string("?")), ": ",
            want_size, " bytes)");
    return Trainer(std::move(ck), std::move(train_data), std::move(val_data), o, out, be);
  }

  /// The weights as of the last sync() (every checkpoint and the end of run() sync).
  ModelWeights<T> const& weights() const { return weights_; }
  /// Direct access to the weights being trained (e.g. to start from pretrained values); set
  /// them before set_engine(), which copies them to the engine.
  ModelWeights<T>& mutable_weights() { return weights_; }

  /// Run the steps on `engine` (a GPU) instead of the CPU; it receives the current weights and
  /// optimizer state now. Null returns to the CPU (after a sync).
  void set_engine(std::unique_ptr<StepEngine<T>> engine) {
    sync();
    engine_ = std::move(engine);
    if (engine_) engine_->load(weights_, optimizer_);
  }
  StepEngine<T> const* engine() const { return engine_.get(); }
  /// Make weights() and the optimizer state current (copies them back from the engine).
  void sync() {
    if (engine_) engine_->store(weights_, optimizer_);
  }
  std::int64_t step() const { return engine_ ? engine_->step_count() : optimizer_.step_count(); }
  TrainerOptions const& options() const { return opt_; }
  std::vector<EvalStats> const& evals() const { return evals_; }
  /// Bytes of training activations of one step (measured by the training model).
  std::size_t activation_bytes() const { return engine_ ? engine_->activation_bytes() : tm_.activation_bytes(); }

  /// Wall time of one training step (forward + backward on step 0's windows, nothing updated):
  /// lets a caller size a run to a time budget before it starts.
  double time_one_step() {
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(opt_.batch) * (opt_.seq_len + 1));
    sampler_.fill(train_, 0, opt_.batch, tokens);
    if (engine_) return engine_->time_step(tokens, opt_.batch);
    auto const t = std::chrono::steady_clock::now();
    grads_.zero();
    tm_.forward_backward(weights_, tokens, opt_.batch, grads_);
    return seconds(t);
  }
  /// Change the schedule's length; only before the first step (the schedule is part of the
  /// trajectory that resume reproduces).
  void set_total_steps(std::int64_t steps) {
    require(step() == 0, "the number of steps can only be set before training starts");
    require(steps >= 1, "--steps must be >= 1");
    opt_.steps = steps;
    opt_.warmup = std::min(opt_.warmup, std::max<std::int64_t>(1, steps / 10));
  }

  /// Train until options().steps, the time limit or should_stop(); writes a checkpoint at
  /// every eval and before returning. A non-finite loss throws (naming the step) without
  /// touching the last good checkpoint.
  StopReason run(Callbacks const& cb = {}) {
    using clock = std::chrono::steady_clock;
    auto const t0 = clock::now();
    std::size_t const w = static_cast<std::size_t>(opt_.seq_len) + 1;
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(opt_.batch) * w);
    CosineSchedule const sched{opt_.adamw.lr, opt_.adamw.lr * opt_.min_lr_ratio, opt_.warmup, opt_.steps};
    StopReason reason = StopReason::kDone;
    bool dirty = false;  // steps since the last checkpoint
    while (step() < opt_.steps) {
      if (cb.should_stop && cb.should_stop()) { reason = StopReason::kInterrupted; break; }
      if (opt_.time_limit > 0 && seconds(t0) >= opt_.time_limit) { reason = StopReason::kTimeLimit; break; }
      auto const ts = clock::now();
      std::int64_t const s = step();
      sampler_.fill(train_, static_cast<std::uint64_t>(s), opt_.batch, tokens);
      double const lr = sched(s);
      double loss = 0, gnorm = 0;
      if (engine_) {
        StepResult const r = engine_->step(tokens, opt_.batch, lr, opt_.grad_clip);
        loss = r.loss;
        gnorm = r.grad_norm;
      } else {
        grads_.zero();
        loss = tm_.forward_backward(weights_, tokens, opt_.batch, grads_);
        if (std::isfinite(loss)) gnorm = clip_grad_norm(grads_.flat(), opt_.grad_clip);
      }
      require(std::isfinite(loss), "training diverged: the loss is ", loss, " at step ", s + 1,
              "; the last good checkpoint is kept in ", out_.string());
      require(std::isfinite(gnorm), "training diverged: the gradient norm is ", gnorm, " at step ", s + 1,
              "; the last good checkpoint is kept in ", out_.string());
      if (!engine_) optimizer_.step(weights_.flat(), std::span<T const>(grads_.flat()), lr);
      dirty = true;
      StepStats st;
      st.step = step();
      st.loss = loss;
      st.bits_per_byte = loss / std::log(2.0);
      st.lr = lr;
      st.grad_norm = gnorm;
      double const dt = seconds(ts);
      st.bytes_per_second = dt > 0 ? double(opt_.batch) * opt_.seq_len / dt : 0;
      st.elapsed = seconds(t0);
      if (cb.on_step) cb.on_step(st);
      if (opt_.eval_every > 0 && step() % opt_.eval_every == 0 && step() < opt_.steps) {
        evaluate(cb);
        checkpoint(cb);
        dirty = false;
      }
    }
    // the final score belongs to the final weights (also when the time limit ended the run;
    // an interrupted run skips it: Ctrl-C should not wait for an evaluation)
    bool const final_eval = step() >= opt_.steps || reason == StopReason::kTimeLimit;
    if (final_eval && (evals_.empty() || evals_.back().step != step())) evaluate(cb);
    if (dirty || !std::filesystem::exists(out_ / "latest")) checkpoint(cb);
    sync();
    return reason;
  }

  /// Bits per byte of the validation text (or of the training text when there is none) under
  /// the current weights, state carried across the whole text.
  EvalStats evaluate(Callbacks const& cb = {}) {
    ByteCorpus const& data = val_ ? *val_ : train_;
    EvalOptions eo;
    eo.chunk = opt_.eval_chunk;
    eo.max_bytes = opt_.eval_max_bytes;
    std::optional<EvalResult> on_engine;
    if (engine_) on_engine = engine_->evaluate(data.bytes(), eo);
    if (!on_engine) sync();
    EvalResult const r = on_engine ? *on_engine : evaluate_cpu(data, eo);
    EvalStats e{step(), r.bits_per_byte, r.bytes_predicted, r.seconds};
    evals_.push_back(e);
    if (cb.on_eval) cb.on_eval(e);
    return e;
  }

  std::filesystem::path checkpoint(Callbacks const& cb = {}) {
    sync();
    nlohmann::json st = {{"options", opt_.to_json()}, {"train_data", train_.name()}, {"train_bytes", train_.size()},
                         {"train_fingerprint", fingerprint(train_)}};
    if (val_) { st["val_data"] = val_->name(); st["val_bytes"] = val_->size(); }
    if (!evals_.empty()) st["val_bits_per_byte"] = evals_.back().bits_per_byte;
    auto p = save_checkpoint(out_, weights_, optimizer_, st, opt_.keep_checkpoints);
    if (cb.on_checkpoint) cb.on_checkpoint(p);
    return p;
  }

 private:
  EvalResult evaluate_cpu(ByteCorpus const& data, EvalOptions const& eo) const {
    Model<T, ScanPolicy> m(weights_, be_);
    return evaluate_bits_per_byte(m, data.bytes(), eo);
  }

  Trainer(LoadedCheckpoint<T> ck, ByteCorpus train_data, std::optional<ByteCorpus> val_data, TrainerOptions opt,
          std::filesystem::path out, backend::Cpu be)
      : opt_(opt), out_(std::move(out)), be_(be), train_(std::move(train_data)), val_(std::move(val_data)),
        sampler_(opt.seed, opt.seq_len), tm_(be) {
    opt_.validate();
    check_data();
    weights_ = std::move(ck.weights);
    optimizer_ = std::move(ck.optimizer);
    grads_ = ModelWeights<T>(weights_.config());
  }

  /// FNV-1a 64 of the data's size and first and last MiB (cheap, catches another file).
  static std::string fingerprint(ByteCorpus const& c) {
    std::uint64_t h = 0xcbf29ce484222325ull ^ c.size();
    auto mix = [&h](std::span<std::uint8_t const> s) {
      for (std::uint8_t b : s) { h ^= b; h *= 0x100000001b3ull; }
    };
    std::size_t const k = std::min<std::size_t>(c.size(), 1 << 20);
    mix(c.bytes().first(k));
    mix(c.bytes().last(k));
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    return buf;
  }

  void check_data() const {
    std::size_t const w = static_cast<std::size_t>(opt_.seq_len) + 1;
    require(train_.size() >= w, "training data '", train_.name(), "' has ", train_.size(),
            " bytes, fewer than one window of seq_len + 1 = ", w, ": use a smaller --seq-len or more data");
    if (val_) require(val_->size() >= 2, "validation data '", val_->name(), "' has fewer than 2 bytes");
  }

  static double seconds(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }

  TrainerOptions opt_;
  std::filesystem::path out_;
  backend::Cpu be_;
  ByteCorpus train_;
  std::optional<ByteCorpus> val_;
  WindowSampler sampler_;
  ModelWeights<T> weights_, grads_;
  AdamW<T> optimizer_;
  TrainingModel<T, ScanPolicy> tm_;
  std::unique_ptr<StepEngine<T>> engine_;
  std::vector<EvalStats> evals_;
};

}  // namespace mambabyte::train
