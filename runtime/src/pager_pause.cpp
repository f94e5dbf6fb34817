// Pager::pause and resume: giving the pool's memory back while the addresses stay reserved.
#include <spdlog/spdlog.h>

#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/pager.hpp"
#include "pager_state.hpp"

namespace lema::runtime {

// Note [Pause]
// ~~~~~~~~~~~~
// What an RL loop asks of its weights between generation and training (vLLM's sleep mode,
// torch_memory_saver): their memory back, their addresses kept, so that every tensor stays
// valid. Pause needs no state of its own beyond the flag: once every page is evicted the page
// table is exactly a fresh pager's (all absent, every chunk free), and the pages come back
// the way they came the first time, from the files on demand, a written page from the spill
// store (evicting spills it, Note [Dirty pages]). So pause is eviction of everything plus
// Backend::release_pool_memory, and resume is restore_pool_memory.
//  - the flag is set first, under the lock: acquires and the prefetcher see it there, so no
//    fill starts after it; the prefetcher's fills already running are waited for;
//  - a pinned page cannot be evicted: its holder reads it. Rather than wait for a lease that
//    may belong to the caller itself, pause refuses at once and leaves everything as it was;
//    an acquire running a demand fill pins its pages too, so it is refused the same way;
//  - a page whose last use is still running on the device is waited for (Note [Fenced reuse]);
//  - the host cache tiers keep their memory: they are host memory the caller sized
//    separately, and a refill after resume reads them instead of the files.

void Pager::pause() {
  State& s = *state_;
  // Refused before anything is evicted: unified memory has no pool memory to give back.
  if (s.backend->capabilities().residency == BackendCapabilities::Residency::unified)
    throw InvalidArgument("pause: the " + std::string(s.backend->name()) +
                          " backend's unified memory cannot be released while keeping the "
                          "addresses; use gpu_memory=vmm to pause, or close the checkpoint");
  std::unique_lock lock(s.table.mutex());
  LEMA_EXPECTS(!s.paused, "pause: the checkpoint is paused already; call resume() first");
  s.paused = true;
  s.table.wait(lock, [&] { return !s.prefetch_busy; });
  std::size_t pinned = 0;
  for (PageId p = 0; p < s.table.page_count(); ++p)
    if (s.table.entry(p).pins != 0) ++pinned;
  if (pinned != 0) {
    s.paused = false;
    throw InvalidArgument("pause: " + std::to_string(pinned) + " page" +
                          (pinned == 1 ? " is" : "s are") +
                          " pinned by leases still held (tensors in use); release them "
                          "before pausing");
  }
  std::size_t evicted = 0;
  try {
    for (PageId page :
         std::vector<PageId>(s.table.chunk_owners().begin(), s.table.chunk_owners().end())) {
      if (page == kNoPage) continue;
      PageEntry& e = s.table.entry(page);
      for (const Fence& f : e.fences) s.backend->wait_fence(f);
      e.fences.clear();
      s.table.free_chunk(evict_page(s, page));
      ++evicted;
    }
    s.backend->release_pool_memory(*s.pool);
  } catch (...) {
    // What was evicted stays evicted (a later acquire refills it); the pool keeps its memory.
    s.paused = false;
    throw;
  }
  spdlog::debug("pager: paused; {} pages evicted, pool of {} given back", evicted,
                format_size(s.table.chunk_count() * s.page_size));
}

void Pager::resume() {
  State& s = *state_;
  std::lock_guard lock(s.table.mutex());
  LEMA_EXPECTS(s.paused, "resume: the checkpoint is not paused; call pause() first");
  s.backend->restore_pool_memory(*s.pool);
  s.paused = false;
  spdlog::debug("pager: resumed; pool of {} made again",
                format_size(s.table.chunk_count() * s.page_size));
}

bool Pager::paused() const {
  std::lock_guard lock(state_->table.mutex());
  return state_->paused;
}

}  // namespace lema::runtime
