// LEMA_PRELOAD_PROFILE=<path>: what the hook did, saved when the process exits as a profile file
// that `lema prof report` reads (the format of runtime/include/lema/runtime/profile_file.hpp,
// version 2).
//
// Note [Preload profile]: the file holds one source of kind "preload": the budget, the peak of
// the bytes in use under it (as "peak resident"), the bytes still in use at exit (as
// "resident"), and in its policy string the mode, the threshold and the counts of managed,
// refused and passed-through allocations. It holds no events: the profile's event kinds are the
// pager's (faults, prefetches, evictions), and an allocation is none of them; recording each one
// would need kinds every reader of the format knows. The per-call records of the event ring
// (LEMA_PRELOAD_EVENTS, event_ring.hpp) follow the body as a section of their own: see
// Note [Preload event section] in runtime/include/lema/runtime/preload_events.hpp. The file is
// written with a fixed buffer and plain system calls, so the hook links nothing of lema.
#pragma once

#include <cstdint>

#include "event_ring.hpp"
#include "pointer_table.hpp"

namespace lema::preload {

struct ProfileSummary {
  const char* path = nullptr;
  bool managed = false;
  std::uint64_t threshold = 0;
  std::uint64_t budget = 0;
  std::uint64_t passed_through = 0;  // allocations the hook passed through
  std::uint64_t start_ns = 0;
  std::uint64_t end_ns = 0;
  TableCounters counters{};
  const EventRing* events = nullptr;  // saved after the body when on
};

/// CLOCK_MONOTONIC in nanoseconds (the profile's time base, std::chrono::steady_clock).
std::uint64_t monotonic_ns() noexcept;

/// Writes the file (through `<path>.tmp`, renamed); false when it cannot (errno set).
bool write_profile_summary(const ProfileSummary& summary) noexcept;

}  // namespace lema::preload
