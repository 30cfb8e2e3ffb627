/*! \file
 *  \brief The library version as a string (the numeric macros live in core/config.hpp, which
 *         CMake's project(VERSION) must match; the package tests check that it does).
 */
#pragma once

#include "mambabyte/core/config.hpp"

#define MAMBABYTE_DETAIL_STRINGIFY_IMPL(x) #x
#define MAMBABYTE_DETAIL_STRINGIFY(x) MAMBABYTE_DETAIL_STRINGIFY_IMPL(x)

/// "major.minor.patch", built from the numeric macros so the two can never disagree.
#define MAMBABYTE_VERSION_STRING                       \
  MAMBABYTE_DETAIL_STRINGIFY(MAMBABYTE_VERSION_MAJOR) "." \
  MAMBABYTE_DETAIL_STRINGIFY(MAMBABYTE_VERSION_MINOR) "." \
  MAMBABYTE_DETAIL_STRINGIFY(MAMBABYTE_VERSION_PATCH)

namespace mambabyte {

/// The version of the headers this translation unit was compiled against, e.g. "0.1.0".
inline constexpr char const* version_string() noexcept { return MAMBABYTE_VERSION_STRING; }

}  // namespace mambabyte
