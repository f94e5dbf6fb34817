// Internals of the Pager, shared by the files that implement it by concern:
//   pager.cpp          construction, destruction, leases, release, small queries
//   pager_acquire.cpp  acquire: the page table walk, waiting, budget checks
//   pager_fill.cpp     reading pages into chunks and mapping them (IO, outside the lock)
//   pager_evict.cpp    victim choice and eviction (under the lock)
//   prefetcher.cpp     the prefetch thread
//
// Lock order: State::mutex (the page table, the chunk table, the policy, the per-thread pin
// records) may be held while calling the Backend's map/unmap/fence queries and the policy.
// State::staging_mutex is a leaf, never held while taking State::mutex. No IO (Reader waits) and
// no fence wait ever happens under State::mutex.
#pragma once

#include <condition_variable>
#include <deque>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "host_page_cache.hpp"
#include "spill_store.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/profile.hpp"
#include "uvm_counters.hpp"

namespace lema::runtime {

inline constexpr PageId kNoPage = std::numeric_limits<PageId>::max();

enum class PageState : std::uint8_t {
  absent,    // not mapped; no chunk
  filling,   // owns a chunk being filled by one thread; not mapped yet (Note [Map after fill])
  resident,  // mapped at its model address
};

struct PageEntry {
  PageState state = PageState::absent;
  bool prefetched = false;  // filled by the prefetcher and not accessed since
  std::uint32_t chunk = 0;  // valid unless absent
  std::uint32_t pins = 0;
  std::vector<Fence> fences;  // last-use fences (and the fill's copy) not yet seen complete
  // The fill's copy to a device chunk, until seen complete: an acquirer makes its consumer
  // queue wait for it (or waits on the host). Always complete for host-visible pools.
  Fence ready;
  // Note [Failed fills]: fills of this page published so far, and the error of the last one
  // (null when it succeeded). An acquirer waiting for another thread's fill waits for the count
  // to move and gets that fill's error instead of filling the page again itself.
  std::uint32_t fills_done = 0;
  std::exception_ptr fill_error;
  // The last fill failed: the prefetcher leaves the page alone until a fill of it succeeds.
  bool fill_failed = false;
};

/// A page given a chunk to fill, and the outcome.
struct FillClaim {
  PageId page = 0;
  std::uint32_t chunk = 0;
  std::exception_ptr error;  // set when the read or the map failed
  Fence ready;               // the copy into a device chunk (see PageEntry::ready)
};

/// Host memory a copy to the device still reads from: a staging buffer or a host cache slot,
/// given back once the copy completed.
struct CopyInFlight {
  Fence copied;
  std::unique_ptr<StagingBuffer> staging;
  std::optional<std::size_t> cache_slot;
};

struct Pager::State {
  AddressSpace* space = nullptr;
  Backend* backend = nullptr;
  const Layout* layout = nullptr;
  PagerOptions options;
  std::uint64_t page_size = 0;
  std::size_t chunk_count = 0;
  std::unique_ptr<io::Reader> reader;
  std::string io_path;
  std::unique_ptr<PhysicalPool> pool;
  std::unique_ptr<HostPageCache> host_cache;  // device pools with a host cache tier only
  std::unique_ptr<SpillStore> spill;  // Access::read_write only: written pages (Note [Dirty pages])

  PagerCounters counters;
  EventRing events;
  std::unique_ptr<ProfilePublisher> profile;  // set when LEMA_PROFILE is (see profile.hpp)

  // ---- guarded by mutex ----
  std::mutex mutex;
  std::condition_variable changed;  // a fill finished, or pins/fences were released
  std::uint32_t waiters = 0;        // threads blocked on `changed` (notify only when > 0)
  std::vector<PageEntry> pages;
  std::vector<PageId> chunk_owner;  // kNoPage when the chunk is free
  std::vector<std::uint32_t> free_chunks;
  std::unique_ptr<EvictionPolicy> policy;
  // Pins per acquiring thread, to refuse (instead of waiting forever) an acquire that the
  // caller's own leases make impossible.
  std::unordered_map<std::thread::id, std::unordered_map<PageId, std::uint32_t>> pins_by_thread;
  std::function<void(PageId)> evict_hook;
  bool prefetch_wanted = false;
  bool prefetch_busy = false;  // the prefetcher claimed pages and is filling them
  bool stopping = false;
  std::condition_variable prefetch_cv;

  // ---- guarded by staging_mutex (device backends only) ----
  std::mutex staging_mutex;
  std::vector<std::unique_ptr<StagingBuffer>> staging_free;
  std::deque<CopyInFlight> copies_in_flight;  // oldest first

  std::thread prefetch_thread;

