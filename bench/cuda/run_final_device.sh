#!/usr/bin/env bash
# One device call that verifies a build of every CUDA program before an issue note: each test
# program in full, compute-sanitizer on the persistent decode step (racecheck of "[race]" with
# every hazard counted by kernel, memcheck of the persistent cases), a short CLI run with
# --device cuda (train with $CLI_TRAIN_FLAGS, eval, generate), then bench_cuda_model's rows matching $BENCH_FILTER
# (default: every bf16 row); SKIP_SANITIZE=1 leaves the sanitizers out, SCAN_TABLES=1 adds the
# scan tables (Auto rows at the comparison shapes, fp32 and bf16, and the training shapes with the
# forward's states). Binaries prebuilt here and carried in $BIN (optionally gzipped), with
# libbenchmark. Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
source "$(dirname "$0")/device_sanitize_persistent.sh"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  for t in test_cuda_scan test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_scan_associative test_cuda_layers \
           test_cuda_step test_cuda_model; do
    [[ -x $BIN/$t ]] || continue
    echo "== $t"; timeout 240 "$BIN/$t" | tail -n 3; echo "rc=${PIPESTATUS[0]}"
  done
  if [[ -x $BIN/test_cuda_model && -z ${SKIP_SANITIZE:-} ]]; then
    sanitize_persistent
  fi
  if [[ -x $BIN/mambabyte ]]; then
    run=$O/cli_run
    echo "== mambabyte train --device cuda (bf16)"
    timeout 200 "$BIN/mambabyte" train --data data/tinyshakespeare.txt --val-fraction 0.1 --out "$run" --device cuda \
      --precision bf16 --d-model 256 --n-layer 6 --batch 16 --seq-len 256 --steps "${CLI_STEPS:-300}" --eval-every 100 \
      --no-progress ${CLI_TRAIN_FLAGS:-} 2>&1 | tail -n 6; echo "rc=${PIPESTATUS[0]}"
    echo "== eval --device cuda"
    timeout 60 "$BIN/mambabyte" eval --model "$run" --data data/tinyshakespeare.txt --max-bytes 200000 --device cuda --json
    echo "rc=$?"
    echo "== generate --device cuda"
    timeout 60 "$BIN/mambabyte" generate --model "$run" --prompt $'ROMEO:\n' -n 300 --temperature 0.8 --top-p 0.95 \
      --seed 1 --device cuda; echo "rc=$?"
    rm -rf "$run"
  fi
  if [[ -x $BIN/bench_cuda_scan && -n ${SCAN_TABLES:-} ]]; then  # the scan tables (docs/cuda.md), Auto rows
    for dt in bf16 fp32; do
      echo "== bench_cuda_scan --dtype $dt (forward, comparison shapes)"
      timeout 100 "$BIN/bench_cuda_scan" --dtype $dt --reps 10 | grep -E "auto|sequential|chunked<256>"
      echo "== bench_cuda_scan --dtype $dt --backward (comparison shapes)"
      timeout 150 "$BIN/bench_cuda_scan" --dtype $dt --backward --policy auto --reps 10 | grep -E "^BWD"
    done
    echo "== bench_cuda_scan --bf16 --train-shapes --checkpoints"
    timeout 100 "$BIN/bench_cuda_scan" --bf16 --train-shapes --checkpoints --reps 10 | grep -E "auto"
    timeout 150 "$BIN/bench_cuda_scan" --bf16 --train-shapes --backward --checkpoints --policy auto --reps 10 | grep -E "^BWD"
  fi
  if [[ -x $BIN/bench_cuda_model ]]; then
    echo "== bench_cuda_model ${BENCH_FILTER:-/bf16/}"
    timeout 400 "$BIN/bench_cuda_model" --benchmark_filter="${BENCH_FILTER:-/bf16/}" \
      --benchmark_out="$O/bench_cuda_model.json" --benchmark_out_format=json 2>&1 | grep -E "^(TrainStep|Prefill|Decode)"
    echo "rc=${PIPESTATUS[0]}"
  fi
} 2>&1 | tee "$O/final.log"
