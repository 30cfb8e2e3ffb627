/*! \file
 *  \brief The umbrella header for CPU code. It must compile with a plain C++20 host compiler
 *         and no CUDA toolkit: nothing reachable from here includes <cuda_runtime*.h>.
 *         CUDA translation units include <mambabyte/cuda.hpp> instead (or as well).
 *
 *  What it brings in, layer by layer:
 *    core/       errors, dtypes (bf16, half conversions), portable macros
 *    policy/     backend tags (backend::Cpu, backend::Cuda declared) and scan policies
 *    ssm/ layers/  operator contracts (Arguments + can_implement/workspace_bytes/run), forward and backward
 *    backend/cpu/  their Eigen + OpenMP specialisations
 *    io/         safetensors, PyTorch zip/pickle readers, the safetensors writer
 *    model/      config, weights, inference state, Model, loader/saver, TrainingModel
 *    train/      data sampling, AdamW + schedule + clipping, init, checkpoints, Trainer
 *    decoding/   sampling, generation with UTF-8-safe streaming, bits-per-byte evaluation
 *    reference/  the double-precision oracle (tests and cross-checks)
 */
#pragma once

#include "mambabyte/core/config.hpp"
#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"
#include "mambabyte/core/aligned.hpp"
#include "mambabyte/policy/policy.hpp"
#include "mambabyte/version.hpp"

#include "mambabyte/ssm/selective_scan.hpp"
#include "mambabyte/layers/layers.hpp"
#include "mambabyte/backend/cpu/parallel.hpp"
#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "mambabyte/backend/cpu/layers.hpp"
#include "mambabyte/ssm/selective_scan_backward.hpp"
#include "mambabyte/layers/backward.hpp"
#include "mambabyte/backend/cpu/selective_scan_backward.hpp"
#include "mambabyte/backend/cpu/layers_backward.hpp"

#include "mambabyte/io/mapped_file.hpp"
#include "mambabyte/io/tensor_file.hpp"
#include "mambabyte/io/safetensors.hpp"
#include "mambabyte/io/pytorch.hpp"

#include "mambabyte/model/config.hpp"
#include "mambabyte/model/weights.hpp"
#include "mambabyte/model/state.hpp"
#include "mambabyte/model/model.hpp"
#include "mambabyte/model/loader.hpp"
#include "mambabyte/model/training.hpp"

#include "mambabyte/train/data.hpp"
#include "mambabyte/train/optimizer.hpp"
#include "mambabyte/train/init.hpp"
#include "mambabyte/train/checkpoint.hpp"
#include "mambabyte/train/trainer.hpp"

#include "mambabyte/decoding/sampling.hpp"
#include "mambabyte/decoding/generate.hpp"
#include "mambabyte/decoding/evaluate.hpp"
#include "mambabyte/decoding/noise.hpp"

#include "mambabyte/reference/reference.hpp"
