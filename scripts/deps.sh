# Sourced by scripts/test.sh and scripts/demo.sh: install the Debian packages the build needs,
# if any is missing (apt-get; sudo when not root). Usage: install_deps <caller-name>
mambabyte_packages=(cmake ninja-build g++ libeigen3-dev catch2 nlohmann-json3-dev libbenchmark-dev libcli11-dev gnuplot-nox)

install_deps() {
  local who=$1
  if ! command -v dpkg >/dev/null 2>&1; then
    echo "$who: no dpkg (not Debian?): not installing anything; needs ${mambabyte_packages[*]}" >&2
    return 0
  fi
  local missing=() p
  for p in "${mambabyte_packages[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "$who: installing missing packages: ${missing[*]}"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "$who: need root or sudo to install: ${missing[*]}" >&2; return 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
