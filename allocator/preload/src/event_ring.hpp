// LEMA_PRELOAD_EVENTS=<count>: one record per call of the hook (which call, bytes, the route it
// took, the result, the thread, when), kept in a ring mapped once while the library loads and
// saved with the profile summary at exit (profile_summary.hpp).
//
// Note [Preload event ring]: the ring is an array of fixed records and one atomic index. A call
// claims the next record with one relaxed fetch_add, fills it with plain stores and publishes it
// by storing its call byte last (release); the writer at exit reads that byte (acquire) and
// treats a record whose byte is still 0 (a thread inside a hook while the process exits) as
// lost. When the index passes the capacity the event is not stored: nothing is overwritten, and
// the index itself counts what was dropped (index − capacity). Recording takes no lock, makes no
// allocation and calls only clock_gettime and, once per thread, gettid, so it is as safe on the
// hook's error paths as the one-line reports are. The records are laid out as the profile file
// stores them (runtime/include/lema/runtime/preload_events.hpp), so saving them is a copy.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "lema/runtime/preload_event_values.hpp"

namespace lema::preload {

// The file's call, route and flag values, defined once for the hook and the readers.
using Call = runtime::PreloadCall;
using Route = runtime::PreloadRoute;
inline constexpr std::uint8_t kFlagBadFree = runtime::kPreloadBadFree;
inline constexpr std::uint8_t kFlagDoubleFree = runtime::kPreloadDoubleFree;

struct EventRecord {
  std::uint64_t time_ns;  // CLOCK_MONOTONIC when the call returned
  std::uint64_t bytes;    // requested; a free of managed memory: its size; meminfo: free bytes
  std::uint64_t address;  // the pointer given out or freed
  std::uint32_t thread;   // gettid()
  std::int32_t result;    // the cudaError_t returned
  std::uint8_t call;      // Call; stored last (Note [Preload event ring])
  std::uint8_t route;     // Route
  std::uint8_t flags;     // kFlag*
  std::uint8_t reserved[5];
};
static_assert(sizeof(EventRecord) == 40, "the profile file's preload event record");

class EventRing {
 public:
  /// Maps `capacity` records (0: off). False when the mapping fails (errno set).
  bool init(std::uint64_t capacity) noexcept;
  bool on() const noexcept { return records_ != nullptr; }
  void record(Call call, Route route, std::uint64_t bytes, const void* address, int result,
              std::uint8_t flags = 0) noexcept;

  std::uint64_t capacity() const noexcept { return capacity_; }
  /// Records claimed so far (stored ones and dropped ones).
  std::uint64_t claimed() const noexcept { return next_.load(std::memory_order_relaxed); }
  const EventRecord* records() const noexcept { return records_; }

 private:
  EventRecord* records_ = nullptr;
  std::uint64_t capacity_ = 0;
  std::atomic<std::uint64_t> next_{0};
};

}  // namespace lema::preload
