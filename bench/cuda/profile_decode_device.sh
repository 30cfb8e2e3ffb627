#!/usr/bin/env bash
# Nsight Compute on the persistent decode step (one device call; --clock-control none leaves the
# clocks alone): the third graph launch of Decode/bf16/$BATCH (bench_cuda_model), its
# speed-of-light, scheduler and stall statistics, and the per-SASS stall samples as CSV (the
# per-source-line view, decode_src.csv, is empty unless the binary was built with -lineinfo).
# Binaries prebuilt in $BIN (carried).
# Writes ncu_decode.txt, decode_sass.csv, decode_src.csv under $OUT (or /tmp).
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
BATCH=${BATCH:-1}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
timeout 240 ncu --clock-control none --kernel-name regex:persistent_decode --launch-skip 2 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
  --section SourceCounters --section MemoryWorkloadAnalysis \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \
  -o "$O/decode" -f "$BIN/bench_cuda_model" --benchmark_filter="^Decode/bf16/$BATCH/" > "$O/ncu_decode.log" 2>&1
echo "== ncu rc=$?"; tail -5 "$O/ncu_decode.log"
ncu -i "$O/decode.ncu-rep" > "$O/ncu_decode.txt" 2>&1
grep -E "Duration|Issue Slots Busy|No Eligible|Executed Ipc A|Memory Throughput|stalled_.*ratio|Warp Cycles Per Issued" "$O/ncu_decode.txt" | head -60
ncu -i "$O/decode.ncu-rep" --page source --csv --print-source sass > "$O/decode_sass.csv" 2>&1
echo "== sass csv rc=$? lines=$(wc -l < "$O/decode_sass.csv")"
ncu -i "$O/decode.ncu-rep" --page source --csv --print-source cuda > "$O/decode_src.csv" 2>&1
echo "== src csv rc=$? lines=$(wc -l < "$O/decode_src.csv")"
rm -f "$O/decode.ncu-rep"
