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

build=build-demo
generator=()
[[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMAMBABYTE_BUILD_TESTS=OFF \
  -DMAMBABYTE_BUILD_EXAMPLES=ON -DMAMBABYTE_BUILD_BENCH=OFF -DMAMBABYTE_WITH_CUDA=OFF >/dev/null
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
echo "== training a small MambaByte on $data for $minutes minute(s) (CPU, $(nproc) cores) =="
"$bin" train --data "$data" --val-fraction 0.1 --out "$out" --time-limit "$seconds" --threads "$threads" \
  | tee "$out.result.json"
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
"$bin" generate --model "$out" --prompt $'ROMEO:\n' -n 500 --temperature 0.8 --top-p 0.95 --seed 1 --threads "$threads"

echo
printf '== result ==\nMambaByte after %s steps: %.4f validation bits per byte\nbest byte n-gram (order %s): %.4f bits per byte\n' \
  "$steps" "$val" "$order" "$best"
echo "model, log and curves: $out (log.jsonl, curves.png; load with: $bin eval --model $out --data FILE)"
