/*! \file
 *  \brief The opt-in umbrella for CUDA translation units: everything <mambabyte/mambabyte.hpp>'s
 *         core offers, plus the CUDA backend (backend::Cuda, device buffers, kernels).
 *
 *  CPU code never includes this file, so CPU-only users need neither nvcc nor CUDA headers.
 *  Link the CMake target mambabyte::cuda (find_package(mambabyte COMPONENTS CUDA)).
 */
#pragma once

#if !defined(__CUDACC__)
#error "include <mambabyte/cuda.hpp> only from CUDA translation units (.cu compiled by nvcc); CPU code includes <mambabyte/mambabyte.hpp>"
#endif

#include <cuda_runtime.h>

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/version.hpp"

#include "mambabyte/backend/cuda/common.cuh"
#include "mambabyte/backend/cuda/selective_scan.cuh"
#include "mambabyte/backend/cuda/selective_scan_backward.cuh"
#include "mambabyte/backend/cuda/selective_scan_associative.cuh"
#include "mambabyte/backend/cuda/layers.cuh"
#include "mambabyte/backend/cuda/selective_state_update.cuh"
#include "mambabyte/backend/cuda/decode_conv_xproj.cuh"
#include "mambabyte/backend/cuda/gemm.cuh"
#include "mambabyte/backend/cuda/decode.cuh"
#include "mambabyte/backend/cuda/decode_persistent.cuh"
#include "mambabyte/backend/cuda/model.cuh"
#include "mambabyte/backend/cuda/train_engine.cuh"
