/*! \file
 *  \brief The umbrella header for CPU code. It must compile with a plain C++20 host compiler
 *         and no CUDA toolkit: nothing reachable from here includes <cuda_runtime*.h>.
 *         CUDA translation units include <mambabyte/cuda.hpp> instead (or as well).
 */
#pragma once

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/version.hpp"
