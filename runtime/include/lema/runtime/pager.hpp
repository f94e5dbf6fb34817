// The Pager: makes pages of an AddressSpace resident under a hard memory budget.
//
// The physical pool is budget / page_size chunks, created once. acquire(ranges) makes every page
// of the byte ranges resident and pins it; the returned Lease unpins them when released (with
// the fence of their last use) or destroyed. A miss is a fault, served synchronously on the
// calling thread: the page's extents are read through the Reader into a free chunk (through the
// pool window, or staging + copy on a device backend), and only then is the chunk mapped at the
// page's model address (Note [Map after fill] in fill_pipeline.cpp). When no chunk is free, the
// policy picks a victim among resident pages that are unpinned and whose last-use fences
// completed; a chunk is never reused before that.
//
// Budget errors (BudgetError, with its numbers as fields) instead of deadlocks:
//  - a budget smaller than one page: at construction, before anything is created;
//  - one acquire needing more pages than the pool holds: before any state changes;
//  - an acquire that cannot succeed because the calling thread itself pins too many other pages
//    (leases are attributed to the thread that acquired them).
// Otherwise an acquire that finds every chunk pinned waits until a lease is released. Threads
// that each hold leases while acquiring more can still deadlock one another when their pins
// together leave too few chunks; callers that hold leases across acquires must keep the sum of
// what they hold and need within the budget.
//
// Prefetch (PagerOptions::prefetch): a dedicated thread asks the policy for the next pages after
// each release (the end of an access, when its pages are unpinned) and loads those not resident
// into free chunks, or in place of the victim EvictionPolicy::prefetch_victim() names (so
// prefetch never costs extra fetches compared to Belady; see prefetcher.cpp).
// Its reads go through the same Reader, never under the pager's lock. An acquire of a page that
// is being filled (by the prefetcher or another thread) waits for that fill; it counts as a hit
// and the wait as stall time.
//
// Over unified memory (Backend::unified_memory_device() >= 0) the pager also counts what the CUDA
// driver did in its range, from CUPTI's unified-memory counters where they are available: GPU
// page faults (what the schedule missed), CPU page faults and migrations, as PagerStats counters
// and events with their pages. mark_step() and stats() ask CUPTI for its records first; where
// CUPTI is missing or refuses, PagerStats::uvm_counters says why and nothing else changes.
//
// Device errors where nothing can throw them (a lease's destructor, release, teardown) are
// logged once and never end the process: what the device may still read is kept rather than
// reused or freed, and a pager that lost track of a lease's last use refuses further acquires
// with PagerBroken (Note [Device errors without a caller] in pager.cpp).
//
// Thread safety: acquire, release, fault_in, mark_step and stats may be called from any threads
// concurrently; several threads may acquire overlapping ranges. A Lease is a move-only value that
// may be released on another thread. The Backend and AddressSpace must outlive the Pager.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "lema/io/reader.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/events.hpp"
#include "lema/runtime/policy.hpp"
#include "lema/runtime/stats.hpp"

