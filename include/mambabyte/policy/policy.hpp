/*! \file
 *  \brief Policy tags: backends and scan algorithms. Empty structs, refined by inheritance where
 *         it makes sense (CUTLASS dispatch-policy style). No implementations live here.
 */
#pragma once

#include <type_traits>

namespace mambabyte {

namespace backend {
/// CPU backend (Eigen + OpenMP). `threads` = 0 means "whatever OpenMP/Eigen use now".
struct Cpu {
  int threads = 0;
};
/// CUDA backend; defined in <mambabyte/cuda.hpp> only (CPU users never see CUDA types).
struct Cuda;
}  // namespace backend

namespace scan {
/// Plain recurrence over time; parallel across (batch, channel) blocks.
struct Sequential {
  static constexpr char const* name = "sequential";
};
/// Work-efficient (Blelloch up-sweep / down-sweep) associative scan over time; the tree levels
/// are split across threads, so one long sequence runs in parallel along its length.
struct Associative {
  static constexpr char const* name = "associative";
};
/// Chunk-local scans (in parallel across chunks and channels) plus a carried prefix across
/// chunks: the reduce-then-scan decomposition. ChunkLen time steps per chunk.
template <int ChunkLen>
struct Chunked {
  static_assert(ChunkLen > 0, "chunk length must be positive");
  static constexpr int chunk_len = ChunkLen;
  static constexpr char const* name = "chunked";
};
/// Resolved on the host by a documented rule (see ssm/selective_scan.hpp: resolve_auto_cpu).
struct Auto {
  static constexpr char const* name = "auto";
};

template <class P> inline constexpr bool is_chunked_v = false;
template <int N> inline constexpr bool is_chunked_v<Chunked<N>> = true;
}  // namespace scan

}  // namespace mambabyte
