#!/usr/bin/env bash
# One device call for scan work: the scan test programs (full), then bench_cuda_scan for the
# forward and the backward in bf16 and fp32 (median of $REPS), then optionally (NCU=1) the
# instruction counts of the backward kernels at the first shape. Binaries prebuilt in $BIN
# (carried). Logs under $OUT (or /tmp).
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
REPS=${REPS:-10}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
  for t in ${TESTS:-test_cuda_scan test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_scan_associative test_cuda_step test_cuda_model}; do
    [[ -x $BIN/$t ]] || continue
    echo "== $t"; timeout 200 "$BIN/$t" | tail -n 4; echo "rc=${PIPESTATUS[0]}"
  done
  IFS=';' read -ra sets <<< "${SCAN_SETS:---bf16 --backward;--backward;--bf16;}"
  for args in "${sets[@]}"; do
    echo "== bench_cuda_scan $args"; timeout 150 "$BIN/bench_cuda_scan" $args --reps "$REPS"; echo "rc=$?"
  done
  if [[ ${NCU:-0} == 1 ]]; then
    for dt in --bf16 ""; do
      echo "== ncu backward $dt shape 0"
      timeout 120 ncu --clock-control none --kernel-name regex:bwd_ --launch-count 5 --section SpeedOfLight \
        --section Occupancy --section InstructionStats --section LaunchStats \
        "$BIN/bench_cuda_scan" --backward $dt --shape 0 --policy auto --reps 1 2>&1 |
        grep -E "^  void|Duration|Executed Instructions  |Registers Per|Achieved Occupancy|Issue Slots Busy"
    done
  fi
} 2>&1 | tee "$O/scan_device.log"