namespace lema::runtime {

/// The pager met a device error it could not report where it happened (the last use of a
/// dropped lease could not be recorded on its queue): it can no longer tell which pages a kernel
/// still reads, keeps them, and refuses acquires. Close the checkpoint and open it again.
class PagerBroken : public Error {
 public:
  using Error::Error;
};

/// The pager is paused (Pager::pause): its pool's memory is given back and no page can be made
/// resident until Pager::resume().
class PagerPaused : public Error {
 public:
  using Error::Error;
};

/// [ptr, ptr + bytes) inside the address space.
struct ByteRange {
  const void* ptr = nullptr;
  std::uint64_t bytes = 0;
};

/// How budget errors name the settings a user can change, in the words of whoever opened the
/// checkpoint: "--budget" for the command line, "budget=" for Python. The defaults are the C++
/// option fields. See Note [Budget advice] in pager_acquire.cpp.
struct SettingNames {
  std::string budget = "budget_bytes";
  std::string page_size = "page_size";
};

struct PagerOptions {
  std::uint64_t budget_bytes = 0;  // the pool holds budget_bytes / page_size chunks
  PolicyKind policy = PolicyKind::lru;
  bool prefetch = true;            // run the prefetch thread (only useful with a predicting policy)
  std::size_t prefetch_depth = 8;  // pages asked of predict_next() after each access
  // Protection of mapped pages. read_write: writes to weights are kept, in a spill store when
  // their page is evicted (Note [Dirty pages]); needs a backend that tracks writes (the host).
  Access access = Access::read;
  io::ReaderOptions reader;        // used when the Pager opens its own Reader
  // The staged host cache tier of a device pool (a pool without a host window): pages read from
  // the files stay in this much host staging memory (pinned on CUDA), so a later fill of the
  // page only copies host to device. 0: off. Rejected for host-visible pools, whose pages the
  // kernel's page cache keeps already.
  std::uint64_t host_cache_bytes = 0;
  // The shared host cache tier (Note [Shared host cache]): pages read from the files kept in one
  // shared memory segment of this size per checkpoint, for every local process that opens it
  // with this option, so each page is read from disk once per machine. 0: off.
  std::uint64_t shared_host_cache_bytes = 0;
  std::size_t event_capacity = 1u << 16;
  SettingNames setting_names;
};

class Pager;

/// Pins on a set of pages. Move-only. Destroyed (or assigned over) while it still pins, it
/// releases them with an already-complete fence, or, when acquired for a queue, with a fence
/// recorded on that queue (Note [Dropped leases] in pager.cpp).
class Lease {
 public:
  Lease() = default;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  Lease(Lease&& o) noexcept;
  Lease& operator=(Lease&& o) noexcept;
  ~Lease();

  /// The distinct pages pinned, ascending.
  std::span<const PageId> pages() const noexcept { return pages_; }
  bool empty() const noexcept { return pages_.empty(); }

 private:
  friend class Pager;
  Pager* pager_ = nullptr;
  std::vector<PageId> pages_;
  std::thread::id owner_;
  std::optional<Queue> consumer_;  // the queue it was acquired for
};

class Pager {
 public:
  /// Opens a Reader over the layout's files with options.reader.
  Pager(AddressSpace& space, PagerOptions options);
  /// Uses `reader` (over the layout's files, same indices). Throws BudgetError when the budget
  /// holds less than one page, before anything is created.
  Pager(AddressSpace& space, std::unique_ptr<io::Reader> reader, PagerOptions options);
  Pager(const Pager&) = delete;
  Pager& operator=(const Pager&) = delete;
  /// Stops the prefetcher and unmaps every page. Outstanding Leases must be gone. A page whose
  /// last use the device cannot confirm complete stays mapped, and the pool is then leaked
  /// rather than freed under it (Note [Device errors without a caller] in pager.cpp).
  ~Pager();

  /// Makes every page of `ranges` resident and pinned; returns once all are mapped. Throws
  /// BudgetError (see above), io::ReadError when a fill failed (that page stays unmapped; a
  /// later acquire retries), InvalidArgument for a range outside the address space, PagerBroken
  /// once the pager is broken.
  /// On a device pool a page's copy from host memory may still be running when it is mapped;
  /// these return once every page's bytes are in place (waiting on the host if need be).
  Lease acquire(std::span<const ByteRange> ranges);
  Lease acquire(const void* ptr, std::uint64_t bytes);
  Lease acquire_pages(PageRange pages);
  /// The same for work that will run on a device queue (a CUDA stream): instead of blocking the
  /// caller, `consumer` is made to wait for the copies still running, so the caller may enqueue
  /// its kernels at once. Release with a fence recorded on `consumer` after the last of them.
  Lease acquire(std::span<const ByteRange> ranges, Queue consumer);
  Lease acquire_pages(PageRange pages, Queue consumer);
  /// Unpins the lease's pages; their chunks are reused only once `last_use` completed.
  void release(Lease&& lease, Fence last_use = {});

