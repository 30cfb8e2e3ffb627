#!/usr/bin/env bash
# One device call for the persistent decode step at batch 5-8: test_cuda_model in full, racecheck
# of "[race]" (batch 1, 4, 8) and memcheck of the persistent cases, the CLI generating 8 samples
# at once on the GPU, then A/B rounds of the decode rows: the new binary's Decode (persistent up
# to batch 8) and DecodeFusedPDL (the persistent step not allowed: layer by layer above batch 4)
# against the parent's binary ($BIN/bench_cuda_model_old, if present) at batch 1 / 4. Logs under $OUT.
# BENCH_ONLY=1: only the benchmark rounds.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
source "$(dirname "$0")/device_sanitize_persistent.sh"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  if [[ -z ${BENCH_ONLY:-} ]]; then  # BENCH_ONLY=1: the benchmark rounds alone
  echo "== test_cuda_model"; timeout 300 "$BIN/test_cuda_model" | tail -n 3; echo "rc=${PIPESTATUS[0]}"
  sanitize_persistent
  if [[ -x $BIN/mambabyte ]]; then
    run=$O/cli_run
    echo "== mambabyte train --device cuda (bf16), generate --batch 8"
    timeout 200 "$BIN/mambabyte" train --data data/tinyshakespeare.txt --val-fraction 0.1 --out "$run" --device cuda \
      --precision bf16 --d-model 256 --n-layer 6 --batch 16 --seq-len 256 --steps 150 --eval-every 150 \
      --no-progress 2>&1 | tail -n 3; echo "rc=${PIPESTATUS[0]}"
    timeout 60 "$BIN/mambabyte" generate --model "$run" --prompt $'ROMEO:\n' -n 120 --temperature 0.8 --top-p 0.95 \
      --seed 1 --batch 8 --device cuda; echo "rc=$?"
    rm -rf "$run"
  fi
  fi
  for round in 1 2; do
    echo "== round $round: new"
    timeout 300 "$BIN/bench_cuda_model" --benchmark_filter='^Decode(FusedPDL)?/bf16/(1|4|5|8|16)/' \
      --benchmark_out="$O/bench_new_$round.json" --benchmark_out_format=json 2>&1 | grep -E "^Decode"
    if [[ -x $BIN/bench_cuda_model_old ]]; then
      echo "== round $round: parent"
      timeout 200 "$BIN/bench_cuda_model_old" --benchmark_filter='^Decode/bf16/(1|4)/' 2>&1 | grep -E "^Decode"
    fi
  done
} 2>&1 | tee "$O/log.txt"
