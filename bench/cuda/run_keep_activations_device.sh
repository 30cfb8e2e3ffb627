#!/usr/bin/env bash
# One device call for keep_activations (the training step keeps each layer's conv output u and
# normed input for the backward; binaries prebuilt here, carried in $BIN, optionally gzipped,
# with libbenchmark; logs under $OUT): test_cuda_layers and test_cuda_model in full (the model
# tests check a kept step bitwise equal to a recomputing one), memcheck of that case, a short CLI
# run with --device cuda with and without --recompute-activations, then TrainStep against
# TrainStepRecompute (and the decode rows) in the same call.
# ROUNDS (default 2): how many times the benchmark rows run (A and B interleaved in each).
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  for t in test_cuda_layers test_cuda_model; do
    [[ -x $BIN/$t ]] || continue
    echo "== $t"; timeout 300 "$BIN/$t" | tail -n 3; echo "rc=${PIPESTATUS[0]}"
  done
  echo "== memcheck test_cuda_model *keeps activations*"
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_model" "*keeps activations*" > "$O/mem_keep.log" 2>&1
  echo "rc=$?"; tail -n 3 "$O/mem_keep.log"
  if [[ -x $BIN/mambabyte ]]; then
    for extra in "" "--recompute-activations"; do
      run=$O/cli_run
      echo "== mambabyte train --device cuda $extra"
      timeout 200 "$BIN/mambabyte" train --data data/tinyshakespeare.txt --val-fraction 0.1 --out "$run" --device cuda \
        --precision bf16 --d-model 256 --n-layer 6 --batch 16 --seq-len 256 --steps 200 --eval-every 100 \
        --no-progress $extra 2>&1 | tail -n 4; echo "rc=${PIPESTATUS[0]}"
      echo "== generate --device cuda --batch 8"
      timeout 60 "$BIN/mambabyte" generate --model "$run" --prompt $'ROMEO:\n' -n 120 --temperature 0.8 --top-p 0.95 \
        --seed 1 --batch 8 --device cuda 2>&1 | tail -n 4; echo "rc=${PIPESTATUS[0]}"
      rm -rf "$run"
    done
  fi
  if [[ -x $BIN/bench_cuda_model ]]; then
    f=${BENCH_FILTER:-'^(TrainStep|TrainStepRecompute)/bf16/(1|4)/8192|^Decode/bf16/'}
    for r in $(seq 1 "${ROUNDS:-2}"); do
      echo "== bench_cuda_model round $r: $f"
      timeout 500 "$BIN/bench_cuda_model" --benchmark_filter="$f" \
        --benchmark_out="$O/bench_cuda_model_r$r.json" --benchmark_out_format=json 2>&1 | grep -E "^(Train|Prefill|Decode)"
      echo "rc=${PIPESTATUS[0]}"
    done
  fi
} 2>&1 | tee "$O/keep_activations.log"
