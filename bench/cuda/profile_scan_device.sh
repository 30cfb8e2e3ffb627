#!/usr/bin/env bash
# Nsight Compute on the scan kernels (one device call; --clock-control none leaves the clocks
# alone): per-kernel duration, occupancy, issue and stall statistics of the backward (fp32 and
# bf16, scan::Auto, first shape) and of the bf16 forward (third shape), then the per-SASS stall
# samples of the backward's main kernel (bf16) as CSV. Binaries prebuilt in $BIN (carried).
# Writes ncu_*.txt and bwd_scan_sass.csv under $OUT (or /tmp).
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
          --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis
          --section MemoryWorkloadAnalysis
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio")
prof() {  # name, kernel regex, launch count, bench args...
  local name=$1 re=$2 n=$3; shift 3
  timeout 150 ncu --clock-control none --kernel-name "regex:$re" --launch-count "$n" "${SECTIONS[@]}" \
    "$BIN/bench_cuda_scan" "$@" --reps 1 > "$O/ncu_$name.txt" 2>&1
  echo "== ncu $name rc=$?"
  grep -E "^  [a-z_:]+.*\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible|Executed Ipc A|Memory Throughput|Compute \(SM\) Throughput|Block Limit" "$O/ncu_$name.txt" | head -80
}
prof bwd_bf16_s0 "bwd_" 5 --backward --bf16 --shape 0 --policy auto
prof bwd_f32_s0 "bwd_" 5 --backward --shape 0 --policy auto
prof bwd_bf16_s2 "bwd_" 5 --backward --bf16 --shape 2 --policy auto
prof fwd_bf16_s2 "scan_" 4 --bf16 --shape 2 --policy auto
prof fwd_bf16_s0 "scan_" 4 --bf16 --shape 0 --policy auto
timeout 150 ncu --clock-control none --kernel-name regex:bwd_scan --launch-count 1 --section SourceCounters \
  --section WarpStateStats -o "$O/bwd_scan" -f "$BIN/bench_cuda_scan" --backward --bf16 --shape 0 --policy auto --reps 1 \
  > "$O/ncu_src.log" 2>&1
echo "== ncu source rc=$?"
ncu -i "$O/bwd_scan.ncu-rep" --page source --csv --print-source sass > "$O/bwd_scan_sass.csv" 2>&1
echo "== sass csv rc=$? lines=$(wc -l < "$O/bwd_scan_sass.csv")"
rm -f "$O/bwd_scan.ncu-rep"
