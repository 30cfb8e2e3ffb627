// `mambabyte train --data FILE --out DIR`: train a MambaByte model from scratch (or --resume),
// with a progress bar, a JSON-lines log (DIR/log.jsonl), a PNG of the curves (DIR/curves.png,
// drawn by gnuplot when it is installed) and atomic checkpoints (DIR/latest).
#pragma once

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/common.hpp"
#include <mambabyte/train/trainer.hpp>

namespace mbcli {

struct TrainCliOptions {
  std::string data, val_data, out;
  double val_fraction = 0.05;  ///< used when there is no --val-data
  std::int64_t steps = 0;      ///< 0 = derived from --time-limit (or 2000 without one)
  double time_limit = 0;
  int seq_len = 256, batch = 8;
  double lr = 2e-3;
  int d_model = 128, n_layer = 4, d_state = 16, d_conv = 4, expand = 2;
  bool rms_norm = false;  ///< the paper's MambaByte uses LayerNorm
  std::uint64_t seed = 1;
  int threads = 0;
  std::int64_t eval_every = 200;
  std::int64_t eval_bytes = -1;
  bool resume = false;
  bool progress = true;
  std::string dtype = "float";
  std::string device = "auto";      ///< auto | cpu | cuda | cuda:N
  std::string precision = "bf16";   ///< on a GPU: bf16 (mixed) or fp32
  bool recompute_activations = false;  ///< on a GPU: recompute conv / norm outputs in the backward
  bool keep_scan_states = false;       ///< on a GPU: the forward keeps the scan states for the backward
};

namespace detail {

inline std::atomic<int> g_signal{0};
extern "C" inline void on_signal(int sig) { g_signal.store(sig); }

inline std::string eta_string(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  long const t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

/// Keep only the log lines of steps <= `step` (a resumed run rewrites what came after).
inline void truncate_log(std::filesystem::path const& log, std::int64_t step) {
  std::ifstream in(log);
  if (!in) return;
  std::vector<std::string> keep;
  std::string line;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      if (j.value("step", std::int64_t(0)) <= step) keep.push_back(line);
    } catch (...) {
      // a torn last line from a kill: drop it
    }
  }
  in.close();
  std::ofstream out(log, std::ios::trunc);
  for (auto const& l : keep) out << l << "\n";
}

/// Draw DIR/curves.png from DIR/log.jsonl with gnuplot; false (and a note) when it can't.
inline bool plot_curves(std::filesystem::path const& dir) {
  std::ifstream in(dir / "log.jsonl");
  std::ofstream tr(dir / "train_curve.tsv"), va(dir / "val_curve.tsv");
  std::string line;
  int n_val = 0;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      if (j.value("type", "") == "train") tr << j["step"] << "\t" << j["bits_per_byte"].get<double>() << "\n";
      if (j.value("type", "") == "eval") { va << j["step"] << "\t" << j["val_bits_per_byte"].get<double>() << "\n"; ++n_val; }
    } catch (...) {
    }
  }
  tr.close();
  va.close();
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    std::fprintf(stderr, "note: gnuplot is not installed; curves left in %s/*.tsv\n", dir.string().c_str());
    return false;
  }
  std::ofstream gp(dir / "curves.gp");
  gp << "set terminal pngcairo size 900,540 enhanced font ',11'\n"
     << "set output '" << (dir / "curves.png").string() << "'\n"
     << "set title 'MambaByte training'\nset xlabel 'step'\nset ylabel 'bits per byte'\nset grid\nset key top right\n"
     << "plot '" << (dir / "train_curve.tsv").string() << "' using 1:2 with lines lw 1 lc rgb '#8fb3d9' title 'train (batch)', \\\n"
     << "     '" << (dir / "train_curve.tsv").string() << "' using 1:2 smooth bezier lw 2 lc rgb '#1f4e79' title 'train (smoothed)'";
  if (n_val > 0)
    gp << ", \\\n     '" << (dir / "val_curve.tsv").string() << "' using 1:2 with linespoints lw 2 pt 7 lc rgb '#c0392b' title 'validation'";
  gp << "\n";
  gp.close();
  std::string const cmd = "gnuplot '" + (dir / "curves.gp").string() + "' 2>/dev/null";
  if (std::system(cmd.c_str()) != 0) {
    // pngcairo may be missing in gnuplot-nox builds: fall back to the plain png terminal
    std::string const fb = "sed -i \"s/pngcairo size 900,540 enhanced font ',11'/png size 900,540/\" '" +
                           (dir / "curves.gp").string() + "' && " + cmd;
    if (std::system(fb.c_str()) != 0) {
      std::fprintf(stderr, "note: gnuplot failed; curves left in %s/*.tsv\n", dir.string().c_str());
      return false;
    }
  }
  return true;
}

}  // namespace detail

