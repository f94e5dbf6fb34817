// acquire(): make pages resident and pin them.
//
// Note [All-or-nothing claim]: an acquire takes no pin and no chunk until it can take every
// chunk it needs at once (free chunks plus evictable pages outside its own request). Two
// acquires that each held part of what they need while waiting for the rest could otherwise
// deadlock each other under a small budget. While it waits it holds nothing of its request, so
// the only way to wait forever is a caller holding other leases (see pager.hpp), and the case
// where the calling thread's own leases make the request impossible is refused with a
// BudgetError.
//
// Note [Failed fills]
// ~~~~~~~~~~~~~~~~~~~
// A fill fails when the checkpoint cannot be read (EIO, or a file truncated or rewritten while
// in use). Its page goes back to absent with its chunk freed, and the error is kept with the
// page, numbered by the page's count of published fills. Every acquirer that found the page
// being filled (on any thread) waits for exactly that fill and fails with its error: once, and
// without reading the page again, so a file that stays bad cannot keep waiters reading it in
// turn. The prefetcher leaves a page whose last fill failed alone (prefetcher.cpp) until a fill
// of it succeeds; the next acquire that finds the page absent reads it again, and fails again
// with the same error if the file is still bad.
//
// Note [Budget advice]: a budget error says how many pages the request spans and the smallest
// budget that would hold them, not its bytes: ranges are not aligned to pages, so N bytes can
// span more than N / page_size pages, and "needs 4 MiB but the budget holds 4 MiB" helps nobody.
// It names the settings the way the opener's caller writes them (PagerOptions::setting_names:
// --budget on the command line, budget= in Python, budget_bytes in C++), and offers a smaller
// page size only while the page size is above its minimum, the backend's granularity.
#include <algorithm>
#include <string>

#include "lema/base/error.hpp"
#include "detail/pool_size.hpp"
#include "lema/base/units.hpp"
#include "pager_state.hpp"

