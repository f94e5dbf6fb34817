// Victim choice and eviction. Every function here runs under the page table's lock.
#include <algorithm>

#include "pager_state.hpp"

namespace lema::runtime {

bool evictable(Pager::State& s, PageId page) {
  PageEntry& e = s.table.entry(page);
  if (e.state != PageState::resident || e.pins != 0) return false;
  // Note [Fenced reuse]: a chunk is reused only once the last use of its page completed on the
  // device; unmapping under a running kernel would let it read another page's bytes.
  std::erase_if(e.fences, [&](const Fence& f) { return s.backend->fence_complete(f); });
  return e.fences.empty();
}

void collect_candidates(Pager::State& s, std::span<const PageId> exclude,
                        std::vector<PageId>& ready, std::vector<PageId>* fenced) {
  ready.clear();
  if (fenced != nullptr) fenced->clear();
  // The resident set is exactly the owners of the chunks: O(chunks), not O(pages).
  for (PageId page : s.table.chunk_owners()) {
    if (page == kNoPage) continue;
    const PageEntry& e = s.table.entry(page);
    if (e.state != PageState::resident || e.pins != 0) continue;
    if (std::binary_search(exclude.begin(), exclude.end(), page)) continue;
    if (evictable(s, page)) {
      ready.push_back(page);
    } else if (fenced != nullptr) {
      fenced->push_back(page);
    }
  }
}

// Note [Dirty pages]
// ~~~~~~~~~~~~~~~~~~
// A write to a weight is never lost and never reaches the checkpoint. Pages mapped read_write
// keep written bytes apart from their chunk (the host backend maps them copy-on-write: Note
// [Private weight pages]), so a page is dirty exactly when Backend::written_bytes() finds a
// written system page in it. Evicting a dirty page first copies it, from its model address,
// into the spill store (a private temporary file, spill_store.hpp); from then on every fill of
// that page reads the store instead of the files, for the life of the pager. A page never
// written costs one pagemap read at eviction and nothing else. The copy runs under the pager's
// lock: a memcpy-sized write into a page-cache file, far cheaper than the fill that follows.
// Fault mode does the same with userfaultfd write protection (uffd_region.cpp). The written
// private copy is memory beside the pool until the eviction: a page written while resident
// costs up to twice its size.
std::uint32_t evict_page(Pager::State& s, PageId page) {
  const PageEntry& e = s.table.entry(page);
  const std::uint64_t start = now_ns();
  if (s.spill) {
    const std::byte* at = s.space->page_address(page);
    if (s.backend->written_bytes(at, s.page_size) > 0) {
      s.spill->write(page, at);
      s.counters.add(s.counters.dirty_evictions);
    }
  }
  s.backend->unmap(s.space->page_address(page), s.page_size);
  s.counters.page_unmapped();
  s.counters.add(s.counters.evictions);
  if (e.prefetched) s.counters.add(s.counters.prefetches_wasted);
  const std::uint32_t chunk = s.table.evicted(page);
  s.policy->on_evicted(page);
  if (s.evict_hook) s.evict_hook(page);
  record_event(s, EventKind::evict, page, 1, s.page_size, start, now_ns() - start);
  return chunk;
}

// Note [Demote hint]
// ~~~~~~~~~~~~~~~~~~
// A caller that knows a page will not be needed soon (the MoE layer, for the experts its router
// did not choose) says so with Pager::demote. Unlike Pager::evict the page stays mapped: if
// nothing needs room it is still there when the router picks that expert again, and if
// something does, it goes before pages the caller may still use. The pager only forwards the
// hint, under the page table's lock like every policy call, for pages resident and unpinned now
// (a pinned page is in use: the hint would contradict the caller holding it). The lru policy
// moves the page to its cold end (it stays there until its next access); the trace policy does
// the same while it has learned nothing and otherwise trusts its learned future, which on a
// repeating step is exact; belady_fetches() replays a whole known sequence and has no hints.
std::size_t Pager::demote(PageRange range) {
  State& s = *state_;
  std::lock_guard lock(s.table.mutex());
  LEMA_EXPECTS(range.first + range.count <= s.table.page_count(),
               "demote: pages beyond the end of the address space");
  std::size_t demoted = 0;
  for (PageId page = range.first; page < range.first + range.count; ++page) {
    const PageEntry& e = s.table.entry(page);
    if (e.state != PageState::resident || e.pins != 0) continue;
    s.policy->on_demote(page);
    ++demoted;
  }
  return demoted;
}

std::uint32_t take_chunk(Pager::State& s, std::vector<PageId>& candidates) {
  if (s.table.free_chunk_count() != 0) return s.table.take_free_chunk();
  const PageId victim = s.policy->choose_victim(candidates);
  auto it = std::find(candidates.begin(), candidates.end(), victim);
  if (it == candidates.end()) it = candidates.begin();  // a policy bug must not break the pool
  const PageId chosen = *it;
  candidates.erase(it);
  return evict_page(s, chosen);
}

}  // namespace lema::runtime
