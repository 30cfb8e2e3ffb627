#!/usr/bin/env bash
# The project's main job (README): on a fresh machine,
#   1. installs the Debian packages it needs, if missing;
#   2. builds the `mambabyte` CLI (Release);
#   3. trains a small MambaByte on the bundled corpus (data/tinyshakespeare.txt, last 10% held
#      out for validation) for a time budget, reporting validation bits per byte;
#   4. puts a byte n-gram baseline on the same split next to it;
#   5. generates a sample from the trained model.
# Usage: scripts/demo.sh [--minutes M] [--out DIR] [--threads N]     (default: 5 minutes, runs/demo)
set -euo pipefail

minutes=5
out=runs/demo
threads=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[[ $minutes =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "demo.sh: --minutes must be a number" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh
install_deps demo.sh

# The GPU when there is one (and nvcc to build for it): the CUDA backend, bf16 mixed precision.
[[ -d /usr/local/cuda/bin ]] && export PATH="/usr/local/cuda/bin:$PATH"
gpu=OFF
if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  gpu=ON
fi
# the GPU's own architecture; on compute capability 9.0 (H100 / H200) its "a" variant, whose
# setmaxnreg the warp-specialised decode step uses
arch=native
if [[ $gpu == ON ]] && [[ $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1) == 9.0 ]]; then
  arch=90a
fi
build=build-demo
generator=()
[[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMAMBABYTE_BUILD_TESTS=OFF \
  -DMAMBABYTE_BUILD_EXAMPLES=ON -DMAMBABYTE_BUILD_BENCH=OFF -DMAMBABYTE_WITH_CUDA=$gpu \
  -DMAMBABYTE_CUDA_ARCHITECTURES="$arch" >/dev/null
cmake --build "$build" -j "$(nproc)" --target mambabyte_cli
bin=$build/bin/mambabyte
data=data/tinyshakespeare.txt
seconds=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')

if [[ -e $out ]]; then
  echo "demo.sh: replacing the previous demo run in $out"
  rm -rf "$out"
fi
echo
mkdir -p "$(dirname "$out")"
if [[ $gpu == ON ]]; then
  # a GPU affords a wider, deeper model; a fixed schedule that finishes well inside the time
  # limit and sees the 1 MB of training text ~3 times (measured on an H200: 3000 steps of
  # 32 x 256 bytes memorise it, validation rising from 2.24 bits/byte at step 500 to 5.5)
  where="GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), bf16 mixed precision"
  model_args=(--device cuda --precision bf16 --d-model 256 --n-layer 6 --batch 16 --seq-len 256 --steps 800
              --eval-every 200)
else
  where="CPU, $(nproc) cores"
  model_args=(--device cpu)
fi
echo "== training a small MambaByte on $data for up to $minutes minute(s) ($where) =="
"$bin" train --data "$data" --val-fraction 0.1 --out "$out" --time-limit "$seconds" --threads "$threads" \
  "${model_args[@]}" | tee "$out.result.json"
result=$(tail -n 1 "$out.result.json")
mv "$out.result.json" "$out/result.json"

echo
echo "== byte n-gram baseline on the same split =="
"$bin" ngram --data "$data" --val-fraction 0.1 --order 6 --json | tee "$out/ngram.txt" | sed '$d'
ngram=$(tail -n 1 "$out/ngram.txt")

val=$(sed -E 's/.*"val_bits_per_byte":([0-9.eE+-]+).*/\1/' <<<"$result")
best=$(sed -E 's/.*"best_bits_per_byte":([0-9.eE+-]+).*/\1/' <<<"$ngram")
order=$(sed -E 's/.*"best_order":([0-9]+).*/\1/' <<<"$ngram")
steps=$(sed -E 's/.*"step":([0-9]+).*/\1/' <<<"$result")

echo
echo "== sample (temperature 0.8, top-p 0.95) =="
"$bin" generate --model "$out" --prompt $'ROMEO:\n' -n 500 --temperature 0.8 --top-p 0.95 --seed 1 --threads "$threads" \
  --device "$([[ $gpu == ON ]] && echo cuda || echo cpu)"

echo
printf '== result ==\nMambaByte after %s steps: %.4f validation bits per byte\nbest byte n-gram (order %s): %.4f bits per byte\n' \
  "$steps" "$val" "$order" "$best"
echo "model, log and curves: $out (log.jsonl, curves.png; load with: $bin eval --model $out --data FILE)"
