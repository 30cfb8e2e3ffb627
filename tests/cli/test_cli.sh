#!/usr/bin/env bash
# End-to-end checks of the `mambabyte` CLI on the golden checkpoints: results, exit codes and
# error messages. Usage: test_cli.sh <path-to-mambabyte> <golden-dir> <tmp-dir>
set -uo pipefail
bin=$1; golden=$2; tmp=$3
mkdir -p "$tmp"
fails=0
pass() { echo "ok   - $1"; }
bad() { echo "FAIL - $1"; fails=$((fails + 1)); }

# expect <name> <expected-status: 0 | nonzero> <regex on stdout+stderr> -- command...
expect() {
  local name=$1 want=$2 re=$3; shift 4
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [[ $want == 0 && $rc -ne 0 ]] || [[ $want == nonzero && $rc -eq 0 ]]; then
    bad "$name: exit status $rc"; echo "$out" | tail -5; return
  fi
  if [[ $rc -ge 128 ]]; then bad "$name: killed by a signal ($rc)"; return; fi
  if ! grep -Eq -- "$re" <<<"$out"; then bad "$name: output does not match /$re/"; echo "$out" | tail -5; return; fi
  pass "$name"
}

# eval: the JSON line's bits_per_byte equals the golden transcription's
out=$("$bin" eval --model "$golden/ssm_layernorm_bin" --data "$golden/text.txt" --json --dtype double --threads 1)
json=$(tail -n 1 <<<"$out")
bpb=$(sed -E 's/.*"bits_per_byte":([0-9.eE+-]+).*/\1/' <<<"$json")
# 8.645789 from tests/data/golden/README.md (metadata bits_per_byte_transcription, 17 digits there)
if awk -v v="$bpb" 'BEGIN { exit !(v > 8.6457885 && v < 8.6457895) }'; then pass "eval bits per byte = golden ($bpb)"
else bad "eval bits per byte $bpb != 8.645789"; fi
grep -q '"bytes":20' <<<"$json" && pass "eval --json reports 20 bytes" || bad "eval --json bytes: $json"
grep -q '"seconds":' <<<"$json" && pass "eval --json reports seconds" || bad "eval --json seconds"
# --max-bytes: 5 bytes read, 4 predicted
expect "eval --max-bytes" 0 '"bytes":4' -- "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --max-bytes 5 --json

# generate: greedy is deterministic and batch rows agree; a seed reproduces a sample
g1=$("$bin" generate -m "$golden/ssm_rms_tied" -p "Hi" -n 30 --temperature 0 --no-echo 2>/dev/null)
g2=$("$bin" generate -m "$golden/ssm_rms_tied" -p "Hi" -n 30 --temperature 0 --batch 3 --no-echo 2>/dev/null)
[[ $(grep -c "^--- sample" <<<"$g2") == 3 ]] && pass "generate --batch 3 prints 3 samples" || bad "generate --batch 3"
[[ $(sed -n 2p <<<"$g2") == "$g1" && $(sed -n 4p <<<"$g2") == "$g1" ]] && pass "greedy batch rows equal batch-1 greedy" || bad "greedy batch rows differ"
s1=$("$bin" generate -m "$golden/hf_odd" -p "x" -n 50 --seed 7 --top-k 20 --top-p 0.9 2>/dev/null | od -An -tx1)
s2=$("$bin" generate -m "$golden/hf_odd" -p "x" -n 50 --seed 7 --top-k 20 --top-p 0.9 2>/dev/null | od -An -tx1)
s3=$("$bin" generate -m "$golden/hf_odd" -p "x" -n 50 --seed 8 --top-k 20 --top-p 0.9 2>/dev/null | od -An -tx1)
[[ $s1 == "$s2" ]] && pass "same seed, same sample" || bad "same seed gave different samples"
[[ $s1 != "$s3" ]] && pass "different seed, different sample" || bad "different seeds gave the same sample"
# streamed output is valid UTF-8 even from a random model
if command -v iconv >/dev/null; then
  "$bin" generate -m "$golden/hf_default" -p "é" -n 300 --seed 1 2>/dev/null | iconv -f UTF-8 -t UTF-8 >/dev/null \
    && pass "generated text is valid UTF-8" || bad "generated text is not valid UTF-8"
