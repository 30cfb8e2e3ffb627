#!/usr/bin/env bash
# One device call for the layer-by-layer step's conv + x_proj kernel (decode_conv_xproj.cuh):
# test_cuda_step and test_cuda_model in full, memcheck of test_cuda_step's [small] set, then two
# rounds of the decode rows with the kernel (Decode) and without it (DecodeConvXprojSplit: the conv
# kernel + the x_proj GEMM) at bf16 batch 16 / 32 / 64 and fp32 batch 1 / 64. Logs under $OUT.
set -u
BIN=${BIN:-build-devslim}
O=${OUT:-/tmp}
source "$(dirname "$0")/device_bin_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  if [[ -z ${BENCH_ONLY:-} ]]; then
    for t in test_cuda_step test_cuda_model; do
      echo "== $t"; timeout 300 "$BIN/$t" > "$O/$t.log" 2>&1; echo "rc=$?"; tail -n 3 "$O/$t.log"
      grep -B2 -A25 "FAILED" "$O/$t.log" | head -n 80
    done
    echo "== memcheck test_cuda_step [small]"
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_step" "[small]" > "$O/mem_step.log" 2>&1
    echo "rc=$?"; tail -n 3 "$O/mem_step.log"
  fi
  for round in 1 2; do
    echo "== round $round"
    timeout 300 "$BIN/bench_cuda_model" \
      --benchmark_filter='^(Decode|DecodeConvXprojSplit)/(bf16/(16|32|64)|fp32/(1|64))/' \
      --benchmark_out="$O/bench_$round.json" --benchmark_out_format=json 2>&1 | grep -E "^Decode"
  done
} 2>&1 | tee "$O/log.txt"
