# Sourced by the device drivers: racecheck of test_cuda_model's hidden "[race]" case (every
# hazard line counted by kernel; ours must be 0) and memcheck of its persistent-step cases.
# Needs $BIN (the carried binaries) and $O (the log folder).
sanitize_persistent() {
  echo "== racecheck test_cuda_model [race]"
  timeout 300 compute-sanitizer --tool racecheck --racecheck-report all --print-limit 100000 \
    "$BIN/test_cuda_model" "[race]" > "$O/race_model.log" 2>&1
  echo "rc=$?"; grep -E "RACECHECK SUMMARY|All tests passed|assertions" "$O/race_model.log" | tail -n 3
  echo "hazard reports by kernel (Read/Write thread lines):"
  grep -E "(Read|Write) Thread" "$O/race_model.log" | sed -E 's/.* at (void )?//; s/[(<+].*//' | sort | uniq -c | sort -rn | head -n 6
  echo "persistent_decode_kernel lines: $(grep -E '(Read|Write) Thread' "$O/race_model.log" | grep -c persistent_decode_kernel)"
  echo "== memcheck test_cuda_model *persistent*"
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_model" "*persistent*" > "$O/mem_model.log" 2>&1
  echo "rc=$?"; tail -n 3 "$O/mem_model.log"
}
