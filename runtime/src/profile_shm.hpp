// The layout of a profile segment (version 2: version 1 had 10 counters and no unified-memory
// status), shared by its writer (profile_segment.cpp) and
// its readers (profile_attach.cpp).
//
//   [Header][SourceSlot × max_sources][tensor arena][EventSlot × event_capacity]
//
// Every field a writer changes after creation is a lock-free 64- or 32-bit atomic (address-free,
// so valid across processes). Slot fields written once at open are published by the slot's
// `state` store (release); events by their sequence number, as in EventRing.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "lema/runtime/profile.hpp"

namespace lema::runtime::profile_shm {

static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

inline constexpr char kMagic[8] = {'L', 'E', 'M', 'A', 'P', 'S', 'H', 'M'};
inline constexpr std::uint32_t kVersion = 2;
inline constexpr std::size_t kCounterCount = 14;  // ProfileCounter
// Where glibc's shm_open keeps its objects; a segment is built elsewhere and renamed in here.
inline const std::string kShmDirectory = "/dev/shm/";

static_assert(kCounterCount ==
              static_cast<std::size_t>(ProfileCounter::migrated_to_host_bytes) + 1);

enum SlotState : std::uint32_t { kUnwritten = 0, kOpen = 1, kClosed = 2 };

struct Header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;
  std::uint64_t pid;
  std::uint64_t recorder_pid;
  std::uint64_t created_ns;
  std::uint64_t total_bytes;
  std::uint32_t max_sources;
  std::uint32_t slot_bytes;
  std::uint64_t event_capacity;  // a power of two
  std::uint64_t slots_offset;
  std::uint64_t arena_offset;
  std::uint64_t arena_bytes;
  std::uint64_t events_offset;
  // The owner's start time (field 22 of /proc/PID/stat, clock ticks since boot): with `pid`, it
  // names the process for the life of the system (Note [Segment owners]). 0 when unknown; it
  // sits in what was padding, so segments of lemas before it read as unknown.
  std::uint64_t start_ticks;
  alignas(64) std::atomic<std::uint64_t> head;     // events ever claimed: the write index
  alignas(64) std::atomic<std::uint32_t> sources;  // slots ever claimed
  std::atomic<std::uint64_t> arena_used;
};

static_assert(sizeof(Header) == 256, "the header's size is part of version 2");

/// Field 22 of /proc/PID/stat, 0 when it cannot be read.
std::uint64_t process_start_ticks(std::uint64_t pid);
/// Whether process `pid` runs and is the one that started at `start_ticks` (0: pid alone). A
/// zombie does not run.
bool process_running(std::uint64_t pid, std::uint64_t start_ticks);

struct alignas(64) SourceSlot {
  std::atomic<std::uint32_t> state;
  std::uint32_t tensor_count;
  std::uint64_t pid;
  std::uint64_t page_size;
  std::uint64_t budget_bytes;
  std::uint64_t pool_pages;
  std::uint64_t page_count;
  std::uint64_t open_ns;
  std::atomic<std::uint64_t> close_ns;
  std::uint64_t arena_offset;  // the tensor records, from the arena's start
  std::uint64_t arena_bytes;
  char kind[16];
  char policy[16];
  char io_path[64];
  char uvm_counters[128];  // ProfileSourceInfo::uvm_counters, truncated
  alignas(64) std::atomic<std::uint64_t> counters[kCounterCount];
};

// A tensor record in the arena: u32 first page, u32 page count, i32 layer, u32 name length,
// the name, padded to 8 bytes.
inline constexpr std::size_t kTensorRecordFixed = 16;

struct EventSlot {
  std::atomic<std::uint64_t> seq;  // 2·(index+1) when complete, odd while being written
  std::atomic<std::uint64_t> time_ns;
  std::atomic<std::uint64_t> packed;  // kind | source << 8 | first_page << 32
  std::atomic<std::uint64_t> page_count;
  std::atomic<std::uint64_t> bytes;
  std::atomic<std::uint64_t> duration_ns;
};

inline std::uint64_t pack(EventKind kind, std::uint16_t source, PageId first_page) {
  return static_cast<std::uint64_t>(kind) | (static_cast<std::uint64_t>(source) << 8) |
         (static_cast<std::uint64_t>(first_page) << 32);
}

/// Offsets and total size of a segment with these dimensions.
struct Geometry {
  std::uint64_t slots_offset, arena_offset, arena_bytes, events_offset, total_bytes;
};
inline std::uint64_t round_up(std::uint64_t v, std::uint64_t a) {
  return (v + a - 1) / a * a;
}
inline Geometry geometry(std::size_t max_sources, std::size_t arena_bytes,
                         std::size_t event_capacity) {
  Geometry g{};
  g.slots_offset = round_up(sizeof(Header), 64);
  g.arena_offset = round_up(g.slots_offset + max_sources * sizeof(SourceSlot), 64);
  g.arena_bytes = round_up(arena_bytes, 64);
  g.events_offset = round_up(g.arena_offset + g.arena_bytes, 64);
  g.total_bytes = round_up(g.events_offset + event_capacity * sizeof(EventSlot), 4096);
  return g;
}

/// Reads a segment mapped at `base` (`size` bytes), checked against its header. Used by
/// attachments and by a process saving its own segment at exit.
class SegmentView {
 public:
  /// Throws lema::Error naming `name` when the bytes are not a segment of kVersion.
  SegmentView(const std::byte* base, std::size_t size, const std::string& name);
  const Header& header() const noexcept { return *header_; }
  std::vector<ProfileSourceInfo> sources() const;
  /// See ProfileAttachment::drain.
  std::size_t drain(std::vector<ProfileEvent>& out, bool final);
  std::uint64_t dropped() const noexcept { return dropped_; }

 private:
  const std::byte* base_;
  const Header* header_;
  const SourceSlot* slots_;
  const std::byte* arena_;
  const EventSlot* events_;
  std::string name_;
  std::uint64_t next_ = 0;  // the next event index to read
  std::uint64_t dropped_ = 0;
  std::uint64_t waiting_on_ = ~std::uint64_t{0};  // an event seen incomplete on the last drain
};

}  // namespace lema::runtime::profile_shm