template <class T>
int run_train_typed(TrainCliOptions const& o) {
  namespace fs = std::filesystem;
  using namespace mambabyte::train;
  require(!o.out.empty(), "--out is required");
  require(o.steps >= 0, "--steps must be >= 0");
  backend::Cpu const be = make_backend(ModelOptions{"", o.dtype, o.threads});
  DeviceChoice const dev = resolve_device(o.device, o.dtype, o.precision);
  require(!o.recompute_activations || dev.cuda,
          "--recompute-activations applies to training on a GPU (the CPU step always recomputes them); "
          "this run trains on the CPU");
  require(!o.keep_scan_states || dev.cuda,
          "--keep-scan-states applies to training on a GPU (the CPU backward recomputes the scan states); "
          "this run trains on the CPU");

  // data
  ByteCorpus all = ByteCorpus::from_file(o.data);
  ByteCorpus train_data = all;
  std::optional<ByteCorpus> val_data;
  if (!o.val_data.empty()) {
    val_data = ByteCorpus::from_file(o.val_data);
  } else {
    auto [tr, va] = all.split(o.val_fraction);
    train_data = tr;
    val_data = va;
  }

  TrainerOptions to;
  to.seq_len = o.seq_len;
  to.batch = o.batch;
  // fresh run: --steps or 2000 (or what fits --time-limit, below); resume: 0 keeps the
  // checkpoint's schedule, a larger --steps extends it
  to.steps = o.steps > 0 ? o.steps : (o.resume ? 0 : 2000);
  to.time_limit = o.time_limit;
  to.adamw.lr = o.lr;
  to.warmup = std::min<std::int64_t>(100, std::max<std::int64_t>(1, to.steps / 10));  // (resume keeps its own)
  to.eval_every = o.eval_every;
  to.eval_max_bytes = o.eval_bytes;
  to.seed = o.seed;

  fs::path const out(o.out);
  std::error_code ec;
  fs::create_directories(out, ec);
  require(!ec && fs::is_directory(out), "cannot create output directory ", out.string(),
          ec ? ": " + ec.message() : std::string());
  {  // writable?
    std::ofstream probe(out / ".write_test");
    require(static_cast<bool>(probe), "output directory ", out.string(), " is not writable");
  }
  fs::remove(out / ".write_test", ec);

  bool const has_ckpt = fs::exists(out / "latest");
  std::optional<Trainer<T>> trainer;
  if (o.resume) {
    require(has_ckpt, "--resume: no checkpoint in ", out.string(), " (expected ", (out / "latest").string(), ")");
    trainer.emplace(Trainer<T>::resume(out, train_data, val_data, to, be));
    detail::truncate_log(out / "log.jsonl", trainer->step());
    std::fprintf(stderr, "resuming %s at step %lld of %lld\n", out.string().c_str(),
                 static_cast<long long>(trainer->step()), static_cast<long long>(trainer->options().steps));
  } else {
    require(!has_ckpt, out.string(), " already holds a training run: pass --resume to continue it, or choose another --out");
    ModelConfig c;
    c.d_model = o.d_model;
    c.n_layer = o.n_layer;
    c.d_state = o.d_state;
    c.d_conv = o.d_conv;
    c.expand = o.expand;
    c.rms_norm = o.rms_norm;
    c.tie_embeddings = false;  // MambaByte: untied head
    c.vocab_size = 256;
    c.pad_vocab_size_multiple = 1;
    trainer.emplace(c, train_data, val_data, to, out, be);
    std::ofstream(out / "log.jsonl", std::ios::trunc);
  }
  Trainer<T>& tr = *trainer;
  if (dev.cuda) {
    if constexpr (std::is_same_v<T, float>) tr.set_engine(make_cuda_engine(tr.weights().config(), o.precision, dev.index, o.recompute_activations,
                                                                 o.keep_scan_states));
  }
  if (!o.resume && o.steps == 0 && o.time_limit > 0) {
    // size the schedule to the budget: time a step (twice: the first warms caches), leave
    // room for the evaluations
    tr.time_one_step();
    double const per_step = tr.time_one_step();
    auto const est = static_cast<std::int64_t>(0.85 * o.time_limit / std::max(per_step, 1e-6));
    tr.set_total_steps(std::max<std::int64_t>(est, 1));
  }
  ModelConfig const& c = tr.weights().config();
  std::fprintf(stderr,
               "model: d_model %d, %d layers, d_state %d, %s parameters (%s); data: %zu train / %zu validation bytes\n"
               "batch %d x %d bytes, %lld steps, lr %.2g, %s%s; on %s\n",
               c.d_model, c.n_layer, c.d_state, human_count(double(c.parameter_count())).c_str(),
               (tr.engine() ? o.precision : o.dtype).c_str(), train_data.size(), val_data ? val_data->size() : 0, tr.options().batch,
               tr.options().seq_len, static_cast<long long>(tr.options().steps), tr.options().adamw.lr,
               o.time_limit > 0 ? "time limit " : "no time limit",
               o.time_limit > 0 ? (std::to_string(static_cast<long long>(o.time_limit)) + " s").c_str() : "",
               tr.engine() ? tr.engine()->name().c_str() : "the CPU");

  std::ofstream log(out / "log.jsonl", std::ios::app);
  bool const tty = o.progress && stderr_is_terminal();
  std::int64_t const start_step = tr.step();
  double ema_bps = 0;
  double last_loss_bpb = 0;
  auto const t0 = std::chrono::steady_clock::now();

  typename Trainer<T>::Callbacks cb;
  cb.on_step = [&](StepStats const& s) {
    last_loss_bpb = s.bits_per_byte;
    ema_bps = ema_bps == 0 ? s.bytes_per_second : 0.9 * ema_bps + 0.1 * s.bytes_per_second;
    log << nlohmann::json{{"type", "train"}, {"step", s.step}, {"loss", s.loss}, {"bits_per_byte", s.bits_per_byte},
                          {"lr", s.lr}, {"grad_norm", s.grad_norm}, {"bytes_per_second", s.bytes_per_second},
                          {"elapsed", s.elapsed}}.dump()
        << "\n";
    std::int64_t const total = tr.options().steps;
    double const per_step = s.elapsed / double(s.step - start_step);
    double eta = per_step * double(total - s.step);
    if (o.time_limit > 0) eta = std::min(eta, o.time_limit - s.elapsed);
    if (tty) {
      int const width = 24;
      int const fill = static_cast<int>(width * double(s.step) / double(total));
      std::string bar(static_cast<std::size_t>(fill), '=');
      if (fill < width) bar += '>';
      bar.resize(width, ' ');
      std::fprintf(stderr, "\r\033[Kstep %lld/%lld [%s] loss %.3f bpb | %.1f KB/s | ETA %s",
                   static_cast<long long>(s.step), static_cast<long long>(total), bar.c_str(), s.bits_per_byte,
                   ema_bps / 1e3, detail::eta_string(eta).c_str());
    } else if (s.step % tr.options().log_every == 0 || s.step == total) {
      std::fprintf(stderr, "step %lld/%lld loss %.4f bpb lr %.2e |g| %.3f %.1f KB/s ETA %s\n",
                   static_cast<long long>(s.step), static_cast<long long>(total), s.bits_per_byte, s.lr, s.grad_norm,
                   ema_bps / 1e3, detail::eta_string(eta).c_str());
    }
  };
  cb.on_eval = [&](EvalStats const& e) {
    log << nlohmann::json{{"type", "eval"}, {"step", e.step}, {"val_bits_per_byte", e.bits_per_byte},
                          {"bytes", e.bytes}, {"seconds", e.seconds}}.dump()
        << std::endl;
    std::fprintf(stderr, "%sstep %lld: validation %.4f bits/byte (%lld bytes, %.1f s)\n", tty ? "\r\033[K" : "",
                 static_cast<long long>(e.step), e.bits_per_byte, static_cast<long long>(e.bytes), e.seconds);
  };
  cb.on_checkpoint = [&](fs::path const& p) {
    log.flush();
    if (!tty) std::fprintf(stderr, "saved %s\n", p.string().c_str());
  };
  cb.should_stop = [] { return detail::g_signal.load() != 0; };

  detail::g_signal.store(0);
  auto const old_int = std::signal(SIGINT, detail::on_signal);
  auto const old_term = std::signal(SIGTERM, detail::on_signal);
  StopReason reason;
  try {
    reason = tr.run(cb);
  } catch (...) {
    std::signal(SIGINT, old_int);
    std::signal(SIGTERM, old_term);
    if (tty) std::fprintf(stderr, "\n");
    throw;
  }
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  if (tty) std::fprintf(stderr, "\n");
  log.close();
  bool const plotted = detail::plot_curves(out);

  double const secs = seconds_since(t0);
  double const val = tr.evals().empty() ? std::nan("") : tr.evals().back().bits_per_byte;
  char const* why = reason == StopReason::kDone ? "done" : reason == StopReason::kTimeLimit ? "time limit" : "interrupted";
  std::fprintf(stderr, "%s at step %lld after %.1f s; checkpoint %s%s\n", why, static_cast<long long>(tr.step()), secs,
               (out / "latest").string().c_str(), plotted ? ("; curves " + (out / "curves.png").string()).c_str() : "");
  nlohmann::json j = {{"step", tr.step()},
                      {"stop", why},
                      {"train_bits_per_byte", last_loss_bpb},
                      {"seconds", secs},
                      {"checkpoint", fs::canonical(out / "latest").string()},
                      {"activation_bytes", tr.activation_bytes()},
                      {"device", tr.engine() ? tr.engine()->name() : std::string("cpu")}};
  if (std::isfinite(val)) j["val_bits_per_byte"] = val;
  std::cout << j.dump() << std::endl;
  return reason == StopReason::kInterrupted ? 130 : 0;
}

inline int run_train(TrainCliOptions const& o) {
  if (o.dtype == "float") return run_train_typed<float>(o);
  if (o.dtype == "double") return run_train_typed<double>(o);
  fail("--dtype must be float or double, got \"", o.dtype, "\"");
}

}  // namespace mbcli
