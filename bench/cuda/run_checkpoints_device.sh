#!/usr/bin/env bash
# One device call: the scans at the training step's shapes with and without the forward's
# checkpoints (bench_cuda_scan --train-shapes --checkpoints, bf16), forward and backward, and
# the parent binary (bench_cuda_scan_parent, without the change) on the same shapes, twice,
# interleaved. Binaries carried in $BIN. Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
{
  for r in 1 2; do
    for v in bench_cuda_scan_parent bench_cuda_scan; do
      [[ -x $BIN/$v ]] || continue
      ck=""; [[ $v == bench_cuda_scan ]] && ck="--checkpoints"
      echo "== $v fwd round $r"
      timeout 200 "$BIN/$v" --bf16 --train-shapes $ck --reps ${REPS:-20} | grep -E "^bf16|auto"
      echo "== $v bwd round $r"
      timeout 300 "$BIN/$v" --bf16 --train-shapes --backward $ck --reps ${REPS:-20} | grep -E "^BWD"
    done
  done
} 2>&1 | tee "$O/checkpoints.log"
