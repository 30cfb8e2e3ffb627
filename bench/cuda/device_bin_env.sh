# Sourced by the device drivers: the carried binaries in $BIN unpacked (gzip) and made
# executable, and the loader pointed at $BIN (libbenchmark travels with them) and CUDA's libraries.
for f in "$BIN"/*.gz; do [[ -e $f ]] && gunzip -f "$f"; done
chmod +x "$BIN"/* 2>/dev/null
export LD_LIBRARY_PATH="$BIN:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
