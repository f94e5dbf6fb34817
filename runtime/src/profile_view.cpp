// Reading a profile segment's layout (profile_shm.hpp): its sources and its events. The
// runtime needs it for the recording it saves itself (ProfileSegment's save_to); the tools'
// ProfileAttachment (tools/profile/) reads other processes' segments with it.
#include <algorithm>
#include <bit>
#include <cstring>

#include "lema/base/error.hpp"
#include "lema/runtime/profile.hpp"
#include "profile_shm.hpp"

namespace lema::runtime {

namespace profile_shm {

SegmentView::SegmentView(const std::byte* base, std::size_t size, const std::string& name)
    : base_(base), name_(name) {
  auto bad = [&](const std::string& why) {
    return Error("/dev/shm/" + name + " is not a profile segment this lema can read: " + why);
  };
  if (size < sizeof(Header)) throw bad("it holds only " + std::to_string(size) + " bytes");
  header_ = reinterpret_cast<const Header*>(base);
  const Header& h = *header_;
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) throw bad("wrong magic");
  if (h.version != kVersion)
    throw bad("it is version " + std::to_string(h.version) + ", this lema reads version " +
              std::to_string(kVersion) + "; use the lema that started the program");
  // Every count is bounded by the mapping before the layout is computed from it: a count near
  // 2^64 would wrap the computed offsets back to values that look consistent, and the reads they
  // size would then leave the mapping.
  if (h.event_capacity < 2 || !std::has_single_bit(h.event_capacity) ||
      h.event_capacity > (std::uint64_t{1} << 32) || h.event_capacity > size / sizeof(EventSlot))
    throw bad("its event capacity " + std::to_string(h.event_capacity) +
              " is not a power of two that fits its " + std::to_string(size) + " bytes");
  if (h.max_sources > 65535 || h.max_sources > size / sizeof(SourceSlot))
    throw bad("its " + std::to_string(h.max_sources) + " source slots do not fit its " +
              std::to_string(size) + " bytes");
  if (h.arena_bytes > size)
    throw bad("its arena of " + std::to_string(h.arena_bytes) + " bytes exceeds its " +
              std::to_string(size) + " bytes");
  const Geometry g = geometry(h.max_sources, h.arena_bytes, h.event_capacity);
  if (h.arena_bytes != g.arena_bytes || h.header_bytes != sizeof(Header) ||
      h.slot_bytes != sizeof(SourceSlot) || h.slots_offset != g.slots_offset ||
      h.arena_offset != g.arena_offset || h.events_offset != g.events_offset ||
      h.total_bytes != g.total_bytes || g.total_bytes > size)
    throw bad(
        "inconsistent sizes (its header's offsets and sizes disagree with its counts or "
        "exceed its " +
        std::to_string(size) + " bytes)");
  slots_ = reinterpret_cast<const SourceSlot*>(base + h.slots_offset);
  arena_ = base + h.arena_offset;
  events_ = reinterpret_cast<const EventSlot*>(base + h.events_offset);
}

std::vector<ProfileSourceInfo> SegmentView::sources() const {
  const Header& h = *header_;
  const std::uint32_t n = std::min(h.sources.load(std::memory_order_acquire), h.max_sources);
  std::vector<ProfileSourceInfo> out;
  out.reserve(n);
  auto text = [](const char* s, std::size_t cap) { return std::string(s, strnlen(s, cap)); };
  for (std::uint32_t i = 0; i < n; ++i) {
    const SourceSlot& s = slots_[i];
    ProfileSourceInfo info;
    const std::uint32_t state = s.state.load(std::memory_order_acquire);
    if (state == kUnwritten) {
      out.push_back(std::move(info));  // keeps indices aligned with the events' source field
      continue;
    }
    info.pid = s.pid;
    info.kind = text(s.kind, sizeof(s.kind));
    info.policy = text(s.policy, sizeof(s.policy));
    info.io_path = text(s.io_path, sizeof(s.io_path));
    info.uvm_counters = text(s.uvm_counters, sizeof(s.uvm_counters));
    info.page_size = s.page_size;
    info.budget_bytes = s.budget_bytes;
    info.pool_pages = s.pool_pages;
    info.page_count = s.page_count;
    info.open_ns = s.open_ns;
    if (state == kClosed) info.close_ns = s.close_ns.load(std::memory_order_relaxed);
    auto c = [&](ProfileCounter which) {
      return s.counters[static_cast<std::size_t>(which)].load(std::memory_order_relaxed);
    };
    PagerStats& st = info.counters;
    st.faults = c(ProfileCounter::faults);
    st.hits = c(ProfileCounter::hits);
    st.prefetches_issued = c(ProfileCounter::prefetches_issued);
    st.prefetches_used = c(ProfileCounter::prefetches_used);
    st.prefetches_wasted = c(ProfileCounter::prefetches_wasted);
    st.bytes_read = c(ProfileCounter::bytes_read);
    st.evictions = c(ProfileCounter::evictions);
    st.stall_ns = c(ProfileCounter::stall_ns);
    st.resident_bytes = c(ProfileCounter::resident_bytes);
    st.peak_resident_bytes = c(ProfileCounter::peak_resident_bytes);
    st.gpu_faults = c(ProfileCounter::gpu_faults);
    st.cpu_faults = c(ProfileCounter::cpu_faults);
    st.migrated_to_device_bytes = c(ProfileCounter::migrated_to_device_bytes);
    st.migrated_to_host_bytes = c(ProfileCounter::migrated_to_host_bytes);
    st.uvm_counters = info.uvm_counters;
    st.budget_bytes = s.budget_bytes;
    st.page_size = s.page_size;
    st.io_path = info.io_path;
    // The tensor table, bounds-checked against the arena.
    if (s.arena_offset <= h.arena_bytes && s.arena_bytes <= h.arena_bytes - s.arena_offset) {
      const std::byte* at = arena_ + s.arena_offset;
      const std::byte* end = at + s.arena_bytes;
      for (std::uint32_t t = 0; t < s.tensor_count; ++t) {
        if (end - at < static_cast<std::ptrdiff_t>(kTensorRecordFixed)) break;
        ProfileTensor pt;
        std::uint32_t name_len = 0;
        std::memcpy(&pt.first_page, at, 4);
        std::memcpy(&pt.page_count, at + 4, 4);
        std::memcpy(&pt.layer, at + 8, 4);
        std::memcpy(&name_len, at + 12, 4);
        if (end - at - kTensorRecordFixed < name_len) break;
        pt.name.assign(reinterpret_cast<const char*>(at + kTensorRecordFixed), name_len);
        info.tensors.push_back(std::move(pt));
        // The padded record may end past the table; stop there rather than step out of it.
        const std::uint64_t step = round_up(kTensorRecordFixed + name_len, 8);
        if (step > static_cast<std::uint64_t>(end - at)) break;
        at += step;
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

std::size_t SegmentView::drain(std::vector<ProfileEvent>& out, bool final) {
  const std::uint64_t cap = header_->event_capacity;
  const std::uint64_t mask = cap - 1;
  const std::uint64_t head = header_->head.load(std::memory_order_acquire);
  if (head - next_ > cap) {  // overwritten before we got here
    dropped_ += head - cap - next_;
    next_ = head - cap;
  }
  const std::size_t before = out.size();
  for (std::uint64_t i = next_; i < head; ++i) {
    const EventSlot& s = events_[i & mask];
    const std::uint64_t want = 2 * i + 2;
    const std::uint64_t seq1 = s.seq.load(std::memory_order_acquire);
    if (seq1 == want) {
      constexpr auto kLoad = std::memory_order_acquire;
      ProfileEvent e;
      e.time_ns = s.time_ns.load(kLoad);
      const std::uint64_t packed = s.packed.load(kLoad);
      e.page_count = static_cast<std::uint32_t>(s.page_count.load(kLoad));
      e.bytes = s.bytes.load(kLoad);
      e.duration_ns = s.duration_ns.load(kLoad);
      if (s.seq.load(std::memory_order_relaxed) == seq1) {
        e.kind = static_cast<EventKind>(packed & 0xff);
        e.source = static_cast<std::uint16_t>((packed >> 8) & 0xffff);
        e.first_page = static_cast<PageId>(packed >> 32);
        out.push_back(e);
      } else {
        ++dropped_;  // overwritten while we read it
      }
    } else if (seq1 > want) {
      ++dropped_;  // a later lap already reused the slot
    } else if (!final && waiting_on_ != i) {
      // Claimed but not complete yet: come back on the next drain. If it is still incomplete
      // then, its writer gave it up (lapped) or is gone; count it and move on.
      waiting_on_ = i;
      next_ = i;
      return out.size() - before;
    } else {
      ++dropped_;
    }
    next_ = i + 1;
  }
  next_ = head;
  return out.size() - before;
}

}  // namespace profile_shm

}  // namespace lema::runtime
