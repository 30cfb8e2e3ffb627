#!/usr/bin/env bash
# One device call: the CUDA scan tests (full), the [small] sets under compute-sanitizer memcheck
# and racecheck, then the benchmarks (forward, then --backward). Binaries come prebuilt in $BIN
# (default build-cuda-scan/tests/cuda, carried). Logs go to $OUT when set.
# PARTS=bwd: the forward test (full) and every backward part only (no forward sanitizers/bench).
# Backward order: tests, benchmark, then sanitizers (so the timings survive a slow sanitizer).
set -u
BIN=${BIN:-build-cuda-scan/tests/cuda}
LOG=${OUT:-/tmp}/device.log
PARTS=${PARTS:-all}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "== test_cuda_scan (full)"; timeout 90 "$BIN/test_cuda_scan"; echo "rc=$?"
  if [ "$PARTS" = all ]; then
    echo "== memcheck [small]"; timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_scan" "[small]"; echo "rc=$?"
    echo "== racecheck [small]"; timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$BIN/test_cuda_scan" "[small]"; echo "rc=$?"
  fi
  echo "== test_cuda_scan_backward (full)"; timeout 120 "$BIN/test_cuda_scan_backward"; echo "rc=$?"
  echo "== bench --backward --quick"; timeout 30 "$BIN/bench_cuda_scan" --backward --quick; echo "rc=$?"
  echo "== bench --backward"; timeout 120 "$BIN/bench_cuda_scan" --backward --reps 10; echo "rc=$?"
  echo "== backward memcheck [small]"; timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_scan_backward" "[small]"; echo "rc=$?"
  echo "== backward racecheck [small]"; timeout 80 compute-sanitizer --tool racecheck --error-exitcode 9 "$BIN/test_cuda_scan_backward" "[small]"; echo "rc=$?"
  if [ "$PARTS" = all ]; then
    echo "== bench --quick"; timeout 30 "$BIN/bench_cuda_scan" --quick; echo "rc=$?"
    echo "== bench"; timeout 150 "$BIN/bench_cuda_scan" --reps 20; echo "rc=$?"
  fi
} 2>&1 | tee "$LOG"
