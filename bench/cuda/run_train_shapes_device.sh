#!/usr/bin/env bash
# One device call: the scans at the training step's shapes ((4, 2048, 8192, 16) and
# (1, 2048, 8192, 16), bf16 storage), every policy, forward and backward (bench_cuda_scan
# --train-shapes), then, with NCU=1, the per-kernel times of the bf16 4 x 8192 training step
# (Nsight Compute gpu__time_duration of $NCU_COUNT launches, summarised by ncu_kernel_times.py).
# Binaries prebuilt here and carried in $BIN (bench_cuda_scan, bench_cuda_model). Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
HERE=$(cd "$(dirname "$0")" && pwd)
source "$(dirname "$0")/device_bin_env.sh"
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv
  echo "== scan forward, training shapes"
  timeout 200 "$BIN/bench_cuda_scan" --bf16 --train-shapes --reps ${REPS:-20}
  echo "== scan backward, training shapes"
  timeout 300 "$BIN/bench_cuda_scan" --bf16 --train-shapes --backward --reps ${REPS:-20}
  if [[ -n ${NCU:-} ]]; then
    echo "== ncu TrainStep/bf16/4/8192, ${NCU_COUNT:-1200} launches"
    timeout 400 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-count "${NCU_COUNT:-1200}" \
      "$BIN/bench_cuda_model" --benchmark_filter='^TrainStep/bf16/4/8192' > "$O/ncu_train.csv" 2> "$O/ncu_train.err"
    echo "rc=$?"; python3 "$HERE/ncu_kernel_times.py" "$O/ncu_train.csv" | head -45
  fi
} 2>&1 | tee "$O/train_shapes.log"
