// The pager's event log: a fixed-capacity, lock-free ring of what happened when.
//
// Writers never block and never allocate: a slot is claimed with one relaxed fetch_add and its
// fields are written with release stores (plain moves on x86), bracketed by a per-slot sequence
// number (a seqlock), so a reader can tell a complete event from one being overwritten and skips
// the latter. When the ring is full the oldest events are overwritten; dropped() counts them.
// A writer that laps the ring onto a slot another writer is still filling drops its own event.
//
// Thread safety: record() from any number of threads; snapshot() from any thread, concurrently.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "lema/runtime/policy.hpp"

namespace lema::runtime {

/// What happened. The first six are the pager's own; the last three are the CUDA driver's, over
/// unified memory, as CUPTI reported them (see stats.hpp):
///  - gpu_fault: a kernel touched a page not on the device and the driver served the fault;
///    first_page is the page of the faulting address, page_count 1, bytes the number of faults
///    on it served together (CUPTI's fault groups), duration the driver's service time;
///  - migrate_to_device / migrate_to_host: the driver moved [first_page, first_page +
///    page_count) — bytes of it — between host and device (prefetches included), duration the
///    transfer's time.
enum class EventKind : std::uint8_t {
  fault,
  hit,
  prefetch_issued,
  prefetch_done,
  evict,
  stall,
  gpu_fault,
  migrate_to_device,
  migrate_to_host,
};
/// The last kind (files and segments refuse a larger value).
inline constexpr EventKind kLastEventKind = EventKind::migrate_to_host;

std::string_view event_kind_name(EventKind kind);

struct Event {
  std::uint64_t time_ns = 0;  // steady clock, at the event's start
  EventKind kind = EventKind::fault;
  PageId first_page = 0;
  std::uint32_t page_count = 0;
  std::uint64_t bytes = 0;  // gpu_fault: the number of faults (see EventKind)
  std::uint64_t duration_ns = 0;
};

/// Nanoseconds on the steady clock (the time base of events).
std::uint64_t now_ns() noexcept;

class EventRing {
 public:
  /// `capacity` is rounded up to a power of two (at least 2).
  explicit EventRing(std::size_t capacity = 1u << 16);
  EventRing(const EventRing&) = delete;
  EventRing& operator=(const EventRing&) = delete;

  void record(const Event& event) noexcept;
  /// The events still in the ring, oldest first (those being overwritten are skipped).
  std::vector<Event> snapshot() const;

  std::size_t capacity() const noexcept { return mask_ + 1; }
  /// Events ever recorded.
  std::uint64_t recorded() const noexcept { return head_.load(std::memory_order_relaxed); }
  /// Events overwritten before anyone could read them.
  std::uint64_t dropped() const noexcept;

 private:
  struct Slot {
    std::atomic<std::uint64_t> seq{0};  // 2·(index+1) when complete, odd while being written
    std::atomic<std::uint64_t> time_ns{0};
    std::atomic<std::uint64_t> packed{0};  // kind | first_page << 8 | ... see events.cpp
    std::atomic<std::uint64_t> page_count{0};
    std::atomic<std::uint64_t> bytes{0};
    std::atomic<std::uint64_t> duration_ns{0};
  };
  std::unique_ptr<Slot[]> slots_;
  std::size_t mask_;
  std::atomic<std::uint64_t> head_{0};
};

}  // namespace lema::runtime
