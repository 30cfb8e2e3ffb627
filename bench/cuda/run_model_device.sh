#!/usr/bin/env bash
# One device call for the model-level CUDA work: layer and model tests, a CLI training run on the
# bundled corpus with --device cuda (eval + generate after it), then the model benchmark.
# Binaries prebuilt here and carried in $BIN (default build-devcarry), with libbenchmark.
# PARTS: comma list of tests,sanitize,cli,scanbench,bench (default tests,cli,bench). Logs under $OUT.
set -u
BIN=${BIN:-build-devcarry}
OUTDIR=${OUT:-/tmp}
PARTS=${PARTS:-tests,cli,bench}
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
  if has tests; then
    for t in test_cuda_layers test_cuda_model test_cuda_scan test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_step; do
      [[ -x $BIN/$t ]] || continue
      echo "== $t"; timeout 240 "$BIN/$t" ${TEST_ARGS:-}; echo "rc=$?"
    done
  fi
  if has sanitize; then
    for t in test_cuda_layers test_cuda_model test_cuda_scan test_cuda_scan_backward test_cuda_scan_bf16 test_cuda_step; do
      [[ -x $BIN/$t ]] || continue
      for tool in memcheck racecheck; do
        echo "== $tool $t [small]"
        timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 "$BIN/$t" "[small]" 2>&1 | tail -n 15; echo "rc=${PIPESTATUS[0]}"
      done
    done
  fi
  if has cli; then
    run=$OUTDIR/cli_run
    echo "== mambabyte train --device cuda (bf16)"
    timeout 200 "$BIN/mambabyte" train --data data/tinyshakespeare.txt --val-fraction 0.1 --out "$run" --device cuda \
      --precision bf16 --d-model 256 --n-layer 6 --batch 16 --seq-len 256 --steps ${CLI_STEPS:-800} --eval-every 200 \
      --no-progress; echo "rc=$?"
    echo "== eval --device cuda"; timeout 60 "$BIN/mambabyte" eval --model "$run" --data data/tinyshakespeare.txt --max-bytes 200000 --device cuda --json; echo "rc=$?"
    echo "== eval --device cuda --precision fp32"; timeout 60 "$BIN/mambabyte" eval --model "$run" --data data/tinyshakespeare.txt --max-bytes 200000 --device cuda --precision fp32 --json; echo "rc=$?"
    echo "== eval --device cpu"; timeout 120 "$BIN/mambabyte" eval --model "$run" --data data/tinyshakespeare.txt --max-bytes 200000 --device cpu --json; echo "rc=$?"
    echo "== generate --device cuda"; timeout 60 "$BIN/mambabyte" generate --model "$run" --prompt $'ROMEO:\n' -n 400 --temperature 0.8 --top-p 0.95 --seed 1 --device cuda; echo "rc=$?"
    rm -rf "$run"/checkpoint-*/optimizer* 2>/dev/null
  fi
  if has scanbench; then
    IFS=';' read -ra sets <<< "${SCAN_SETS:---bf16;--bf16 --backward;--backward;--step}"
    for args in "${sets[@]}"; do
      echo "== bench_cuda_scan $args"; timeout 150 "$BIN/bench_cuda_scan" $args --reps ${SCAN_REPS:-10}; echo "rc=$?"
    done
  fi
  if has bench; then
    echo "== bench_cuda_model"
    timeout 400 "$BIN/bench_cuda_model" --benchmark_out="$OUTDIR/bench_cuda_model.json" --benchmark_out_format=json ${BENCH_ARGS:-}; echo "rc=$?"
  fi
} 2>&1 | tee "$OUTDIR/device.log"
