/*! \file
 *  \brief Errors and status codes. Host-side failures (bad files, bad shapes, bad flags) throw
 *         mambabyte::Error with a message naming what is wrong; operators also report
 *         Status from can_implement() so callers can test without throwing.
 */
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mambabyte {

/// Result of an operator's can_implement() / run().
enum class Status {
  kSuccess = 0,
  kInvalidArgument,  ///< a shape, pointer or option is not acceptable
  kUnsupported,      ///< valid, but this backend/policy cannot do it
  kInternalError,
};

inline constexpr char const* to_string(Status s) noexcept {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    case Status::kInternalError: return "internal error";
  }
  return "unknown status";
}

/// The one exception type of the library. Its message always says what was wrong and where
/// (file, tensor, flag), never just "error".
class Error : public std::runtime_error {
 public:
  explicit Error(std::string const& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
[[nodiscard]] std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

/// Throw mambabyte::Error with the streamed arguments as message.
template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

/// Check a condition, throwing mambabyte::Error with the streamed message when it fails.
template <class... Args>
inline void require(bool cond, Args&&... args) {
  if (!cond) fail(std::forward<Args>(args)...);
}

}  // namespace mambabyte
