// Typed exceptions and the check macros that throw them.
//
// Every error LEMA raises inside C++ derives from lema::Error. Messages are meant for a user:
// what failed, on which file/tensor/address, the numbers, and what to do.
#pragma once

#include <cerrno>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lema {

/// Base of every LEMA exception.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// A precondition on the caller's input or a setting was violated (LEMA_EXPECTS).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// An OS call failed; carries errno.
class SystemError : public Error {
 public:
  SystemError(const std::string& what, int err);
  int code() const noexcept { return code_; }

 private:
  int code_;
};

/// Physical memory (host or device) could not be obtained.
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

/// A memory budget is too small for what was asked of it. Carries the numbers its message states,
/// for a caller that explains what needed the memory without working them out again.
class BudgetError : public Error {
 public:
  struct Numbers {
    std::uint64_t needed_bytes = 0;     // what the request spans, in whole pages
    std::uint64_t pinned_bytes = 0;     // what the caller's own other leases pin (0: not the cause)
    std::uint64_t budget_bytes = 0;     // what the budget holds, in whole pages (the setting when
                                        // it holds none)
    std::uint64_t smallest_budget = 0;  // the smallest budget with which the request succeeds
    std::uint64_t page_size = 0;
  };
  BudgetError(const std::string& what, const Numbers& numbers) : Error(what), numbers_(numbers) {}
  const Numbers& numbers() const noexcept { return numbers_; }

 private:
  Numbers numbers_;
};

/// A broken internal invariant of LEMA itself (LEMA_ASSERT): a bug to report, never the caller's
/// input, which InvalidArgument names.
class InternalError : public Error {
 public:
  using Error::Error;
};

namespace detail {
[[noreturn]] void throw_invalid_argument(const char* file, int line, const char* cond,
                                         const std::string& msg);
[[noreturn]] void throw_system_error(const char* file, int line, const char* call, int err);
[[noreturn]] void throw_internal_error(const char* file, int line, const char* cond,
                                       const std::string& msg);
}  // namespace detail

}  // namespace lema

/// Throws lema::InvalidArgument with `msg` when `cond` is false.
#define LEMA_EXPECTS(cond, msg)                                                            \
  do {                                                                                     \
    if (!(cond)) ::lema::detail::throw_invalid_argument(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)

/// Throws lema::InternalError naming `msg`, the condition and the place when `cond` is false: for
/// invariants LEMA keeps itself, not for checks of the caller's input (LEMA_EXPECTS).
#define LEMA_ASSERT(cond, msg)                                                           \
  do {                                                                                   \
    if (!(cond)) ::lema::detail::throw_internal_error(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)

/// Evaluates a POSIX call that returns -1 and sets errno on failure; throws lema::SystemError.
#define LEMA_SYS_TRY(call)                                                  \
  ([&]() {                                                                  \
    auto lema_sys_try_result_ = (call);                                     \
    if (lema_sys_try_result_ == -1)                                         \
      ::lema::detail::throw_system_error(__FILE__, __LINE__, #call, errno); \
    return lema_sys_try_result_;                                            \
  }())
