// Device errors the pager met where it could not throw them (Note [Device errors without a
// caller] in pager.cpp): logged once per pager, counted, and whether the pager is broken.
//
// Thread safety: every member may be called from any thread; none takes another lock, so it may
// be called under any of the pager's.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>
#include <string>

namespace lema::runtime {

class DeviceErrors {
 public:
  enum class Then { go_on, break_pager };
  /// A device error while `doing` ("recording the last use of a lease's pages"), with the error
  /// at hand. The first is logged as an error, later ones at debug level. With
  /// Then::break_pager the pager can no longer tell what the device reads: from now on acquires
  /// are refused (why_broken()), and teardown leaks what a kernel may still read. Never throws.
  void report(const char* doing, const std::exception& error, Then then = Then::go_on) noexcept;
  /// The same for the error being handled (call inside a catch block).
  void report_current(const char* doing, Then then = Then::go_on) noexcept;

  bool broken() const noexcept { return broken_.load(std::memory_order_acquire); }
  /// What broke the pager: "<doing> failed: <error>" ("" when it is not broken).
  std::string why_broken() const;
  /// Device errors reported so far.
  unsigned count() const noexcept { return count_.load(std::memory_order_relaxed); }

 private:
  std::atomic<unsigned> count_{0};
  std::atomic<bool> broken_{false};
  mutable std::mutex mutex_;  // guards why_
  std::string why_;
};

}  // namespace lema::runtime