namespace lema::runtime {
namespace {

std::string pages_text(std::uint64_t pages, std::uint64_t page_size) {
  return std::to_string(pages) + (pages == 1 ? " page (" : " pages (") +
         format_size(pages * page_size) + ")";
}

std::string shortfall_text(const Pager::State& s, std::size_t needed) {
  return std::to_string(needed) + (needed == 1 ? " page of " : " pages of ") +
         format_size(s.page_size) + " (" + format_size(needed * s.page_size) +
         ") but the budget holds " + pages_text(s.chunk_count, s.page_size) + "; " +
         detail::budget_advice(needed * s.page_size, s.page_size, s.backend->granularity(),
                               s.options.setting_names);
}

[[noreturn]] void throw_too_big(const Pager::State& s, std::size_t needed) {
  throw BudgetError("acquire needs " + shortfall_text(s, needed));
}

// Pages the calling thread already pins outside `request` (sorted).
std::size_t own_pins_outside(const Pager::State& s, std::span<const PageId> request) {
  auto it = s.pins_by_thread.find(std::this_thread::get_id());
  if (it == s.pins_by_thread.end()) return 0;
  std::size_t n = 0;
  for (const auto& [page, count] : it->second)
    if (count > 0 && !std::binary_search(request.begin(), request.end(), page)) ++n;
  return n;
}

enum class Outcome { done, retry };

// Note [Device fills]: the copies into device chunks that may still run for `pages` (pinned by
// the caller, so none is evicted meanwhile). A consumer queue waits for them on the device;
// without one the caller waits on the host.
void wait_until_ready(Pager::State& s, std::span<const PageId> pages, const Queue* consumer) {
  std::vector<Fence> running;
  {
    std::lock_guard lock(s.mutex);
    for (PageId p : pages) {
      PageEntry& e = s.pages[p];
      if (e.ready.trivially_complete()) continue;
      if (s.backend->fence_complete(e.ready))
        e.ready = Fence{};
      else
        running.push_back(e.ready);
    }
  }
  if (running.empty()) return;
  if (consumer != nullptr) {
    for (const Fence& f : running) s.backend->queue_wait(*consumer, f);
    return;
  }
  const std::uint64_t start = now_ns();
  for (const Fence& f : running) s.backend->wait_fence(f);
  const std::uint64_t took = now_ns() - start;
  s.counters.add(s.counters.stall_ns, took);
  record_event(s, EventKind::stall, pages.front(), static_cast<std::uint32_t>(pages.size()), 0,
               start, took);
}

}  // namespace

std::string Pager::budget_shortfall(std::size_t pages) const {
  return shortfall_text(*state_, pages);
}

Lease Pager::acquire(const void* ptr, std::uint64_t bytes) {
  const ByteRange r{ptr, bytes};
  return acquire(std::span<const ByteRange>(&r, 1));
}

Lease Pager::acquire(std::span<const ByteRange> ranges) {
  return acquire_ranges(ranges, nullptr);
}

Lease Pager::acquire(std::span<const ByteRange> ranges, Queue consumer) {
  return acquire_ranges(ranges, &consumer);
}

Lease Pager::acquire_ranges(std::span<const ByteRange> ranges, const Queue* consumer) {
  std::vector<PageId> pages;
  for (const ByteRange& r : ranges) {
    const PageRange pr = state_->space->pages_of(r.ptr, r.bytes);
    for (std::uint32_t i = 0; i < pr.count; ++i) pages.push_back(pr.first + i);
  }
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  return acquire_sorted(std::move(pages), consumer);
}

Lease Pager::acquire_pages(PageRange range) {
  return acquire_page_range(range, nullptr);
}

Lease Pager::acquire_pages(PageRange range, Queue consumer) {
  return acquire_page_range(range, &consumer);
}

Lease Pager::acquire_page_range(PageRange range, const Queue* consumer) {
  LEMA_EXPECTS(static_cast<std::uint64_t>(range.first) + range.count <= state_->pages.size(),
               "acquire: pages [" + std::to_string(range.first) + ", " +
                   std::to_string(static_cast<std::uint64_t>(range.first) + range.count) +
                   ") are outside the address space of " + std::to_string(state_->pages.size()) +
                   " pages");
  std::vector<PageId> pages(range.count);
  for (std::uint32_t i = 0; i < range.count; ++i) pages[i] = range.first + i;
  return acquire_sorted(std::move(pages), consumer);
}

Lease Pager::acquire_sorted(std::vector<PageId> pages, const Queue* consumer,
                           std::optional<std::chrono::steady_clock::time_point> deadline) {
  State& s = *state_;
  if (pages.size() > s.chunk_count) throw_too_big(s, pages.size());
  Lease lease;
  if (pages.empty()) return lease;
  const auto self = std::this_thread::get_id();

  std::vector<PageId> ready, fenced;
  std::vector<FillClaim> to_fill;
  std::vector<PageId> to_wait;
  std::vector<std::uint32_t> fills_seen;  // per page of to_wait: its fills_done when claimed
  for (;;) {
    to_fill.clear();
    to_wait.clear();
    fills_seen.clear();
    std::uint64_t stall_start = 0;
    std::unique_lock lock(s.mutex);
    // Phase 1: wait until every chunk this request needs can be claimed at once.
    for (;;) {
      std::size_t needed = 0;
      for (PageId p : pages) needed += s.pages[p].state == PageState::absent ? 1 : 0;
      if (needed <= s.free_chunks.size()) break;
      collect_candidates(s, pages, ready, &fenced);
      if (needed <= s.free_chunks.size() + ready.size()) break;
      if (stall_start == 0) stall_start = now_ns();
      if (needed <= s.free_chunks.size() + ready.size() + fenced.size()) {
        // Enough pages are unpinned but their last use is still running: wait for one fence,
        // outside the lock (Note [Fenced reuse]).
        const Fence f = s.pages[fenced.front()].fences.front();
        lock.unlock();
        s.backend->wait_fence(f);
        lock.lock();
        continue;
      }
      if (own_pins_outside(s, pages) + pages.size() > s.chunk_count) {
        throw BudgetError("acquire needs " + pages_text(pages.size(), s.page_size) +
                          " while this thread's other leases pin " +
                          pages_text(own_pins_outside(s, pages), s.page_size) +
                          ", but the budget holds " + pages_text(s.chunk_count, s.page_size) +
                          "; release leases before acquiring more; " +
                          detail::budget_advice(
                              (own_pins_outside(s, pages) + pages.size()) * s.page_size,
                              s.page_size, s.backend->granularity(), s.options.setting_names));
      }
      if (!deadline) {
        wait_changed(s, lock);
      } else if (!wait_changed_until(s, lock, *deadline)) {
        return lease;  // empty: out of patience, nothing taken
      }
    }

    // Phase 2: claim everything under the same lock hold.
    for (PageId p : pages) s.policy->on_access(p);
    collect_candidates(s, pages, ready, nullptr);
    auto& mine = s.pins_by_thread[self];
    const std::uint64_t now = now_ns();
    for (PageId p : pages) {
      PageEntry& e = s.pages[p];
      ++e.pins;
      ++mine[p];
      switch (e.state) {
        case PageState::resident:
          s.counters.add(s.counters.hits);
          if (e.prefetched) {
            e.prefetched = false;
            s.counters.add(s.counters.prefetches_used);
          }
          record_event(s, EventKind::hit, p, 1, 0, now, 0);
          break;
        case PageState::filling:
          // Someone else (the prefetcher or another acquire) fills it: wait, count a hit.
          s.counters.add(s.counters.hits);
          if (e.prefetched) {
            e.prefetched = false;
            s.counters.add(s.counters.prefetches_used);
          }
          record_event(s, EventKind::hit, p, 1, 0, now, 0);
          to_wait.push_back(p);
          fills_seen.push_back(e.fills_done);
          break;
        case PageState::absent: {
          const std::uint32_t chunk = take_chunk(s, ready);
          e.state = PageState::filling;
          e.chunk = chunk;
          e.prefetched = false;
          s.chunk_owner[chunk] = p;
          to_fill.push_back({p, chunk, nullptr, {}});
          break;
        }
      }
    }
    lease.pager_ = this;
    lease.pages_ = pages;
    lease.owner_ = self;
    lock.unlock();

    // Phase 3: faults are served here, on the caller's thread, without the lock.
    std::exception_ptr error;
    if (!to_fill.empty()) {
      const std::uint64_t start = now_ns();
      fill_and_map(s, to_fill, FillOrigin::demand);
      const std::uint64_t took = now_ns() - start;
      s.counters.add(s.counters.faults, to_fill.size());
      s.counters.add(s.counters.stall_ns, took);
      for (const FillClaim& c : to_fill) {
        if (c.error && !error) error = c.error;
        record_event(s, EventKind::fault, c.page, 1, s.layout->page_fill_bytes(c.page), start,
                     took);
      }
      bool wake = false;
      {
        std::lock_guard relock(s.mutex);
        publish_fills(s, to_fill);
        wake = s.waiters > 0;
      }
      if (wake) s.changed.notify_all();
    }

    // Phase 4: pages others were filling. Note [Failed fills]: each is waited for until the
    // fill it found is published; when that fill failed, this acquire fails with its error.
    bool lost = false;
    std::exception_ptr waited_error;
    if (!to_wait.empty()) {
      const std::uint64_t start = now_ns();
      std::unique_lock relock(s.mutex);
      for (std::size_t i = 0; i < to_wait.size() && !waited_error; ++i) {
        const PageEntry& e = s.pages[to_wait[i]];
        wait_changed(s, relock, [&] { return e.fills_done != fills_seen[i]; });
        if (e.state == PageState::resident) continue;
        if (e.fill_error)
          waited_error = e.fill_error;
        else
          lost = true;  // not resident without an error: fill it here
      }
      relock.unlock();
      const std::uint64_t took = now_ns() - start;
      s.counters.add(s.counters.stall_ns, took);
      record_event(s, EventKind::stall, to_wait.front(), static_cast<std::uint32_t>(to_wait.size()),
                   0, start, took);
    }
    if (stall_start != 0) {
      const std::uint64_t took = now_ns() - stall_start;
      s.counters.add(s.counters.stall_ns, took);
      record_event(s, EventKind::stall, pages.front(), static_cast<std::uint32_t>(pages.size()), 0,
                   stall_start, took);
    }

    if (error || waited_error) {
      release_pins(lease, Fence{});
      rethrow_fill_error(error ? error : waited_error);
    }
    if (!lost) {
      // Host-visible pools are filled in place: nothing can still be on its way.
      if (copies_to_device(s)) wait_until_ready(s, pages, consumer);
      return lease;
    }
    // One of our pages is neither resident nor failed: drop everything and start over, so this
    // acquire fills the page itself.
    release_pins(lease, Fence{});
  }
}

}  // namespace lema::runtime
