#include "lema/runtime/stats.hpp"

namespace lema::runtime {

void PagerCounters::page_mapped() noexcept {
  const std::uint64_t now = resident_pages.fetch_add(1, std::memory_order_relaxed) + 1;
  std::uint64_t peak = peak_resident_pages.load(std::memory_order_relaxed);
  while (now > peak &&
         !peak_resident_pages.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

PagerStats PagerCounters::snapshot(std::uint64_t page_size, std::uint64_t budget_bytes,
                                   std::string io_path) const {
  auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  PagerStats s;
  s.faults = get(faults);
  s.hits = get(hits);
  s.prefetches_issued = get(prefetches_issued);
  s.prefetches_used = get(prefetches_used);
  s.prefetches_wasted = get(prefetches_wasted);
  s.bytes_read = get(bytes_read);
  s.evictions = get(evictions);
  s.stall_ns = get(stall_ns);
  s.host_cache_hits = get(host_cache_hits);
  s.shared_cache_hits = get(shared_cache_hits);
  s.fallback_faults = get(fallback_faults);
  s.gpu_faults = get(gpu_faults);
  s.cpu_faults = get(cpu_faults);
  s.migrated_to_device_bytes = get(migrated_to_device_bytes);
  s.migrated_to_host_bytes = get(migrated_to_host_bytes);
  s.dirty_evictions = get(dirty_evictions);
  s.spill_fills = get(spill_fills);
  s.resident_bytes = get(resident_pages) * page_size;
  s.peak_resident_bytes = get(peak_resident_pages) * page_size;
  s.budget_bytes = budget_bytes;
  s.page_size = page_size;
  s.io_path = std::move(io_path);
  return s;
}

}  // namespace lema::runtime
