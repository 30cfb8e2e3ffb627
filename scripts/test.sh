#!/usr/bin/env bash
# The project's test command (README; CI runs it through .ci/run):
#   1. installs the Debian packages it needs, if missing (apt-get; sudo when not root);
#   2. configures a Release build with tests, examples and benchmarks, plus the CUDA targets
#      when nvcc is available (they compile without a GPU);
#   3. builds with one job per core and runs ctest; without a working GPU the tests labelled
#      `cuda` are left out (they need a device; run them on the GPU machine).
# Usage: scripts/test.sh [--no-cuda] [--build-dir DIR]
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

build_dir=build
with_cuda=auto
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-cuda) with_cuda=OFF; shift ;;
    --build-dir)
      [[ $# -ge 2 ]] || { echo "test.sh: --build-dir needs a directory" >&2; exit 2; }
      build_dir=$2; shift 2 ;;
    --build-dir=*) build_dir=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "test.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- 1. packages -----------------------------------------------------------------------------
source scripts/deps.sh
install_deps test.sh

# ---- 2. configure ------------------------------------------------------------------------------
if [[ -d /usr/local/cuda/bin ]]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
if [[ $with_cuda == auto ]]; then
  if command -v nvcc >/dev/null 2>&1; then with_cuda=ON; else with_cuda=OFF; fi
fi

generator=()
if [[ ! -f "$build_dir/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)  # an existing build dir keeps the generator it was made with
fi

# Examples and benchmarks are ON as soon as their directories have a CMakeLists.txt.
examples=OFF; [[ -f examples/CMakeLists.txt ]] && examples=ON
bench=OFF; [[ -f bench/CMakeLists.txt ]] && bench=ON

echo "test.sh: build dir $build_dir, CUDA $with_cuda, examples $examples, bench $bench"
cmake -S . -B "$build_dir" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DMAMBABYTE_BUILD_TESTS=ON \
  -DMAMBABYTE_BUILD_EXAMPLES="$examples" \
  -DMAMBABYTE_BUILD_BENCH="$bench" \
  -DMAMBABYTE_WITH_CUDA="$with_cuda"

# ---- 3. build and test -------------------------------------------------------------------------
cmake --build "$build_dir" -j "$(nproc)"

# A hung test must not eat the CI budget: 15 minutes at most per test unless it sets TIMEOUT.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "test.sh: GPU found: running all tests"
  ctest --test-dir "$build_dir" --output-on-failure --timeout 900
else
  echo "test.sh: no GPU: running the tests not labelled cuda"
  ctest --test-dir "$build_dir" --output-on-failure --timeout 900 -LE cuda
fi
