#!/usr/bin/env bash
# One device call for a change to the training step's kernels, measured against its parent in the
# same call (run-to-run spread across calls is ~2-4%). For every variant v in $VARIANTS (binaries
# prebuilt here and carried in $BIN, optionally gzipped: bench_cuda_model_$v, and when present
# bench_cuda_layers_$v, test_cuda_layers_$v, test_cuda_model_$v): the test programs, then the layer
# benchmarks and TrainStep/bf16 at 4 x 8192 and 1 x 8192 twice, variants interleaved; with
# SAN=<v> also compute-sanitizer memcheck and racecheck on test_cuda_layers_<v> "[small]".
# NCU=<v>: per-kernel times (Nsight Compute, gpu__time_duration) of $NCU_FILTER's launches
# $NCU_SKIP.. of bench_cuda_model_<v>, summarised by ncu_kernel_times.py. Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
HERE=$(cd "$(dirname "$0")" && pwd)
for f in "$BIN"/*.gz; do [[ -e $f ]] && gunzip -f "$f"; done
chmod +x "$BIN"/* 2>/dev/null
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{
  for v in ${VARIANTS:?set VARIANTS, e.g. \"parent new\"}; do
    for t in test_cuda_layers test_cuda_model; do
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
      echo "== train_$v"
      timeout 200 "$BIN/bench_cuda_model_$v" --benchmark_filter="${TRAIN_FILTER:-^TrainStep/bf16/}" 2>&1 | grep -E "^TrainStep"
    done
  done
  if [[ -n ${SAN:-} ]]; then
    t=$BIN/test_cuda_layers_$SAN
    echo "== memcheck [small] $SAN"
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$t" "[small]" > "$O/mem_$SAN.log" 2>&1
    echo "rc=$?"; tail -3 "$O/mem_$SAN.log"
    echo "== racecheck [small] $SAN"
    timeout 240 compute-sanitizer --tool racecheck "$t" "[small]" > "$O/race_$SAN.log" 2>&1
    echo "rc=$?"; tail -3 "$O/race_$SAN.log"
  fi
  if [[ -n ${NCU:-} ]]; then
    echo "== ncu $NCU ${NCU_FILTER:-} skip ${NCU_SKIP:-0}"
    timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip "${NCU_SKIP:-0}" \
      --launch-count "${NCU_COUNT:-300}" "$BIN/bench_cuda_model_$NCU" --benchmark_filter="${NCU_FILTER:?}" \
      > "$O/ncu_$NCU.csv" 2> "$O/ncu_$NCU.err"
    echo "rc=$?"; python3 "$HERE/ncu_kernel_times.py" "$O/ncu_$NCU.csv" | head -30
  fi
} 2>&1 | tee "$O/train_ab.log"
