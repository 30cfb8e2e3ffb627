#!/usr/bin/env bash
# Profiling helpers for one device call: SASS of the scan kernels and Nsight Compute reports
# (--clock-control none: the clocks are left alone) of the scan kernels of Sequential and Auto
# at the first bench shape: the main sections, then the stall reasons per issued instruction.
# Writes sass.txt and ncu.txt under $OUT (or /tmp).
set -u
BIN=${BIN:-build-cuda-scan/tests/cuda}
O=${OUT:-/tmp}
cuobjdump -sass "$BIN/bench_cuda_scan" > "$O/sass.txt" 2>&1
for pol in sequential auto; do
  timeout 120 ncu --clock-control none --kernel-name regex:scan_chunk --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section InstructionStats --section Occupancy --section SchedulerStats \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio \
    "$BIN/bench_cuda_scan" --shape 0 --policy "$pol" --reps 1
done > "$O/ncu.txt" 2>&1
echo "ncu rc=$?"; grep -E "scan_chunk<|Duration|Issue Slots Busy|Executed Ipc A|No Eligible|Achieved Occupancy|Executed Instructions  " "$O/ncu.txt" | head -40
