#!/usr/bin/env bash
# One device call for scan work: the scan test programs (full), then bench_cuda_scan for the
# backward and the forward in bf16 and fp32 (median of $REPS), then optionally (NCU=1) the
# instruction counts of the backward kernels at the first shape. Binaries prebuilt in $BIN
# (carried). Logs under $OUT (or /tmp). The same as run_scan_ab_device.sh with one variant.
set -u
export TESTS="${TESTS:-test_cuda_scan test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_scan_associative test_cuda_step test_cuda_model}"
export VARIANTS=bench_cuda_scan
export SCAN_SETS="${SCAN_SETS:---bf16 --backward;--backward;--bf16;--dtype fp32}"
exec bash "$(dirname "$0")/run_scan_ab_device.sh"