fi

# info
expect "info" 0 'parameters +46400' -- "$bin" info -m "$golden/ssm_layernorm_bin"
expect "info --json" 0 '"naming":"transformers"' -- "$bin" info -m "$golden/hf_default" --json

# errors: clear message, non-zero status, never a crash
printf 'x' > "$tmp/one_byte.txt"
: > "$tmp/empty.txt"
mkdir -p "$tmp/notamodel"
expect "missing model" nonzero 'error: .*does not exist' -- "$bin" info -m "$tmp/nope"
expect "not a model dir" nonzero 'error: no config.json' -- "$bin" info -m "$tmp/notamodel"
expect "missing data" nonzero 'error: cannot open file' -- "$bin" eval -m "$golden/hf_default" -d "$tmp/nope.txt"
expect "one-byte data" nonzero 'at least 2 are needed' -- "$bin" eval -m "$golden/hf_default" -d "$tmp/one_byte.txt"
expect "empty data" nonzero 'error: .*empty' -- "$bin" eval -m "$golden/hf_default" -d "$tmp/empty.txt"
expect "empty prompt" nonzero 'prompt is empty' -- "$bin" generate -m "$golden/hf_default" -p ""
expect "bad top-p" nonzero 'top-p' -- "$bin" generate -m "$golden/hf_default" -p a --top-p 3
expect "bad threads" nonzero 'threads' -- "$bin" info -m "$golden/hf_default" --threads -2
expect "bad dtype" nonzero 'dtype' -- "$bin" info -m "$golden/hf_default" --dtype half
expect "unknown flag" nonzero 'frobnicate' -- "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --frobnicate
expect "no subcommand" nonzero 'subcommand' -- "$bin"
expect "--help" 0 'generate' -- "$bin" --help

# train: a few steps on a small text, resume, eval the result, and bad input
head -c 6000 "$golden/../../../data/tinyshakespeare.txt" > "$tmp/small.txt"
rm -rf "$tmp/run"
targs=(--data "$tmp/small.txt" --out "$tmp/run" --seq-len 32 --batch 2 --d-model 16 --n-layer 1 --d-state 4
       --eval-every 3 --eval-bytes 300 --threads 2 --no-progress)
expect "train 6 steps" 0 '"step":6' -- "$bin" train "${targs[@]}" --steps 6
[[ -L "$tmp/run/latest" && -f "$tmp/run/latest/model.safetensors" && -f "$tmp/run/latest/optimizer.safetensors" ]] \
  && pass "train wrote a checkpoint" || bad "no checkpoint after train"
[[ $(grep -c '"type":"train"' "$tmp/run/log.jsonl") == 6 ]] && pass "log.jsonl has 6 train lines" || bad "log.jsonl"
expect "train refuses to overwrite a run" nonzero 'already holds a training run' -- "$bin" train "${targs[@]}" --steps 6
expect "train --resume extends the run" 0 '"step":9' -- "$bin" train "${targs[@]}" --steps 9 --resume
[[ $(grep -c '"type":"train"' "$tmp/run/log.jsonl") == 9 ]] && pass "resumed log has 9 train lines" || bad "resumed log"
expect "train --resume without --steps keeps the run's length" 0 '"step":9' -- "$bin" train "${targs[@]}" --resume
head -c 7000 "$golden/../../../data/tinyshakespeare.txt" > "$tmp/other.txt"
expect "train --resume on other data" nonzero 'training data differs' -- "$bin" train "${targs[@]/$tmp\/small.txt/$tmp/other.txt}" --steps 12 --resume
expect "train --eval-bytes 1" nonzero 'eval-bytes' -- "$bin" train --data "$tmp/small.txt" --out "$tmp/run6" --eval-bytes 1
expect "eval a trained run dir" 0 'bits per byte' -- "$bin" eval -m "$tmp/run" -d "$tmp/small.txt" --max-bytes 500
expect "generate from a trained run" 0 '.' -- "$bin" generate -m "$tmp/run" -p "A" -n 20
printf 'abc' > "$tmp/tiny.txt"
expect "train on too little data" nonzero 'too small|fewer than one window' -- "$bin" train --data "$tmp/tiny.txt" --out "$tmp/run2"
expect "train on missing data" nonzero 'cannot open' -- "$bin" train --data "$tmp/none.txt" --out "$tmp/run3"
expect "train --resume without a run" nonzero 'no checkpoint' -- "$bin" train "${targs[@]/$tmp\/run/$tmp/run4}" --resume
expect "train into a file" nonzero 'cannot create output directory|not writable' -- "$bin" train --data "$tmp/small.txt" --out "$tmp/small.txt/x"
expect "train nonsense flag" nonzero 'seq-len' -- "$bin" train --data "$tmp/small.txt" --out "$tmp/run5" --seq-len 0

