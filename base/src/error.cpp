#include "lema/base/error.hpp"

#include <cstring>
#include <string>

namespace lema {

SystemError::SystemError(const std::string& what, int err) : Error(what), code_(err) {}

namespace detail {

namespace {
std::string where(const char* file, int line) {
  std::string f = file;
  if (auto pos = f.rfind('/'); pos != std::string::npos) f = f.substr(pos + 1);
  return " [" + f + ":" + std::to_string(line) + "]";
}
}  // namespace

void throw_invalid_argument(const char* file, int line, const char* cond, const std::string& msg) {
  (void)cond;
  throw InvalidArgument(msg + where(file, line));
}

void throw_system_error(const char* file, int line, const char* call, int err) {
  throw SystemError(std::string(call) + " failed: " + std::strerror(err) + " (errno " +
                        std::to_string(err) + ")" + where(file, line),
                    err);
}

void throw_internal_error(const char* file, int line, const char* cond, const std::string& msg) {
  throw InternalError("internal error: " + msg + " (" + cond + " does not hold; please report)" +
                      where(file, line));
}

}  // namespace detail
}  // namespace lema
