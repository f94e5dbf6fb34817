#include "lema/runtime/events.hpp"

#include <bit>
#include <chrono>

namespace lema::runtime {

std::string_view event_kind_name(EventKind kind) {
  switch (kind) {
    case EventKind::fault:
      return "fault";
    case EventKind::hit:
      return "hit";
    case EventKind::prefetch_issued:
      return "prefetch_issued";
    case EventKind::prefetch_done:
      return "prefetch_done";
    case EventKind::evict:
      return "evict";
    case EventKind::stall:
      return "stall";
    case EventKind::gpu_fault:
      return "gpu_fault";
    case EventKind::migrate_to_device:
      return "migrate_to_device";
    case EventKind::migrate_to_host:
      return "migrate_to_host";
  }
  return "unknown";
}

std::uint64_t now_ns() noexcept {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

EventRing::EventRing(std::size_t capacity)
    : slots_(new Slot[std::bit_ceil(std::max<std::size_t>(capacity, 2))]),
      mask_(std::bit_ceil(std::max<std::size_t>(capacity, 2)) - 1) {}

// packed: kind in bits 0..7, first_page in bits 32..63.
void EventRing::record(const Event& e) noexcept {
  const std::uint64_t index = head_.fetch_add(1, std::memory_order_relaxed);
  Slot& s = slots_[index & mask_];
  // Odd while being written; a reader seeing an odd or changed sequence skips the slot. Only
  // one writer may hold a slot: a writer that lapped the ring onto a slot still being written
  // drops its event rather than wait or tear the other one.
  std::uint64_t seq = s.seq.load(std::memory_order_relaxed);
  if ((seq & 1) != 0 ||
      !s.seq.compare_exchange_strong(seq, 2 * index + 1, std::memory_order_acquire))
    return;
  // Release stores / acquire loads of the fields instead of fences (which TSan does not model):
  // a reader that sees any field of this write also sees the odd sequence afterwards. On x86
  // these are plain moves.
  constexpr auto kStore = std::memory_order_release;
  s.time_ns.store(e.time_ns, kStore);
  s.packed.store(
      static_cast<std::uint64_t>(e.kind) | (static_cast<std::uint64_t>(e.first_page) << 32),
      kStore);
  s.page_count.store(e.page_count, kStore);
  s.bytes.store(e.bytes, kStore);
  s.duration_ns.store(e.duration_ns, kStore);
  s.seq.store(2 * index + 2, std::memory_order_release);
}

std::vector<Event> EventRing::snapshot() const {
  const std::uint64_t head = head_.load(std::memory_order_acquire);
  const std::uint64_t cap = capacity();
  const std::uint64_t begin = head > cap ? head - cap : 0;
  std::vector<Event> out;
  out.reserve(static_cast<std::size_t>(head - begin));
  for (std::uint64_t i = begin; i < head; ++i) {
    const Slot& s = slots_[i & mask_];
    const std::uint64_t seq1 = s.seq.load(std::memory_order_acquire);
    if (seq1 != 2 * i + 2) continue;  // not yet complete, or already overwritten
    constexpr auto kLoad = std::memory_order_acquire;
    Event e;
    e.time_ns = s.time_ns.load(kLoad);
    const std::uint64_t packed = s.packed.load(kLoad);
    e.kind = static_cast<EventKind>(packed & 0xff);
    e.first_page = static_cast<PageId>(packed >> 32);
    e.page_count = static_cast<std::uint32_t>(s.page_count.load(kLoad));
    e.bytes = s.bytes.load(kLoad);
    e.duration_ns = s.duration_ns.load(kLoad);
    if (s.seq.load(std::memory_order_relaxed) != seq1) continue;  // overwritten while reading
    out.push_back(e);
  }
  return out;
}

std::uint64_t EventRing::dropped() const noexcept {
  const std::uint64_t head = head_.load(std::memory_order_relaxed);
  return head > capacity() ? head - capacity() : 0;
}

}  // namespace lema::runtime
