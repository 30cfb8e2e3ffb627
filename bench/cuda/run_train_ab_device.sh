#!/usr/bin/env bash
# One device call for a change to the training step's kernels, measured against its parent in the
# same call (run-to-run spread across calls is ~2-4%). For every variant v in $VARIANTS (binaries
# prebuilt here and carried in $BIN, optionally gzipped: bench_cuda_model_$v, and when present
# bench_cuda_layers_$v, test_cuda_{layers,step,model}_$v): the test programs, then the layer
# benchmarks and the model benchmarks matching $BENCH_FILTER (default TrainStep/bf16 at 4 x 8192
# and 1 x 8192) twice, variants interleaved; with SAN=<v> also compute-sanitizer memcheck and
# racecheck on the "[small]" cases of each of $SAN_TESTS (default test_cuda_layers) _<v>.
# NCU=<v>: per-kernel times (Nsight Compute, gpu__time_duration) of $NCU_FILTER's launches
# $NCU_SKIP.. of bench_cuda_model_<v>, summarised by ncu_kernel_times.py. Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
HERE=$(cd "$(dirname "$0")" && pwd)
source "$(dirname "$0")/device_bin_env.sh"
{
  for v in ${VARIANTS:?set VARIANTS, e.g. \"parent new\"}; do
    for t in test_cuda_layers test_cuda_step test_cuda_model; do
      if [[ -x $BIN/${t}_$v ]]; then
        echo "== ${t}_$v"; timeout 200 "$BIN/${t}_$v" | tail -3
      fi
    done
  done
  for r in 1 2; do
    for v in $VARIANTS; do
      if [[ -x $BIN/bench_cuda_layers_$v ]]; then
        echo "== layers_$v"
        timeout 100 "$BIN/bench_cuda_layers_$v" 2>&1 | grep -E "^(Conv|AddNorm)"
      fi
    done
    for v in $VARIANTS; do
      echo "== model_$v"
      timeout 200 "$BIN/bench_cuda_model_$v" --benchmark_filter="${BENCH_FILTER:-^TrainStep/bf16/}" 2>&1 |
        grep -E "^(TrainStep|Prefill|Decode)"
    done
  done
  if [[ -n ${SAN:-} ]]; then
    for t in ${SAN_TESTS:-test_cuda_layers}; do
      x=$BIN/${t}_$SAN
      echo "== memcheck [small] ${t}_$SAN"
      timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$x" "[small]" > "$O/mem_$t.log" 2>&1
      echo "rc=$?"; tail -3 "$O/mem_$t.log"
      echo "== racecheck [small] ${t}_$SAN"
      timeout 240 compute-sanitizer --tool racecheck "$x" "[small]" > "$O/race_$t.log" 2>&1
      echo "rc=$?"; tail -3 "$O/race_$t.log"
    done
  fi
  if [[ -n ${NCU:-} ]]; then
    echo "== ncu $NCU ${NCU_FILTER:-} skip ${NCU_SKIP:-0}"
    timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip "${NCU_SKIP:-0}" \
      --launch-count "${NCU_COUNT:-300}" "$BIN/bench_cuda_model_$NCU" --benchmark_filter="${NCU_FILTER:?}" \
      > "$O/ncu_$NCU.csv" 2> "$O/ncu_$NCU.err"
    echo "rc=$?"; python3 "$HERE/ncu_kernel_times.py" "$O/ncu_$NCU.csv" | head -30
  fi
} 2>&1 | tee "$O/train_ab.log"
