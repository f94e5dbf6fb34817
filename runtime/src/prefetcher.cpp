// The prefetch thread: after accesses, loads the pages the policy predicts next.
//
// Note [Prefetch never costs a fetch]: predicted pages are taken soonest first and loaded into a
// free chunk, or in place of the victim EvictionPolicy::prefetch_victim() names: the page
// Belady's MIN evicts when the predicted page is next used, and only when evicting it already
// now costs no extra fetch (in particular its next use is later than the page's). At the first
// page without such a victim the prefetcher stops. Prefetching thus fetches what MIN fetches,
// only earlier.
//
// A predicted page whose last fill failed is skipped (Note [Failed fills]): retrying it after
// every access would read a bad file in a loop. The failure is logged once; the page is read
// again by the next acquire of it.
#include <spdlog/spdlog.h>

#include <algorithm>

#include "pager_state.hpp"

namespace lema::runtime {
namespace {

// Claims chunks for predicted pages; caller holds the lock.
std::vector<FillClaim> claim_predictions(Pager::State& s) {
  std::vector<FillClaim> claims;
  if (s.paused) return claims;  // the pool has no memory (Note [Pause])
  const std::vector<PageId> predicted = s.policy->predict_next(s.options.prefetch_depth);
  if (predicted.empty()) return claims;
  std::vector<PageId> ready;
  bool collected = false;
  for (PageId p : predicted) {
    if (p >= s.table.page_count()) continue;
    const PageEntry& e = s.table.entry(p);
    if (e.state != PageState::absent || e.fill_failed) continue;
    std::uint32_t chunk;
    if (s.table.free_chunk_count() != 0) {
      chunk = s.table.take_free_chunk();
    } else {
      if (!collected) {
        collect_candidates(s, {}, ready, nullptr);
        collected = true;
      }
      // The pages claimed earlier in this round are offered too: MIN would count them as
      // resident, and if it picks one of them the round stops (they cannot be evicted while
      // filling) instead of evicting a page MIN keeps.
      std::vector<PageId> offered = ready;
      for (const FillClaim& c : claims) offered.push_back(c.page);
      // Predictions come soonest first: once no swap is free of extra fetches, stop.
      const std::optional<PageId> victim = s.policy->prefetch_victim(p, offered);
      if (!victim) break;
      const auto it = std::find(ready.begin(), ready.end(), *victim);
      if (it == ready.end()) break;  // not evictable (claimed, pinned, fenced): stop here
      ready.erase(it);
      chunk = evict_page(s, *victim);
    }
    s.table.claim(p, chunk, /*prefetched=*/true);
    claims.push_back({p, chunk, nullptr, {}});
  }
  return claims;
}

}  // namespace

void run_prefetcher(Pager::State& s) {
  std::unique_lock lock(s.table.mutex());
  for (;;) {
    s.prefetch_cv.wait(lock, [&] { return s.stopping || s.prefetch_wanted; });
    if (s.stopping) return;
    s.prefetch_wanted = false;
    std::vector<FillClaim> claims = claim_predictions(s);
    if (claims.empty()) {
      if (s.table.has_waiters()) s.table.notify();  // quiesce() waits for this
      continue;
    }
    s.prefetch_busy = true;
    lock.unlock();

    const std::uint64_t start = now_ns();
    s.counters.add(s.counters.prefetches_issued, claims.size());
    for (const FillClaim& c : claims)
      record_event(s, EventKind::prefetch_issued, c.page, 1, s.layout->page_fill_bytes(c.page),
                   start, 0);
    // IO without the lock: hits on other pages proceed meanwhile.
    s.fills->fill_and_map(claims, FillOrigin::prefetch);
    const std::uint64_t took = now_ns() - start;
    for (const FillClaim& c : claims) {
      if (!c.error) {
        record_event(s, EventKind::prefetch_done, c.page, 1, s.layout->page_fill_bytes(c.page),
                     start, took);
        continue;
      }
      try {
        std::rethrow_exception(c.error);
      } catch (const std::exception& e) {
        spdlog::warn(
            "prefetch of page {} failed: {}; it is not prefetched again until it is read "
            "when used",
            c.page, e.what());
      } catch (...) {
        spdlog::warn("prefetch of page {} failed", c.page);
      }
    }

    lock.lock();
    publish_fills(s, claims);
    s.prefetch_busy = false;
    // More may be predictable now (the prediction window moved, chunks freed).
    s.prefetch_wanted = prefetch_useful(s);
    if (s.table.has_waiters()) s.table.notify();
  }
}

}  // namespace lema::runtime
