#!/usr/bin/env bash
# One device call for the forward keeping the scan states for the backward
# (set_keep_scan_states / MixedScanArguments::checkpoints): every CUDA test program in full,
# memcheck + racecheck of the new cases (TESTS_ONLY=1 stops here), the CLI training with
# --keep-scan-states, then A/B in the same call, two rounds interleaved: bench_cuda_scan
# --train-shapes [--checkpoints] (this build) against bench_cuda_scan_parent, and
# bench_cuda_model TrainStep/bf16 (parent and this build) and TrainStepKeepStates/bf16 (this
# build) at 4 x 8192 and 1 x 8192 ($TRAIN_FILTER); SWEEP=1 also times every forward policy at
# the comparison shapes. Binaries carried in $BIN. Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  if [[ -z ${BENCH_ONLY:-} ]]; then
    for t in test_cuda_scan test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_scan_associative test_cuda_layers \
             test_cuda_step test_cuda_model; do
      [[ -x $BIN/$t ]] || continue
      echo "== $t"; timeout 240 "$BIN/$t" | tail -n 3; echo "rc=${PIPESTATUS[0]}"
    done
    for spec in "test_cuda_scan_backward|cuda scan backward: from the forward's states" \
                "test_cuda_scan_bf16|bf16 CUDA scan backward: from the forward's states" \
                "test_cuda_model|cuda model: keeping the scan states: the same loss bit for bit*"; do
      t=${spec%%|*}; c=${spec#*|}
      [[ -x $BIN/$t ]] || continue
      echo "== memcheck $t: $c"
      timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/$t" "$c" 2>&1 | tail -n 3
      echo "== racecheck $t: $c"
      timeout 240 compute-sanitizer --tool racecheck "$BIN/$t" "$c" 2>&1 | tail -n 2
    done
    if [[ -x $BIN/mambabyte ]]; then
      run=$O/cli_run
      echo "== mambabyte train --device cuda --keep-scan-states (bf16)"
      timeout 200 "$BIN/mambabyte" train --data data/tinyshakespeare.txt --val-fraction 0.1 --out "$run" --device cuda \
        --precision bf16 --d-model 256 --n-layer 6 --batch 16 --seq-len 256 --steps 200 --eval-every 100 \
        --keep-scan-states --no-progress 2>&1 | tail -n 4; echo "rc=${PIPESTATUS[0]}"
      rm -rf "$run"
    fi
  fi
  [[ -n ${TESTS_ONLY:-} ]] && exit 0
  if [[ -n ${SWEEP:-} ]]; then  # every forward policy at the comparison shapes (the Auto rule's evidence)
    echo "== bench_cuda_scan --bf16, every policy, comparison shapes"
    timeout 200 "$BIN/bench_cuda_scan" --bf16 --reps 10 | grep -E "^bf16"
  fi
  for r in 1 2; do
    for v in bench_cuda_scan_parent bench_cuda_scan ${SCAN_VARIANTS:-}; do
      [[ -x $BIN/$v ]] || continue
      ck="--checkpoints"; [[ $v == bench_cuda_scan_parent ]] && ck=""
      echo "== $v fwd round $r"
      timeout 120 "$BIN/$v" --bf16 --train-shapes $ck --reps 20 | grep -E "auto|chunked<256>"
      echo "== $v bwd round $r"
      timeout 200 "$BIN/$v" --bf16 --train-shapes --backward $ck --reps 20 | grep -E "auto"
    done
    for v in bench_cuda_model_parent bench_cuda_model; do
      [[ -x $BIN/$v ]] || continue
      f='^TrainStep/bf16/'; [[ $v == bench_cuda_model ]] && f='^TrainStep(KeepStates)?/bf16/'
      echo "== $v round $r"
      timeout 300 "$BIN/$v" --benchmark_filter="${TRAIN_FILTER:-$f}" 2>&1 | grep -E "^TrainStep"
    done
  done
} 2>&1 | tee "$O/scan_states.log"
