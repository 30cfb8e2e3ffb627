#!/usr/bin/env bash
# One device call: the model test (full), the decode benchmarks, then compute-sanitizer memcheck
# and racecheck on the [small] set of every CUDA test program (carried in $BIN). Logs to $OUT.
set -u
BIN=${BIN:-build-devcarry}
OUTDIR=${OUT:-/tmp}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
{
  echo "== test_cuda_model"; timeout 120 "$BIN/test_cuda_model"; echo "rc=$?"
  echo "== bench decode"; timeout 90 "$BIN/bench_cuda_model" --benchmark_filter='Decode' \
    --benchmark_out="$OUTDIR/bench_decode.json" --benchmark_out_format=json; echo "rc=$?"
  for t in ${TESTS:-test_cuda_model test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_layers test_cuda_step}; do
    for tool in memcheck racecheck; do
      echo "== $tool $t [small]"
      timeout ${SAN_TIMEOUT:-70} compute-sanitizer --tool $tool --error-exitcode 9 "$BIN/$t" "[small]" > "$OUTDIR/san_${tool}_$t.log" 2>&1
      echo "rc=$?"; tail -n 4 "$OUTDIR/san_${tool}_$t.log"
    done
  done
} 2>&1 | tee "$OUTDIR/device.log"
