# ctest bench_smoke: run each benchmark program on a few tiny cases (MAMBABYTE_BENCH_QUICK=1 in
# the environment shrinks the probes). Fails when a program fails or runs nothing.
#   cmake -DBENCH_SCAN=<path> -DBENCH_MODEL=<path> -DBENCH_TRAIN=<path> -P smoke.cmake
set(cases
  "${BENCH_SCAN}|^(probe/exp_f32|scan/f32/.*/batch:1/L:64/d_inner:64/|scan/f64/auto/|autorule/f32/chunked64/batch:1/L:1024/d_inner:16/)"
  "${BENCH_MODEL}|^(probe/memory_triad|layer/(all|scan)/|model/small/)"
  "${BENCH_TRAIN}|^(probe/exp_f32|train_step/f32/cli_default)")
foreach(case IN LISTS cases)
  string(REPLACE "|" ";" parts "${case}")
  list(GET parts 0 exe)
  list(SUBLIST parts 1 -1 filter_parts)
  list(JOIN filter_parts "|" filter)
  execute_process(COMMAND ${exe} --benchmark_filter=${filter} --benchmark_min_time=0.01
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${exe} failed (${rc})")
  endif()
  if(NOT out MATCHES "floor_frac")
    message(FATAL_ERROR "${exe}: no benchmark with a floor_frac counter ran")
  endif()
endforeach()
