// The pager's counters: always on, one relaxed atomic each, read as a snapshot.
//
// Counting rules:
//  - an access to a page is either a fault (the caller filled it) or a hit (it was resident, or
//    another thread or the prefetcher was filling it: the caller waited, which is added to
//    stall_ns, but did not read);
//  - prefetches_used: a prefetched page that was then accessed (also a hit);
//    prefetches_wasted: a prefetched page evicted before any access;
//  - peak_resident_bytes: the most pages ever mapped at once × page size; never above
//    budget_bytes;
//  - over unified memory (the managed backend) only, from CUPTI's unified-memory counters for
//    the pager's range: gpu_faults, the GPU page faults the driver served (CUPTI's fault groups:
//    faults on one page served together count once), i.e. accesses the schedule missed;
//    cpu_faults, CPU page faults on pages the device held; migrated_to_device_bytes /
//    migrated_to_host_bytes, what the driver moved, the pager's own prefetches included. They
//    are read when CUPTI delivers its records: Pager::stats() and mark_step() ask it to first.
//
// Thread safety: PagerCounters members may be updated from any thread; snapshot() is not atomic
// across counters (each value is exact, their sum may be mid-update).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace lema::runtime {

struct PagerStats {
  std::uint64_t faults = 0;
  std::uint64_t hits = 0;
  std::uint64_t prefetches_issued = 0;
  std::uint64_t prefetches_used = 0;
  std::uint64_t prefetches_wasted = 0;
  std::uint64_t bytes_read = 0;
  std::uint64_t evictions = 0;
  std::uint64_t stall_ns = 0;
  std::uint64_t resident_bytes = 0;
  std::uint64_t peak_resident_bytes = 0;
  std::uint64_t host_cache_hits = 0;   // fills copied from the host cache tier, not read
  // Accesses that bypassed the guard (a read outside any op) and were served by the guard
  // fault fallback; each is a fault or a hit as well.
  std::uint64_t fallback_faults = 0;
  std::uint64_t host_cache_bytes = 0;  // the host cache tier's size (0: none)
  // Fills copied from the shared host cache tier (another local process, or this one, read the
  // page), not read from the files; and that tier's size (0: none).
  std::uint64_t shared_cache_hits = 0;
  std::uint64_t shared_host_cache_bytes = 0;
  std::uint64_t budget_bytes = 0;  // as given; the pool holds floor(budget / page size) pages
  std::uint64_t page_size = 0;
  std::string io_path;  // Reader::path_name()
  std::uint64_t gpu_faults = 0;
  std::uint64_t cpu_faults = 0;
  std::uint64_t migrated_to_device_bytes = 0;
  std::uint64_t migrated_to_host_bytes = 0;
  // Whether the four counters above are counted: "on"; empty when the backend's memory is not
  // unified memory; otherwise why not (no CUPTI library, counters refused by the device, ...).
  std::string uvm_counters;
  // Written weight pages (Note [Dirty pages] in the runtime): evictions that found their page
  // written and kept it in the spill store, the bytes so kept, the distinct pages the store
  // holds, and fills read back from it instead of the checkpoint.
  std::uint64_t dirty_evictions = 0;
  std::uint64_t spilled_bytes = 0;
  std::uint64_t spilled_pages = 0;
  std::uint64_t spill_fills = 0;
};

class PagerCounters {
 public:
  std::atomic<std::uint64_t> faults{0};
  std::atomic<std::uint64_t> hits{0};
  std::atomic<std::uint64_t> prefetches_issued{0};
  std::atomic<std::uint64_t> prefetches_used{0};
  std::atomic<std::uint64_t> prefetches_wasted{0};
  std::atomic<std::uint64_t> bytes_read{0};
  std::atomic<std::uint64_t> evictions{0};
  std::atomic<std::uint64_t> stall_ns{0};
  std::atomic<std::uint64_t> resident_pages{0};
  std::atomic<std::uint64_t> peak_resident_pages{0};
  std::atomic<std::uint64_t> host_cache_hits{0};
  std::atomic<std::uint64_t> shared_cache_hits{0};
  std::atomic<std::uint64_t> fallback_faults{0};
  std::atomic<std::uint64_t> gpu_faults{0};
  std::atomic<std::uint64_t> cpu_faults{0};
  std::atomic<std::uint64_t> migrated_to_device_bytes{0};
  std::atomic<std::uint64_t> migrated_to_host_bytes{0};
  std::atomic<std::uint64_t> dirty_evictions{0};
  std::atomic<std::uint64_t> spill_fills{0};

  void add(std::atomic<std::uint64_t>& counter, std::uint64_t v = 1) noexcept {
    counter.fetch_add(v, std::memory_order_relaxed);
  }
  /// One more page mapped: updates the peak.
  void page_mapped() noexcept;
  void page_unmapped() noexcept { resident_pages.fetch_sub(1, std::memory_order_relaxed); }

  PagerStats snapshot(std::uint64_t page_size, std::uint64_t budget_bytes,
                      std::string io_path) const;
};

}  // namespace lema::runtime