# --time-limit: stops cleanly, saves, and scores the final weights (a long --steps, so that the
# time limit, not a schedule fitted to a loaded machine, ends the run)
rm -rf "$tmp/runtl"
out=$("$bin" train --data "$tmp/small.txt" --out "$tmp/runtl" --seq-len 32 --batch 2 --d-model 16 --n-layer 1 --d-state 4 --eval-bytes 300 --threads 2 --no-progress --time-limit 2 --steps 1000000 --eval-every 0 2>/dev/null | tail -n 1)
final=$(sed -E 's/.*"step":([0-9]+).*/\1/' <<<"$out")
last_eval=$(grep '"type":"eval"' "$tmp/runtl/log.jsonl" | tail -n 1 | sed -E 's/.*"step":([0-9]+).*/\1/')
[[ $out == *'"stop":"time limit"'* && -n $final && $final == "$last_eval" && -L "$tmp/runtl/latest" ]] \
  && pass "--time-limit stops, saves and evaluates the final step ($final)" || bad "--time-limit: $out / last eval $last_eval"

# Ctrl-C saves a checkpoint and exits 130
rm -rf "$tmp/runint"
"$bin" train "${targs[@]/$tmp\/run/$tmp/runint}" --steps 100000 >"$tmp/int.out" 2>&1 &
pid=$!
for _ in $(seq 50); do grep -q '^step' "$tmp/int.out" 2>/dev/null && break; sleep 0.2; done
kill -INT $pid; wait $pid; rc=$?
[[ $rc == 130 && -L "$tmp/runint/latest" ]] && grep -q '"stop":"interrupted"' "$tmp/int.out" \
  && pass "SIGINT saves a checkpoint and exits 130" || { bad "SIGINT: rc $rc"; tail -3 "$tmp/int.out"; }

# --device: nonsense is refused; --device cpu always works; without a GPU (CI), --device cuda
# fails with a clear message (built without CUDA: how to build it; with CUDA: no device)
expect "--device bogus" nonzero 'device must be auto, cpu, cuda' -- "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --device bogus
expect "--device cuda:x" nonzero 'device must be auto, cpu, cuda' -- "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --device cuda:x
expect "--precision fp16" nonzero 'precision' -- "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --precision fp16
expect "--device cpu" 0 '"device":"cpu"' -- "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --device cpu --json
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  expect "--device cuda without a GPU" nonzero 'built without the CUDA backend|0 CUDA devices' -- \
    "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --device cuda
  expect "--device auto without a GPU runs on the CPU" 0 '"device":"cpu"' -- \
    "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --json
fi
expect "train --recompute-activations on the CPU" nonzero 'recompute-activations applies to training on a GPU' -- \
  "$bin" train -d "$golden/text.txt" --out "$tmp/recompute_cpu" --steps 1 --device cpu --recompute-activations
expect "train --keep-scan-states on the CPU" nonzero 'keep-scan-states applies to training on a GPU' -- \
  "$bin" train -d "$golden/text.txt" --out "$tmp/states_cpu" --steps 1 --device cpu --keep-scan-states
expect "--dtype double --device cuda" nonzero 'CPU only|without the CUDA backend|CUDA device' -- \
  "$bin" eval -m "$golden/hf_default" -d "$golden/text.txt" --dtype double --device cuda

# ngram baseline
expect "ngram" 0 '"best_bits_per_byte"' -- "$bin" ngram --data "$tmp/small.txt" --order 3 --json

echo "$fails failure(s)"
[[ $fails -eq 0 ]]
