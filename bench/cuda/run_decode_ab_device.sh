#!/usr/bin/env bash
# One device call for a change to the persistent decode kernel, measured against its parent in the
# same call (run-to-run spread across calls is ~4%). For every variant v in $VARIANTS (binaries
# prebuilt here and carried in $BIN, optionally gzipped: bench_cuda_model_$v, and when present
# test_cuda_model_$v and decode_anatomy_$v): the test program, the per-segment anatomy at batch 1
# and 4, then the decode benchmark at batch 1 and 4 twice, variants interleaved; with SAN=<v> also
# compute-sanitizer racecheck on test_cuda_model_<v> "[race]" and memcheck on its
# "*persistent*" cases. Logs under $OUT (or /tmp).
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
{
  for v in ${VARIANTS:?set VARIANTS, e.g. \"parent new\"}; do
    if [[ -x $BIN/test_cuda_model_$v ]]; then
      echo "== test_cuda_model_$v"; timeout 120 "$BIN/test_cuda_model_$v" | tail -3
    fi
    if [[ -x $BIN/decode_anatomy_$v ]]; then
      echo "== anatomy_$v b1"; timeout 60 "$BIN/decode_anatomy_$v"
      echo "== anatomy_$v b4"; timeout 60 "$BIN/decode_anatomy_$v" --batch 4
    fi
  done
  for r in 1 2; do
    for v in $VARIANTS; do
      echo "== bench_$v"
      timeout 100 "$BIN/bench_cuda_model_$v" --benchmark_filter='^Decode/bf16/(1|4)/' 2>&1 | grep Decode
    done
  done
  if [[ -n ${SAN:-} ]]; then
    t=$BIN/test_cuda_model_$SAN
    echo "== racecheck [race] $SAN"
    # every hazard printed (cuBLAS's own GEMM kernels report some), then counted by kernel
    timeout 300 compute-sanitizer --tool racecheck --racecheck-report all --print-limit 100000 "$t" "[race]" > "$O/race_$SAN.log" 2>&1
    echo "rc=$?"; grep -E "RACECHECK SUMMARY|All tests passed|assertions" "$O/race_$SAN.log" | tail -3
    echo "hazard reports by kernel (Read/Write thread lines):"
    grep -E "(Read|Write) Thread" "$O/race_$SAN.log" | sed -E 's/.* at (void )?//; s/[(<+].*//' | sort | uniq -c | sort -rn | head -n 6
    echo "persistent_decode_kernel lines: $(grep -E '(Read|Write) Thread' "$O/race_$SAN.log" | grep -c persistent_decode_kernel)"
    echo "== memcheck *persistent* $SAN"
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$t" "*persistent*" > "$O/mem_$SAN.log" 2>&1
    echo "rc=$?"; tail -3 "$O/mem_$SAN.log"
  fi
} 2>&1 | tee "$O/decode_ab.log"
