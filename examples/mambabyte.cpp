// mambabyte: evaluate, generate with and inspect MambaByte (byte-level Mamba) models.
//
//   mambabyte eval     --model DIR --data FILE [--max-bytes N] [--json]
//   mambabyte generate --model DIR --prompt TEXT [-n N] [--temperature T] [--top-k K] [--top-p P]
//                      [--seed S] [--batch B]
//   mambabyte info     --model DIR
//   mambabyte ngram    --data FILE [--val-fraction F] [--order N]   (the baseline)
//   mambabyte train    --data FILE --out DIR [--steps N | --time-limit S] [--resume] ...
//
// Every command takes --threads N and --dtype float|double; eval, generate and train take --device
// auto|cpu|cuda[:N] and --precision bf16|fp32 (auto uses the GPU when there is one). Errors are one clear line on stderr
// and a non-zero exit status (CLI11's code for bad usage, 1 for everything else).
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "cli/common.hpp"
#include "cli/eval.hpp"
#include "cli/generate.hpp"
#include "cli/info.hpp"
#include "cli/ngram.hpp"
#include "cli/train.hpp"

namespace {

void add_model_options(CLI::App* cmd, mbcli::ModelOptions& m) {
  cmd->add_option("--model,-m", m.model_dir, "model directory (config.json + model.safetensors or pytorch_model.bin)")
      ->required();
  cmd->add_option("--threads,-t", m.threads, "CPU threads (0 = all cores)")->check(CLI::Range(0, 4096));
  cmd->add_option("--dtype", m.dtype, "compute dtype")->check(CLI::IsMember({"float", "double"}));
}

void add_device_options(CLI::App* cmd, std::string& device, std::string& precision) {
  cmd->add_option("--device", device,
                  "auto (a GPU when the program has the CUDA backend and one is present), cpu, cuda or cuda:N");
  cmd->add_option("--precision", precision, "on a GPU: bf16 (mixed precision: bf16 compute, fp32 master weights, "
                  "state and accumulators) or fp32")->check(CLI::IsMember({"bf16", "fp32"}));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mambabyte: token-free byte-level Mamba language models (MambaByte) in C++"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(MAMBABYTE_VERSION_STRING));

  mbcli::EvalCliOptions eval;
  auto* e = app.add_subcommand("eval", "bits per byte of a file under a model (state carried across the whole file)");
  add_model_options(e, eval.model);
  add_device_options(e, eval.model.device, eval.model.precision);
  e->add_option("--data,-d", eval.data, "text file to score")->required();
  e->add_option("--max-bytes", eval.max_bytes, "score only the first N bytes");
  e->add_option("--chunk", eval.chunk, "bytes per forward pass (memory vs speed)")->check(CLI::PositiveNumber);
  e->add_flag("--json", eval.json, "print one JSON object as the last line");
  e->add_flag("!--no-progress", eval.progress, "no progress line on stderr");
  e->add_option("--noise", eval.noise,
                "also score the text under synthetic noise, KIND[:P] with KIND in drop, repeat, antspeak, "
                "uppercase, randomcase, swap (repeatable): prints a clean-vs-noisy table");
  e->add_option("--noise-seed", eval.noise_seed, "seed of the noise");

  mbcli::GenerateCliOptions gen;
  auto* g = app.add_subcommand("generate", "sample text after a prompt, streamed");
  add_model_options(g, gen.model);
  add_device_options(g, gen.model.device, gen.model.precision);
  g->add_option("--prompt,-p", gen.prompt, "prompt text (raw bytes; at least one)")->required();
  g->add_option("-n,--bytes", gen.n, "bytes to generate per sample")->check(CLI::Range(0, 1 << 30));
  g->add_option("--temperature", gen.sampling.temperature, "0 = greedy")->check(CLI::Range(0.0, 1000.0));
  g->add_option("--top-k", gen.sampling.top_k, "keep the k most likely bytes (0 = all)")->check(CLI::Range(0, 1 << 30));
  g->add_option("--top-p", gen.sampling.top_p, "nucleus: keep the smallest set with probability >= p")
      ->check(CLI::Range(0.0, 1.0));
  g->add_option("--seed", gen.sampling.seed, "random seed (same seed, same text)");
  g->add_option("--batch,-b", gen.batch, "independent samples, decoded together")->check(CLI::PositiveNumber);
  g->add_flag("!--no-echo", gen.echo_prompt, "do not print the prompt before the sample");

  mbcli::TrainCliOptions train;
  auto* tr = app.add_subcommand("train", "train a MambaByte model on a byte corpus (CPU or GPU)");
  tr->add_option("--data,-d", train.data, "training text (any bytes)")->required();
  tr->add_option("--val-data", train.val_data, "validation text (default: the last --val-fraction of --data)");
  tr->add_option("--val-fraction", train.val_fraction, "validation share of --data when there is no --val-data")
      ->check(CLI::Range(0.001, 0.999));
  tr->add_option("--out,-o", train.out, "run directory: checkpoints, log.jsonl, curves.png")->required();
  auto* steps = tr->add_option("--steps", train.steps, "optimizer steps (default 2000, or what fits --time-limit)")
                    ->check(CLI::Range(std::int64_t(1), std::int64_t(1) << 40));
  tr->add_option("--time-limit", train.time_limit, "stop cleanly (and save) after this many seconds")
      ->check(CLI::Range(0.0, 1e9));
  tr->add_option("--seq-len", train.seq_len, "bytes per training window")->check(CLI::Range(1, 1 << 24));
  tr->add_option("--batch", train.batch, "windows per step")->check(CLI::Range(1, 1 << 16));
  tr->add_option("--lr", train.lr, "peak learning rate (AdamW, warmup + cosine)")->check(CLI::Range(1e-9, 10.0));
  tr->add_option("--d-model", train.d_model, "model width")->check(CLI::Range(1, 1 << 16));
  tr->add_option("--n-layer", train.n_layer, "Mamba blocks")->check(CLI::Range(1, 1024));
  tr->add_option("--d-state", train.d_state, "SSM state size")->check(CLI::Range(1, 1024));
  tr->add_flag("--rms-norm", train.rms_norm, "RMSNorm instead of LayerNorm");
  tr->add_option("--seed", train.seed, "seed of the initialisation and the data order");
  tr->add_option("--threads,-t", train.threads, "CPU threads (0 = all cores)")->check(CLI::Range(0, 4096));
  tr->add_option("--eval-every", train.eval_every, "validate and checkpoint every K steps (0 = at the end)")
      ->check(CLI::Range(std::int64_t(0), std::int64_t(1) << 40));
  tr->add_option("--eval-bytes", train.eval_bytes, "validation bytes to score (default: all)");
  tr->add_flag("--resume", train.resume, "continue the run in --out from its latest checkpoint (bit-exact)");
  tr->add_flag("!--no-progress", train.progress, "plain log lines instead of a progress bar");
  tr->add_option("--dtype", train.dtype, "training dtype on the CPU")->check(CLI::IsMember({"float", "double"}));
  add_device_options(tr, train.device, train.precision);
  tr->add_flag("--recompute-activations", train.recompute_activations,
               "on a GPU: recompute each layer's conv output and normed input in the backward instead of keeping "
               "them (less memory, a slower step)");
  tr->add_flag("--keep-scan-states", train.keep_scan_states,
               "on a GPU: keep every layer's scan states (every 4 steps) from the forward for the backward "
               "(more memory, a shorter backward; gradients equal to rounding, not bit for bit)");
  (void)steps;

  mbcli::NgramCliOptions ngram;
  auto* ng = app.add_subcommand("ngram", "baseline: bits per byte of a byte n-gram model on a validation split");
  ng->add_option("--data,-d", ngram.data, "text; the n-gram counts its training part")->required();
  ng->add_option("--val-data", ngram.val_data, "validation text (default: the last --val-fraction of --data)");
  ng->add_option("--val-fraction", ngram.val_fraction, "validation share of --data")->check(CLI::Range(0.001, 0.999));
  ng->add_option("--order", ngram.order, "largest context length in bytes (0..6)")->check(CLI::Range(0, 6));
  ng->add_flag("--json", ngram.json, "print one JSON object as the last line");

  mbcli::InfoOptions info;
  auto* i = app.add_subcommand("info", "configuration, parameter count, dtype and memory of a model");
  add_model_options(i, info.model);
  i->add_flag("--json", info.json, "print JSON");

  try {
    app.parse(argc, argv);
  } catch (CLI::ParseError const& err) {
    return app.exit(err);  // usage errors: message + non-zero code (help / version: 0)
  }
  try {
    if (*e) return mbcli::run_eval(eval);
    if (*g) return mbcli::run_generate(gen);
    if (*i) return mbcli::run_info(info);
    if (*tr) return mbcli::run_train(train);
    if (*ng) return mbcli::run_ngram(ngram);
  } catch (mambabyte::Error const& err) {
    std::fflush(stdout);
    std::fprintf(stderr, "mambabyte: error: %s\n", err.what());
    return 1;
  } catch (std::bad_alloc const&) {
    std::fflush(stdout);
    std::fprintf(stderr, "mambabyte: error: out of memory (try a smaller --chunk or --batch)\n");
    return 1;
  } catch (std::exception const& err) {
    std::fflush(stdout);
    std::fprintf(stderr, "mambabyte: error: %s\n", err.what());
    return 1;
  }
  return 1;
}
