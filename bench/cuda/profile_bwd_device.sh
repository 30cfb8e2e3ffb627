#!/usr/bin/env bash
# Nsight Compute on the scan backward (one device call; --clock-control none leaves the clocks
# alone). For each bench_cuda_scan variant in $VARIANTS (carried in $BIN): every backward kernel
# of the bf16 backward at shape $SHAPE (default 0) with duration, occupancy, issue and stall
# statistics, and the per-SASS stall samples of $SRC_KERNEL (default bwd_scan) as CSV
# (<kernel>_<variant>.csv).
# Writes under $OUT (or /tmp).
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
SHAPE=${SHAPE:-0}
SRC_KERNEL=${SRC_KERNEL:-bwd_scan}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
for v in ${VARIANTS:-bench_cuda_scan}; do
  echo "== $v bwd kernels, bf16 shape $SHAPE"
  timeout 150 ncu --clock-control none --kernel-name regex:bwd_ --launch-count 5 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section SchedulerStats --section InstructionStats \
    --section MemoryWorkloadAnalysis \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \
    "$BIN/$v" --backward --bf16 --shape "$SHAPE" --policy auto --reps 1 > "$O/ncu_bwd_$v.txt" 2>&1
  echo "rc=$?"
  grep -E "^  void|Duration|Executed Instructions  |Achieved Occupancy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Shared Memory  |L1/TEX Hit|Mem Busy|stalled_(barrier|long_scoreboard|short_scoreboard|wait|math_pipe_throttle|mio_throttle|lg_throttle|not_selected|selected|dispatch_stall|no_instruction|branch_resolving|membar|sleeping|tex_throttle|drain|imc_miss|misc)_per" \
    "$O/ncu_bwd_$v.txt" | head -120
  timeout 150 ncu --clock-control none --kernel-name "regex:$SRC_KERNEL" --launch-count 1 --section SourceCounters \
    --section WarpStateStats -o "$O/${SRC_KERNEL}_$v" -f "$BIN/$v" --backward --bf16 --shape "$SHAPE" --policy auto --reps 1 \
    > "$O/ncu_src_$v.log" 2>&1
  ncu -i "$O/${SRC_KERNEL}_$v.ncu-rep" --page source --csv --print-source sass > "$O/${SRC_KERNEL}_$v.csv" 2>&1
  echo "== sass csv rc=$? lines=$(wc -l < "$O/${SRC_KERNEL}_$v.csv")"
  rm -f "$O/${SRC_KERNEL}_$v.ncu-rep"
done