  /// For a fault handler (userfaultfd mode): makes `page` resident without pinning it. The page
  /// may be evicted again at any time afterwards.
  void fault_in(PageId page);
  /// The same, for a handler that must not wait forever (the guard fault fallback, whose faulting
  /// thread may itself pin the chunks it waits for): returns false when no chunk became free
  /// within `patience` because every one stayed pinned. Counts the access in
  /// PagerStats::fallback_faults as well. Throws what acquire throws.
  bool fault_in(PageId page, std::chrono::nanoseconds patience);
  /// Called under the pager's lock right after a page was unmapped (its chunk not yet reused),
  /// e.g. to zap the page in a userfaultfd region. Must not call back into the Pager. Set it
  /// before the first acquire.
  void set_evict_hook(std::function<void(PageId)> hook);

  /// Waits until the prefetcher has nothing left to do (for tests and benchmarks that need a
  /// deterministic pager state between accesses).
  void quiesce();

  /// A hint that `pages` will not be needed soon: unmaps those that are resident, unpinned and
  /// past their last-use fences, and frees their chunks; skips the others (pinned, being filled,
  /// or still in use on the device). Returns how many it evicted.
  std::size_t evict(PageRange pages);
  /// A softer hint: `pages` that are resident and unpinned become the policy's next eviction
  /// victims, but stay resident until something needs their chunks (EvictionPolicy::on_demote).
  /// Skips the others. Never changes a byte anyone reads. Returns how many it demoted.
  std::size_t demote(PageRange pages);

  /// Note [Pause]: gives every page's memory back while keeping the addresses. Waits for the
  /// prefetcher's fills, evicts every resident page (a written one to the spill store, as any
  /// eviction does) and releases the pool's memory (Backend::release_pool_memory). From then on
  /// acquires throw PagerPaused until resume(). Throws InvalidArgument, pausing nothing, while a
  /// lease pins pages (the message says how many) or when paused already; InvalidArgument
  /// naming the backend where it cannot release its pool (managed). The host cache tiers keep
  /// their memory (a refill after resume reads them first).
  void pause();
  /// Makes the pool's memory again; pages refill from the checkpoint (or the spill store) on
  /// their next acquire, at the same addresses. Throws InvalidArgument when not paused.
  void resume();
  /// True between pause() and resume().
  bool paused() const;

  /// A training step ended (forwarded to the policy).
  void mark_step();
  /// True when `page` is mapped at its model address now.
  bool is_resident(PageId page) const;

  PagerStats stats() const;
  const EventRing& events() const noexcept;
  const AddressSpace& space() const noexcept;
  std::size_t chunk_count() const noexcept;
  const char* policy_name() const noexcept;
  /// Why `pages` pages cannot be resident at once and the smallest budget that holds them, in
  /// the options' setting names: "3 pages of 2 MiB (6 MiB) but the budget holds 2 pages (4 MiB);
  /// the smallest budget that works is 6 MiB (6291456 bytes): raise the budget (--budget) to at
  /// least that". For a caller that explains what needed the pages.
  std::string budget_shortfall(std::size_t pages) const;

  struct State;  // defined in src/pager_state.hpp

 private:
  friend class Lease;
  Lease acquire_ranges(std::span<const ByteRange> ranges, const Queue* consumer);
  Lease acquire_page_range(PageRange range, const Queue* consumer);
  // distinct, ascending; with a deadline, an empty Lease when no chunk could be claimed by then
  Lease acquire_sorted(std::vector<PageId> pages, const Queue* consumer,
                       std::optional<std::chrono::steady_clock::time_point> deadline = {});
  void release_pins(Lease& lease, const Fence& last_use) noexcept;
  // A lease destroyed or assigned over while it pins (Note [Dropped leases]).
  void drop(Lease& lease) noexcept;
  std::unique_ptr<State> state_;
};

}  // namespace lema::runtime
