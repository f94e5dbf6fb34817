// The profiler's live side: pagers publish their events and counters into a shared-memory
// segment that another process (`lema prof record`, `lema prof top`) reads while they run.
//
// Publishing is on when the environment names LEMA_PROFILE (see ProfileSegment::process()). One
// segment per process, POSIX shared memory named "lema-prof-<pid>", mode 0600 (the owner only):
//   - a header (magic, version, pid, the recorder's pid, sizes),
//   - one slot per publisher (a Pager or a fault-mode MappedCheckpoint): what it is (page size,
//     budget, io path, policy, whether unified-memory counters are on, its tensors' page ranges
//     and layers), written once at open, and its counters (the pager's and, over unified memory,
//     the driver's GPU faults and migrations), stored live with relaxed atomics,
//   - a bounded ring of events with a write index. Writers claim a slot with one relaxed
//     fetch_add and fill it under a per-slot sequence number, exactly like EventRing; nothing in
//     the segment is ever locked, so a reader cannot slow or block a writer. A reader that falls
//     more than the ring's capacity behind loses the oldest events and counts them as dropped.
// The layout of the segment is private to the runtime (src/profile_shm.hpp) and versioned; an
// attachment refuses a segment of another version.
//
// The reader's side (ProfileAttachment, profile files) is not the runtime's: it lives with the
// tools that use it (tools/profile/, library lema_prof).
//
// Thread safety: ProfilePublisher::publish/add/update from any threads concurrently.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lema/runtime/events.hpp"
#include "lema/runtime/policy.hpp"
#include "lema/runtime/stats.hpp"

namespace lema::runtime {

class Layout;

/// LEMA_PROFILE=<path>: publish; without a recorder the process itself saves what its ring still
/// holds to <path> at exit. LEMA_PROFILE_RECORDER=<pid>: the recorder that drains the segment,
/// saves the file and removes the segment (the process leaves it in place at exit).
inline constexpr const char* kProfileEnv = "LEMA_PROFILE";
inline constexpr const char* kProfileRecorderEnv = "LEMA_PROFILE_RECORDER";

/// One tensor as the profiler sees it: the pages it covers and its decoder layer.
struct ProfileTensor {
  std::string name;
  PageId first_page = 0;
  std::uint32_t page_count = 0;
  std::int32_t layer = -1;  // N of "layers.N." in the name; -1 for the embedding, norms, head
};

/// What a publisher is; `counters` are the live (or, once closed, final) values.
struct ProfileSourceInfo {
  std::uint64_t pid = 0;
  std::string kind;  // "pager" (guard mode, the Pager) or "fault" (userfaultfd checkpoint)
  std::string policy;
  std::string io_path;
  // PagerStats::uvm_counters: "on", "" (not unified memory) or why the driver's GPU faults and
  // migrations are not counted. At most 127 bytes survive the segment.
  std::string uvm_counters{};
  std::uint64_t page_size = 0;
  std::uint64_t budget_bytes = 0;
  std::uint64_t pool_pages = 0;  // pages the budget holds
  std::uint64_t page_count = 0;  // pages of the address space
  std::uint64_t open_ns = 0;     // steady clock (now_ns())
  std::uint64_t close_ns = 0;    // 0 while open
  std::vector<ProfileTensor> tensors;
  PagerStats counters;
};

/// An Event tagged with its publisher (index into the sources of a segment or recording).
struct ProfileEvent {
  std::uint64_t time_ns = 0;
  std::uint64_t duration_ns = 0;
  std::uint64_t bytes = 0;
  PageId first_page = 0;
  std::uint32_t page_count = 0;
  EventKind kind = EventKind::fault;
  std::uint16_t source = 0;
};

/// The layout's tensors in layout order, with their page ranges and layers.
std::vector<ProfileTensor> profile_tensors(const Layout& layout);
/// N of "layers.N." in a tensor name, -1 when there is none.
std::int32_t layer_of(std::string_view tensor_name);

/// The shared-memory segment of one process (the writer's side). Move-only owner of the mapping;
/// removes the segment's name on destruction unless a recorder owns it.
class ProfileSegment {
 public:
  struct Options {
    std::string name;                       // shared-memory name, without the leading '/'
    std::size_t event_capacity = 1u << 16;  // rounded up to a power of two
    std::size_t max_sources = 64;
    std::size_t layout_bytes = 1u << 20;  // room for the publishers' tensor tables
    std::uint64_t recorder_pid = 0;       // nonzero: a recorder removes the segment
    std::filesystem::path save_to;        // nonempty: save a recording here on destruction
  };

  /// Creates the segment (replacing a stale one of the same name). Throws SystemError.
  static std::shared_ptr<ProfileSegment> create(Options options);
  /// The process's segment when LEMA_PROFILE is set, created on first use and kept until exit;
  /// nullptr when profiling is off or the segment could not be created (warned once).
  static std::shared_ptr<ProfileSegment> process();
  /// "lema-prof-<pid>".
  static std::string name_for(pid_t pid);
  /// Removes the segments left by processes that are gone (killed before they could remove
  /// their own): "lema-prof-<pid>", and "lema-init-<pid>-…" half-made ones, whose process no
  /// longer runs, is a zombie, or is another one under a reused pid. A segment is kept while its
  /// recorder runs (the recorder reads it last and removes it), and no other name is ever
  /// touched. Returns the names removed; never throws. See Note [Segment owners].
  static std::vector<std::string> remove_orphans() noexcept;

  ProfileSegment(const ProfileSegment&) = delete;
  ProfileSegment& operator=(const ProfileSegment&) = delete;
  ~ProfileSegment();

  const std::string& name() const noexcept;
  std::size_t event_capacity() const noexcept;

  struct Impl;

 private:
  friend class ProfilePublisher;
  explicit ProfileSegment(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// The counters of a publisher, in the segment's order.
enum class ProfileCounter : std::uint8_t {
  faults,
  hits,
  prefetches_issued,
  prefetches_used,
  prefetches_wasted,
  bytes_read,
  evictions,
  stall_ns,
  resident_bytes,
  peak_resident_bytes,
  gpu_faults,
  cpu_faults,
  migrated_to_device_bytes,
  migrated_to_host_bytes,
};

/// One publisher's slot in a segment. Its methods never block, allocate or make system calls.
/// The slot is marked closed (with the counters as last stored) on destruction.
class ProfilePublisher {
 public:
  /// Into the process's segment; nullptr when profiling is off.
  static std::unique_ptr<ProfilePublisher> open_if_enabled(const ProfileSourceInfo& info);
  /// nullptr when the segment has no slot or layout room left (warned).
  static std::unique_ptr<ProfilePublisher> open(std::shared_ptr<ProfileSegment> segment,
                                                const ProfileSourceInfo& info);
  ProfilePublisher(const ProfilePublisher&) = delete;
  ProfilePublisher& operator=(const ProfilePublisher&) = delete;
  ~ProfilePublisher();

  void publish(const Event& event) noexcept;
  /// Stores every counter (a live copy; concurrent updates may briefly store an older value).
  void update(const PagerCounters& counters, std::uint64_t page_size) noexcept;
  void update(const PagerStats& stats) noexcept;
  void add(ProfileCounter counter, std::uint64_t v = 1) noexcept;
  std::uint16_t index() const noexcept { return index_; }

 private:
  ProfilePublisher(std::shared_ptr<ProfileSegment> segment, std::uint16_t index);
  std::shared_ptr<ProfileSegment> segment_;
  std::uint16_t index_;
};

}  // namespace lema::runtime
