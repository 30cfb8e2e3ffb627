# CMake package scenarios (STYLE 7.7 item 4; pitfalls P3, P8), run as ctests:
#   cmake -DSCENARIO=<name> -DSOURCE_DIR=<repo root> -DWORK_ROOT=<scratch dir> -DGENERATOR=<gen>
#         [-DMAKE_PROGRAM=<path>] [-DCXX_COMPILER=<path>]
#         [-DCUDA_COMPILER=<nvcc>] [-DCUDA_ARCHITECTURES=90] -P run_scenario.cmake
# Scenarios:
#   find_package            install into a fresh prefix; a consumer finds *that* copy, builds, runs;
#                           a CPU-only consumer needs no CUDA toolkit
#   add_subdirectory        a parent project vendors the source tree; builds and runs
#   version_reject          the installed 0.1.0 satisfies 0.1 but is rejected for 9.0
#   cuda_component_missing  a CPU-only install: REQUIRED COMPONENTS CUDA fails with the reason,
#                           OPTIONAL_COMPONENTS CUDA succeeds without mambabyte::cuda
#   cuda_component          a WITH_CUDA install: a .cu + .cpp consumer links mambabyte::cuda; the
#                           component is refused when the consumer has no toolkit
# Everything is local (no network); the inner library builds have tests/examples/bench OFF.
cmake_minimum_required(VERSION 3.21)

foreach(var SCENARIO SOURCE_DIR WORK_ROOT GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_scenario.cmake: -D${var}=... is required")
  endif()
endforeach()

set(here ${CMAKE_CURRENT_LIST_DIR})
set(work ${WORK_ROOT}/${SCENARIO})
file(REMOVE_RECURSE ${work})
file(MAKE_DIRECTORY ${work})

set(common_args -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release)
if(MAKE_PROGRAM)
  list(APPEND common_args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
if(CXX_COMPILER)
  list(APPEND common_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()
set(cuda_args "")
if(CUDA_COMPILER)
  # Let FindCUDAToolkit in the consumers find the same toolkit as the outer build.
  get_filename_component(cuda_root "${CUDA_COMPILER}" DIRECTORY)
  get_filename_component(cuda_root "${cuda_root}" DIRECTORY)
  list(APPEND cuda_args -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER} -DCUDAToolkit_ROOT=${cuda_root})
  if(CUDA_ARCHITECTURES)
    list(APPEND cuda_args -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}
                          -DMAMBABYTE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES})
  endif()
endif()

# step(<name> PASS|FAIL <out-var> <command...>): run a command, require the expected outcome,
# and return its combined output.
function(step name expect out_var)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message(STATUS "[${SCENARIO}] ${name}: exit ${rc}")
  if(expect STREQUAL "PASS" AND NOT rc EQUAL 0)
    message(FATAL_ERROR "[${SCENARIO}] ${name} failed (exit ${rc}):\n${out}")
  elseif(expect STREQUAL "FAIL" AND rc EQUAL 0)
    message(FATAL_ERROR "[${SCENARIO}] ${name} succeeded but must fail:\n${out}")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

# expect(<output> <regex> <what>): fail unless the output matches; a space in the regex matches
# any run of white space (CMake wraps long messages).
function(expect output regex what)
  string(REPLACE " " "[ \t\r\n]+" regex "${regex}")
  if(NOT output MATCHES "${regex}")
    message(FATAL_ERROR "[${SCENARIO}] expected ${what} (regex: ${regex}) in:\n${output}")
  endif()
endfunction()

# install_library(<prefix> [extra configure args...]): configure, build and install the library.
function(install_library prefix)
  set(build ${work}/library-build)
  step("configure library" PASS out ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${build} ${common_args}
       -DMAMBABYTE_BUILD_TESTS=OFF -DMAMBABYTE_BUILD_EXAMPLES=OFF -DMAMBABYTE_BUILD_BENCH=OFF
       -DMAMBABYTE_INSTALL=ON -DCMAKE_INSTALL_PREFIX=${prefix} ${ARGN})
  step("build library" PASS out ${CMAKE_COMMAND} --build ${build})
  step("install library" PASS out ${CMAKE_COMMAND} --install ${build})
  if(NOT EXISTS ${prefix}/include/mambabyte/mambabyte.hpp)
    message(FATAL_ERROR "[${SCENARIO}] the install has no include/mambabyte/mambabyte.hpp")
  endif()
endfunction()

# configure_consumer(<project dir> <build dir> PASS|FAIL <out-var> [args...])
function(configure_consumer project build expect out_var)
  file(REMOVE_RECURSE ${build})
  step("configure ${project} (${ARGN})" ${expect} out ${CMAKE_COMMAND} -S ${here}/${project}
       -B ${build} ${common_args} ${ARGN})
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

# build_and_run(<build dir> <target>): build and run the program; returns its output.
function(build_and_run build target out_var)
  step("build ${target}" PASS out ${CMAKE_COMMAND} --build ${build})
  step("run ${target}" PASS out ${build}/${target})
  message(STATUS "[${SCENARIO}] ${target} says: ${out}")
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

# The consumer must have found the copy installed under <prefix> (not a build tree, a package
# registry entry or a system copy: the reason Eigen's consumer test checks Eigen3_DIR).
function(expect_installed_copy output prefix)
  file(REAL_PATH ${prefix} real_prefix)
  foreach(key mambabyte_DIR mambabyte_INCLUDE)
    string(REGEX MATCH "${key}=([^\n]*)" line "${output}")
    set(value "${CMAKE_MATCH_1}")
    if(value STREQUAL "")
      message(FATAL_ERROR "[${SCENARIO}] the consumer did not report ${key}:\n${output}")
    endif()
    file(REAL_PATH ${value} real_value)
    string(FIND "${real_value}/" "${real_prefix}/" at)
    if(NOT at EQUAL 0)
      message(FATAL_ERROR "[${SCENARIO}] ${key}=${value} is not under the install prefix ${prefix}")
    endif()
    message(STATUS "[${SCENARIO}] ${key}=${value} (under the install prefix: ok)")
  endforeach()
