/*! \file
 *  \brief Library-wide macros: version, host/device qualifiers, namespaces.
 */
#pragma once

#define MAMBABYTE_VERSION_MAJOR 0
#define MAMBABYTE_VERSION_MINOR 1
#define MAMBABYTE_VERSION_PATCH 0

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MAMBABYTE_HOST_DEVICE __host__ __device__ inline
#define MAMBABYTE_DEVICE __device__ inline
#else
#define MAMBABYTE_HOST_DEVICE inline
#define MAMBABYTE_DEVICE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MAMBABYTE_RESTRICT __restrict__
#else
#define MAMBABYTE_RESTRICT
#endif

namespace mambabyte {
namespace detail {
/// For static_assert in primary templates that must never be instantiated.
template <class...> inline constexpr bool dependent_false = false;
}  // namespace detail
}  // namespace mambabyte