  // Unified memory only (pager_uvm.cpp, Note [UVM counters]): PagerStats::uvm_counters, the
  // consumer of CUPTI's records for this range, and its subscription. Declared last: the
  // subscription goes first, so the consumer is never called once anything it writes is gone.
  std::string uvm_status;
  std::unique_ptr<UvmConsumer> uvm_consumer;
  std::unique_ptr<UvmSubscription> uvm;

  explicit State(std::size_t event_capacity) : events(event_capacity) {}
};

// ---- pager_evict.cpp (caller holds State::mutex) ----

/// True when `page` is resident, unpinned and all its last-use fences completed (completed
/// fences are dropped on the way).
bool evictable(Pager::State& s, PageId page);
/// Resident unpinned pages not in `exclude` (sorted), split by fence completion.
void collect_candidates(Pager::State& s, std::span<const PageId> exclude,
                        std::vector<PageId>& ready, std::vector<PageId>* fenced);
/// Unmaps `page`, frees nothing: returns its chunk to the caller.
std::uint32_t evict_page(Pager::State& s, PageId page);
/// A free chunk, or the chunk of a victim the policy chose among `candidates` (non-empty when
/// no chunk is free). Removes the victim from `candidates`.
std::uint32_t take_chunk(Pager::State& s, std::vector<PageId>& candidates);

// ---- pager_fill.cpp (caller holds no lock) ----

/// Who fills: a caller that faulted (and waits), or the prefetch thread.
enum class FillOrigin { demand, prefetch };
/// Reads each claim's page into its chunk, then maps the pages read at their model addresses
/// with one Backend::map_pages call (Note [Map after fill]); when that map fails, every claim
/// of it fails. Errors are stored per claim; never throws. Copies into device chunks are left
/// running: each claim's `ready` fence says when its bytes are there.
void fill_and_map(Pager::State& s, std::span<FillClaim> claims, FillOrigin origin);
/// Gives back the host memory of completed copies; waits on the host for the oldest ones while
/// more than `keep` are in flight (bounding pinned staging memory).
void retire_copies(Pager::State& s, std::size_t keep) noexcept;

// ---- pager_acquire.cpp / pager.cpp (caller holds State::mutex) ----

/// Publishes the outcome of fills: resident pages, or absent with the chunk freed and the error
/// kept for the fill's waiters (Note [Failed fills]).
void publish_fills(Pager::State& s, std::span<const FillClaim> claims);
/// Throws a copy of a fill's error, owned by the calling thread (a read error is shared by every
/// waiter of the fill that failed).
[[noreturn]] void rethrow_fill_error(const std::exception_ptr& error);
/// Needs no lock (the ring and the publisher are lock-free); CUPTI's records arrive through it.
void record_event(Pager::State& s, EventKind kind, PageId first, std::uint32_t count,
                  std::uint64_t bytes, std::uint64_t start_ns, std::uint64_t duration_ns);

/// Blocks on State::changed (lock held), counting the waiter.
template <typename Pred>
void wait_changed(Pager::State& s, std::unique_lock<std::mutex>& lock, Pred pred) {
  ++s.waiters;
  s.changed.wait(lock, pred);
  --s.waiters;
}
inline void wait_changed(Pager::State& s, std::unique_lock<std::mutex>& lock) {
  ++s.waiters;
  s.changed.wait(lock);
  --s.waiters;
}
/// The same with a deadline; false when it passed first.
inline bool wait_changed_until(Pager::State& s, std::unique_lock<std::mutex>& lock,
                               std::chrono::steady_clock::time_point deadline) {
  ++s.waiters;
  const bool woken = s.changed.wait_until(lock, deadline) == std::cv_status::no_timeout;
  --s.waiters;
  return woken;
}
/// Whether fills copy into device chunks (a pool without a host window): only then may a page's
/// bytes still be on their way when it is mapped (Note [Device fills]).
inline bool copies_to_device(const Pager::State& s) {
  return s.pool->window(0) == nullptr;
}
/// Whether the prefetch thread has anything to do after an access (lock held).
inline bool prefetch_useful(const Pager::State& s) {
  return s.options.prefetch && s.policy->has_prediction();
}

// ---- prefetcher.cpp ----
void run_prefetcher(Pager::State& s);

// ---- pager_uvm.cpp (no lock held) ----

/// Over unified memory: subscribes the pager's range to CUPTI's unified-memory counters and
/// sets uvm_status ("on", or why not, logged once per reason). Before the profile publisher
/// opens, which records the status.
void subscribe_uvm(Pager::State& s);
/// Hands the range's records to the pager from now on (once the state is complete).
void attach_uvm(Pager::State& s);

}  // namespace lema::runtime
