#!/usr/bin/env bash
# One device call for a change to the scan kernels, measured against its parent in the same call
# (run-to-run spread across device calls is ~4%): the scan test programs, then every variant of
# bench_cuda_scan named in $VARIANTS (files in $BIN, e.g. "bench_cuda_scan_head bench_cuda_scan")
# on each set of $SCAN_SETS, variants interleaved set by set, then (SAN=1) compute-sanitizer
# memcheck and racecheck on the [small] backward cases, then (NCU=1) Nsight Compute's duration,
# instruction count and occupancy of the backward kernels at the first shape for each variant.
# Binaries prebuilt here and carried in $BIN. Logs under $OUT (or /tmp). A set must not be empty
# (read -a drops a trailing empty field): the fp32 forward is "--dtype fp32".
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
REPS=${REPS:-10}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
  for t in ${TESTS:-test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_scan_associative test_cuda_model}; do
    [[ -x $BIN/$t ]] || continue
    echo "== $t"; timeout 200 "$BIN/$t" | tail -n 4; echo "rc=${PIPESTATUS[0]}"
  done
  IFS=';' read -ra sets <<< "${SCAN_SETS:---bf16 --backward;--backward}"
  for args in "${sets[@]}"; do
    for v in ${VARIANTS:-bench_cuda_scan}; do
      echo "== $v $args"; timeout 150 "$BIN/$v" $args --reps "$REPS"; echo "rc=$?"
    done
  done
  if [[ ${SAN:-0} == 1 ]]; then
    for t in ${SAN_TESTS:-test_cuda_scan_backward test_cuda_scan_bf16}; do
      for tool in memcheck racecheck; do
        echo "== $tool $t [backward][small]"
        timeout ${SAN_TIMEOUT:-90} compute-sanitizer --tool $tool --error-exitcode 9 "$BIN/$t" "[backward][small]" \
          > "$O/san_${tool}_$t.log" 2>&1
        echo "rc=$?"; tail -n 3 "$O/san_${tool}_$t.log"
      done
    done
  fi
  if [[ ${NCU:-0} == 1 ]]; then
    for v in ${VARIANTS:-bench_cuda_scan}; do
      echo "== ncu $v --backward --bf16 shape 0"
      timeout 120 ncu --clock-control none --kernel-name regex:bwd_ --launch-count 5 --section SpeedOfLight \
        --section Occupancy --section InstructionStats --section LaunchStats \
        "$BIN/$v" --backward --bf16 --shape 0 --policy auto --reps 1 2>&1 |
        grep -E "^  void|Duration|Executed Instructions  |Registers Per|Achieved Occupancy|Issue Slots Busy"
    done
  fi
} 2>&1 | tee "$O/scan_ab.log"
