// Internals of the Pager. The pager composes types that each keep their own invariants:
//   page_table.hpp     the page table: page states, chunk owners, free chunks, pins (its lock)
//   fill_pipeline.hpp  reading pages into chunks and mapping them; staging, copies in flight
//   host_page_cache.hpp, spill_store.hpp   the tiers beside the pool (each with its lock)
//   device_errors.hpp  device errors met where nothing can throw
// and its functions are split by concern:
//   pager.cpp          construction, teardown, leases, release, small queries
//   pager_acquire.cpp  acquire: the steps from a request to a lease, budget checks
//   pager_evict.cpp    victim choice and eviction (under the table's lock)
//   prefetcher.cpp     the prefetch thread
//   pager_uvm.cpp      CUPTI's unified-memory counters
//
// Note [Pager lock order]
// ~~~~~~~~~~~~~~~~~~~~~~~
// 1. PageTable::mutex(): the page table, and what changes with it (State's members marked so:
//    the policy, the evict hook, the prefetcher's flags). Held while calling the Backend's unmap
//    (eviction), fence queries and written_bytes, the policy, the evict hook, the spill store
//    (a dirty eviction writes it) and the event ring; never while waiting: no IO (Reader waits),
//    no Backend::wait_fence (but in ~Pager, when no other thread is left), no fill or map.
// 2. FillPipeline's lock (free staging buffers, copies in flight): held only around its own
//    lists and Backend::fence_complete; never together with the table's lock, either way round.
// 3. Leaves, taken under either or alone, taking nothing themselves: HostPageCache's,
//    SpillStore's and DeviceErrors' locks, and the shared host cache's segment lock (a robust
//    process-shared mutex, taken by fills only, with no lock of the pager held: a fill waiting
//    for another process's read of a page polls with the lock released, Note [Shared host
//    cache]).
// The CUPTI consumer (pager_uvm.cpp) runs under the collector's registry lock and takes none of
// these: counters and events only, both lock-free.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "device_errors.hpp"
#include "fill_pipeline.hpp"
#include "host_page_cache.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/profile.hpp"
#include "page_table.hpp"
#include "shared_host_cache.hpp"
#include "spill_store.hpp"
#include "uvm_counters.hpp"

namespace lema::runtime {

struct Pager::State {
  State(std::size_t event_capacity, std::size_t pages, std::size_t chunks)
      : events(event_capacity), table(pages, chunks) {}

  AddressSpace* space = nullptr;
  Backend* backend = nullptr;
  const Layout* layout = nullptr;
  PagerOptions options;
  std::uint64_t page_size = 0;
  std::unique_ptr<io::Reader> reader;
  std::string io_path;
  // The tiers: the pool; the host cache of a device pool (host_cache_bytes); the spill store of
  // written pages (Access::read_write, Note [Dirty pages]).
  std::unique_ptr<PhysicalPool> pool;
  std::unique_ptr<HostPageCache> host_cache;
  std::unique_ptr<SharedHostCache> shared_cache;  // shared_host_cache_bytes
  // The shared tier's pages registered with a device backend (Note [Registered shared tier] in
  // fill_pipeline.cpp): undone before shared_cache unmaps them, after `fills` is gone.
  struct SharedRegistration {
    Backend* backend = nullptr;  // null: not registered
    std::byte* base = nullptr;
    SharedRegistration() = default;
    SharedRegistration(const SharedRegistration&) = delete;
    SharedRegistration& operator=(const SharedRegistration&) = delete;
    ~SharedRegistration() {
      if (backend != nullptr) backend->unregister_host(base);
    }
  } shared_registration;
  std::unique_ptr<SpillStore> spill;

  PagerCounters counters;
  EventRing events;
  std::unique_ptr<ProfilePublisher> profile;  // set when LEMA_PROFILE is (see profile.hpp)
  DeviceErrors device_errors;

  std::unique_ptr<FillPipeline> fills;  // after the tiers it reads from and writes to
  PageTable table;

  // ---- guarded by table.mutex() ----
  std::unique_ptr<EvictionPolicy> policy;
  std::function<void(PageId)> evict_hook;
  bool prefetch_wanted = false;
  bool prefetch_busy = false;  // the prefetcher claimed pages and is filling them
  bool stopping = false;
  bool paused = false;  // Note [Pause] in pager_pause.cpp
  std::condition_variable prefetch_cv;

  std::thread prefetch_thread;

  // Unified memory only (pager_uvm.cpp, Note [UVM counters]): PagerStats::uvm_counters, the
  // consumer of CUPTI's records for this range, and its subscription. Declared last: the
  // subscription goes first, so the consumer is never called once anything it writes is gone.
  std::string uvm_status;
  std::unique_ptr<UvmConsumer> uvm_consumer;
  std::unique_ptr<UvmSubscription> uvm;
};

// ---- pager_evict.cpp (caller holds table.mutex()) ----

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

// ---- pager.cpp (caller holds table.mutex()) ----

/// Publishes the outcome of fills: resident pages, or absent with the chunk freed and the error
/// kept for the fill's waiters (Note [Failed fills]).
void publish_fills(Pager::State& s, std::span<const FillClaim> claims);
/// Throws a copy of a fill's error, owned by the calling thread (a read error is shared by every
/// waiter of the fill that failed).
[[noreturn]] void rethrow_fill_error(const std::exception_ptr& error);
/// Needs no lock (the ring and the publisher are lock-free); CUPTI's records arrive through it.
void record_event(Pager::State& s, EventKind kind, PageId first, std::uint32_t count,
                  std::uint64_t bytes, std::uint64_t start_ns, std::uint64_t duration_ns);
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
