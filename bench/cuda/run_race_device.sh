#!/usr/bin/env bash
# One device call: compute-sanitizer racecheck on the persistent-decode racecheck case
# (test_cuda_model "[race]"; also test_cuda_model_waitall when present: the same built with
# MAMBABYTE_DECODE_PERSISTENT_WAIT_ALL), hazards counted per kernel and the first ones shown;
# then (TESTS=1) the full test_cuda_model and (BENCH=...) a bench_cuda_model filter.
# Binaries prebuilt in $BIN (carried), logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
for t in test_cuda_model test_cuda_model_waitall; do
  [[ -x $BIN/$t ]] || continue
  echo "== racecheck $t [race]"
  timeout "${RACE_TIMEOUT:-300}" compute-sanitizer --tool racecheck --racecheck-report all --print-limit 200 \
    "$BIN/$t" "[race]" > "$O/race_$t.log" 2>&1
  echo "rc=$?"
  grep -E "RACECHECK SUMMARY|All tests passed|test cases:|assertions:" "$O/race_$t.log" | tail -n 4
  echo "hazard sites by kernel (both sides of each reported pair):"
  grep -oE "Thread \([0-9,]+\) at [A-Za-z_0-9:]+" "$O/race_$t.log" | sed -E 's/.* at //' | sort | uniq -c | sort -rn | head -n 8
  grep -m 3 -A 3 "Potential" "$O/race_$t.log" | grep -v "Host Frame"
done
if [[ ${TESTS:-0} == 1 ]]; then
  echo "== test_cuda_model"; timeout 120 "$BIN/test_cuda_model" | tail -n 3; echo "rc=${PIPESTATUS[0]}"
fi
if [[ -n ${BENCH:-} ]]; then
  echo "== bench_cuda_model $BENCH"
  timeout 300 "$BIN/bench_cuda_model" --benchmark_filter="$BENCH" \
    --benchmark_out="$O/bench_cuda_model.json" --benchmark_out_format=json; echo "rc=$?"
fi