endfunction()

set(prefix ${work}/prefix)

if(SCENARIO STREQUAL "find_package")
  install_library(${prefix} -DMAMBABYTE_WITH_CUDA=OFF)
  # CPU-only consumer: CUDAToolkit made unfindable, so nothing on this path may need it.
  configure_consumer(consumer ${work}/consumer PASS out
                     -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON)
  expect_installed_copy("${out}" ${prefix})
  expect("${out}" "mambabyte_VERSION=0\\.1\\.0" "the package version 0.1.0")
  expect("${out}" "mambabyte_cuda_target=no" "no mambabyte::cuda without the component")
  build_and_run(${work}/consumer consumer out)
  expect("${out}" "mambabyte 0\\.1\\.0" "version_string() 0.1.0")
  expect("${out}" "DType/bf16 round trip ok" "the consumer's checks")

elseif(SCENARIO STREQUAL "add_subdirectory")
  set(build ${work}/subproject)
  step("configure subproject" PASS out ${CMAKE_COMMAND} -S ${here}/subproject -B ${build}
       ${common_args} -DMAMBABYTE_SOURCE_DIR=${SOURCE_DIR})
  expect("${out}" "is an alias of mambabyte" "mambabyte::mambabyte as an ALIAS of the in-tree target")
  build_and_run(${build} subproject_consumer out)
  expect("${out}" "DType/bf16 round trip ok" "the consumer's checks")

elseif(SCENARIO STREQUAL "version_reject")
  install_library(${prefix} -DMAMBABYTE_WITH_CUDA=OFF)
  # First the control: the same prefix satisfies 0.1, so the rejection below is about the version.
  configure_consumer(consumer ${work}/accept PASS out -DCMAKE_PREFIX_PATH=${prefix}
                     -DMAMBABYTE_REQUEST_VERSION=0.1)
  expect_installed_copy("${out}" ${prefix})
  configure_consumer(consumer ${work}/reject FAIL out -DCMAKE_PREFIX_PATH=${prefix}
                     -DMAMBABYTE_REQUEST_VERSION=9.0)
  expect("${out}" "mambabyteConfig\\.cmake, version: 0\\.1\\.0"
         "the installed 0.1.0 config listed as considered but not accepted")

elseif(SCENARIO STREQUAL "cuda_component_missing")
  install_library(${prefix} -DMAMBABYTE_WITH_CUDA=OFF)
  configure_consumer(consumer ${work}/required FAIL out -DCMAKE_PREFIX_PATH=${prefix}
                     -DMAMBABYTE_CUDA_COMPONENT=REQUIRED)
  expect("${out}" "component CUDA is not available: this installation was built without MAMBABYTE_WITH_CUDA"
         "the reason the CUDA component is missing")
  configure_consumer(consumer ${work}/optional PASS out -DCMAKE_PREFIX_PATH=${prefix}
                     -DMAMBABYTE_CUDA_COMPONENT=OPTIONAL)
  expect("${out}" "mambabyte_CUDA_FOUND=FALSE" "mambabyte_CUDA_FOUND FALSE")
  expect("${out}" "mambabyte_cuda_target=no" "no mambabyte::cuda target")
  build_and_run(${work}/optional consumer out)

elseif(SCENARIO STREQUAL "cuda_component")
  if(NOT CUDA_COMPILER)
    message(FATAL_ERROR "scenario cuda_component needs -DCUDA_COMPILER=<nvcc>")
  endif()
  install_library(${prefix} -DMAMBABYTE_WITH_CUDA=ON ${cuda_args})
  if(NOT EXISTS ${prefix}/share/cmake/mambabyte/mambabyteCudaTargets.cmake)
    message(FATAL_ERROR "[${SCENARIO}] a WITH_CUDA install lacks mambabyteCudaTargets.cmake")
  endif()
  # A CUDA project: .cu + .cpp in one executable against the installed mambabyte::cuda.
  configure_consumer(cuda_consumer ${work}/cuda PASS out -DCMAKE_PREFIX_PATH=${prefix} ${cuda_args})
  expect_installed_copy("${out}" ${prefix})
  build_and_run(${work}/cuda cuda_consumer out)
  expect("${out}" "no CUDA device: compile/link check only|all device checks passed"
         "cuda_smoke's verdict")
  # The toolkit is missing on the consumer's side: refused with the reason when required ...
  configure_consumer(consumer ${work}/no-toolkit FAIL out -DCMAKE_PREFIX_PATH=${prefix}
                     -DMAMBABYTE_CUDA_COMPONENT=REQUIRED -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON)
  expect("${out}" "component CUDA is not available: the CUDA toolkit" "the missing-toolkit reason")
  # ... and a CPU-only consumer of the same install does not need the toolkit at all.
  configure_consumer(consumer ${work}/cpu PASS out -DCMAKE_PREFIX_PATH=${prefix}
                     -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON)
  expect("${out}" "mambabyte_cuda_target=no" "no mambabyte::cuda without the component")
  build_and_run(${work}/cpu consumer out)

else()
  message(FATAL_ERROR "run_scenario.cmake: unknown SCENARIO '${SCENARIO}'")
endif()

message(STATUS "[${SCENARIO}] passed")
