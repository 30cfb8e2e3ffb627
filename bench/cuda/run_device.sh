#!/usr/bin/env bash
# One device call: the CUDA scan tests (full), the [small] set under compute-sanitizer memcheck
# and racecheck, then the benchmark. Binaries come prebuilt in $BIN (default
# build-cuda-scan/tests/cuda, carried). Logs go to $OUT when set.
set -u
BIN=${BIN:-build-cuda-scan/tests/cuda}
LOG=${OUT:-/tmp}/device.log
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "== test_cuda_scan (full)"; timeout 90 "$BIN/test_cuda_scan"; echo "rc=$?"
  echo "== memcheck [small]"; timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_scan" "[small]"; echo "rc=$?"
  echo "== racecheck [small]"; timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$BIN/test_cuda_scan" "[small]"; echo "rc=$?"
  echo "== bench --quick"; timeout 30 "$BIN/bench_cuda_scan" --quick; echo "rc=$?"
  echo "== bench"; timeout 150 "$BIN/bench_cuda_scan" --reps 20; echo "rc=$?"
} 2>&1 | tee "$LOG"
