#include "device_errors.hpp"

#include <spdlog/spdlog.h>

#include <stdexcept>

namespace lema::runtime {

void DeviceErrors::report(const char* doing, const std::exception& error, Then then) noexcept {
  try {
    if (count_.fetch_add(1, std::memory_order_relaxed) == 0) {
      spdlog::error(
          "pager: {} failed: {}; memory the device may still read is kept, not reused or freed",
          doing, error.what());
    } else {
      spdlog::debug("pager: {} failed: {}", doing, error.what());
    }
    if (then == Then::break_pager) {
      std::lock_guard lock(mutex_);
      if (why_.empty()) why_ = std::string(doing) + " failed: " + error.what();
    }
  } catch (...) {
    // Out of memory while logging: the count and the flag still say what happened.
  }
  if (then == Then::break_pager) broken_.store(true, std::memory_order_release);
}

void DeviceErrors::report_current(const char* doing, Then then) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    report(doing, e, then);
  } catch (...) {
    static const std::runtime_error unknown("an error of unknown type");
    report(doing, unknown, then);
  }
}

std::string DeviceErrors::why_broken() const {
  std::lock_guard lock(mutex_);
  return why_;
}

}  // namespace lema::runtime
