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
         ") but the budget holds " + pages_text(s.table.chunk_count(), s.page_size) + "; " +
         detail::budget_advice(needed * s.page_size, s.page_size, s.backend->granularity(),
                               s.options.setting_names);
}

[[noreturn]] void throw_too_big(const Pager::State& s, std::size_t needed) {
  throw BudgetError("acquire needs " + shortfall_text(s, needed),
                    {.needed_bytes = needed * s.page_size,
                     .pinned_bytes = 0,
                     .budget_bytes = s.table.chunk_count() * s.page_size,
                     .smallest_budget = needed * s.page_size,
                     .page_size = s.page_size});
}

[[noreturn]] void throw_own_pins(const Pager::State& s, std::size_t needed, std::size_t pinned) {
  const std::uint64_t smallest = (pinned + needed) * s.page_size;
  throw BudgetError("acquire needs " + pages_text(needed, s.page_size) +
                        " while this thread's other leases pin " +
                        pages_text(pinned, s.page_size) + ", but the budget holds " +
                        pages_text(s.table.chunk_count(), s.page_size) +
                        "; release leases before acquiring more; " +
                        detail::budget_advice(smallest, s.page_size, s.backend->granularity(),
                                              s.options.setting_names),
                    {.needed_bytes = needed * s.page_size,
                     .pinned_bytes = pinned * s.page_size,
                     .budget_bytes = s.table.chunk_count() * s.page_size,
                     .smallest_budget = smallest,
                     .page_size = s.page_size});
}

// ---- the steps of an acquire, in order ----

// Step 1 (lock held): waits until every chunk the request needs can be claimed at once (Note
// [All-or-nothing claim]). Starts the stall clock when it waits. False when `deadline` passed
// first. Throws BudgetError when the calling thread's own leases make the request impossible,
// PagerBroken once the pager is broken.
bool wait_for_room(Pager::State& s, std::unique_lock<std::mutex>& lock,
                   std::span<const PageId> pages,
                   const std::optional<std::chrono::steady_clock::time_point>& deadline,
                   std::uint64_t& stall_start) {
  std::vector<PageId> ready, fenced;
  for (;;) {
    if (s.device_errors.broken()) {
      throw PagerBroken("the pager serves no more acquires after a device error it could not "
                        "report (" +
                        s.device_errors.why_broken() +
                        "); pages a kernel may still read stay pinned: close the checkpoint and "
                        "open it again");
    }
    if (s.paused)
      throw PagerPaused("the checkpoint's pages are paused (their memory was given back); call "
                        "resume() before using its tensors");
    const std::size_t needed = s.table.absent_count(pages);
    if (needed <= s.table.free_chunk_count()) return true;
    collect_candidates(s, pages, ready, &fenced);
    if (needed <= s.table.free_chunk_count() + ready.size()) return true;
    if (stall_start == 0) stall_start = now_ns();
    if (needed <= s.table.free_chunk_count() + ready.size() + fenced.size()) {
      // Enough pages are unpinned but their last use is still running: wait for one fence,
      // outside the lock (Note [Fenced reuse]).
      const Fence f = s.table.entry(fenced.front()).fences.front();
      lock.unlock();
      s.backend->wait_fence(f);
      lock.lock();
      continue;
    }
    const std::size_t pinned = s.table.pins_outside(std::this_thread::get_id(), pages);
    if (pinned + pages.size() > s.table.chunk_count()) throw_own_pins(s, pages.size(), pinned);
    if (!deadline) {
      s.table.wait(lock);
    } else if (!s.table.wait_until(lock, *deadline)) {
      return false;
    }
  }
}

/// A page another thread was filling when the acquire pinned it, and the count of its
/// published fills then (Note [Failed fills]).
struct FillOfAnother {
  PageId page = 0;
  std::uint32_t fills_seen = 0;
};

/// What step 2 took: the pages this acquire fills itself, and those others fill.
struct Claimed {
  std::vector<FillClaim> to_fill;
  std::vector<FillOfAnother> to_wait;
};

void count_hit(Pager::State& s, PageEntry& e, PageId page, std::uint64_t now) {
  s.counters.add(s.counters.hits);
  if (e.prefetched) {
    e.prefetched = false;
    s.counters.add(s.counters.prefetches_used);
  }
  record_event(s, EventKind::hit, page, 1, 0, now, 0);
}

// Step 2 (lock held, under the same hold as step 1): pins every page and claims a chunk for each
// absent one, evicting victims the policy picks among the pages outside the request.
Claimed claim_pages(Pager::State& s, std::span<const PageId> pages, std::thread::id self) {
  for (PageId p : pages) s.policy->on_access(p);
  std::vector<PageId> ready;
  collect_candidates(s, pages, ready, nullptr);
  Claimed out;
  const std::uint64_t now = now_ns();
  for (PageId p : pages) {
    PageEntry& e = s.table.entry(p);
    s.table.pin(p, self);
    switch (e.state) {
      case PageState::resident:
        count_hit(s, e, p, now);
        break;
      case PageState::filling:
        // Someone else (the prefetcher or another acquire) fills it: wait, count a hit.
        count_hit(s, e, p, now);
        out.to_wait.push_back({p, e.fills_done});
        break;
      case PageState::absent:
        s.table.claim(p, take_chunk(s, ready), /*prefetched=*/false);
        out.to_fill.push_back({p, e.chunk, nullptr, {}});
        break;
    }
  }
  return out;
}

// Step 3 (no lock): faults are served here, on the caller's thread. Returns the first fill's
// error, after publishing every outcome.
std::exception_ptr fill_claimed(Pager::State& s, std::span<FillClaim> to_fill) {
  if (to_fill.empty()) return nullptr;
  const std::uint64_t start = now_ns();
  s.fills->fill_and_map(to_fill, FillOrigin::demand);
  const std::uint64_t took = now_ns() - start;
  s.counters.add(s.counters.faults, to_fill.size());
  s.counters.add(s.counters.stall_ns, took);
  std::exception_ptr error;
  for (const FillClaim& c : to_fill) {
    if (c.error && !error) error = c.error;
    record_event(s, EventKind::fault, c.page, 1, s.layout->page_fill_bytes(c.page), start, took);
  }
  bool wake = false;
  {
    std::lock_guard lock(s.table.mutex());
    publish_fills(s, to_fill);
    wake = s.table.has_waiters();
  }
  if (wake) s.table.notify();
  return error;
}

struct WaitOutcome {
  std::exception_ptr error;  // the error of a fill waited for
  bool lost = false;         // a page neither resident nor failed: fill it here
};

// Step 4 (takes the lock): pages others were filling. Note [Failed fills]: each is waited for
// until the fill it found is published; when that fill failed, this acquire fails with its error.
WaitOutcome wait_for_fills(Pager::State& s, std::span<const FillOfAnother> to_wait) {
  WaitOutcome out;
  if (to_wait.empty()) return out;
  const std::uint64_t start = now_ns();
  {
    std::unique_lock lock(s.table.mutex());
    for (const FillOfAnother& w : to_wait) {
      const PageEntry& e = s.table.entry(w.page);
      s.table.wait(lock, [&] { return e.fills_done != w.fills_seen; });
      if (e.state == PageState::resident) continue;
      if (!e.fill_error) {
        out.lost = true;
        continue;
      }
      out.error = e.fill_error;
      break;
    }
  }
  const std::uint64_t took = now_ns() - start;
  s.counters.add(s.counters.stall_ns, took);
  record_event(s, EventKind::stall, to_wait.front().page,
               static_cast<std::uint32_t>(to_wait.size()), 0, start, took);
  return out;
}

// Step 5: the time step 1 waited for room, as one stall.
void record_room_stall(Pager::State& s, std::span<const PageId> pages, std::uint64_t stall_start) {
  if (stall_start == 0) return;
  const std::uint64_t took = now_ns() - stall_start;
  s.counters.add(s.counters.stall_ns, took);
  record_event(s, EventKind::stall, pages.front(), static_cast<std::uint32_t>(pages.size()), 0,
               stall_start, took);
}

// Step 6, Note [Device fills]: the copies into device chunks that may still run for `pages`
// (pinned by the caller, so none is evicted meanwhile). A consumer queue waits for them on the
// device; without one the caller waits on the host.
void wait_until_ready(Pager::State& s, std::span<const PageId> pages, const Queue* consumer) {
  std::vector<Fence> running;
  {
    std::lock_guard lock(s.table.mutex());
    for (PageId p : pages) {
      PageEntry& e = s.table.entry(p);
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
  const std::size_t page_count = state_->table.page_count();
  LEMA_EXPECTS(static_cast<std::uint64_t>(range.first) + range.count <= page_count,
               "acquire: pages [" + std::to_string(range.first) + ", " +
                   std::to_string(static_cast<std::uint64_t>(range.first) + range.count) +
                   ") are outside the address space of " + std::to_string(page_count) +
                   " pages");
  std::vector<PageId> pages(range.count);
  for (std::uint32_t i = 0; i < range.count; ++i) pages[i] = range.first + i;
  return acquire_sorted(std::move(pages), consumer);
}

Lease Pager::acquire_sorted(std::vector<PageId> pages, const Queue* consumer,
                           std::optional<std::chrono::steady_clock::time_point> deadline) {
  State& s = *state_;
  if (pages.size() > s.table.chunk_count()) throw_too_big(s, pages.size());
  Lease lease;
  if (pages.empty()) return lease;
  const auto self = std::this_thread::get_id();
  for (;;) {
    std::uint64_t stall_start = 0;
    std::unique_lock lock(s.table.mutex());
    if (!wait_for_room(s, lock, pages, deadline, stall_start)) return lease;  // nothing taken
    Claimed claimed = claim_pages(s, pages, self);
    lease.pager_ = this;
    lease.pages_ = pages;
    lease.owner_ = self;
    lock.unlock();

    const std::exception_ptr fill_error = fill_claimed(s, claimed.to_fill);
    const WaitOutcome waited = wait_for_fills(s, claimed.to_wait);
    record_room_stall(s, pages, stall_start);
    if (fill_error || waited.error) {
      release_pins(lease, Fence{});
      rethrow_fill_error(fill_error ? fill_error : waited.error);
    }
    if (!waited.lost) {
      // Host-visible pools are filled in place: nothing can still be on its way.
      if (s.fills->copies_to_device()) wait_until_ready(s, pages, consumer);
      // Note [Dropped leases]: dropped without release, it is released on this queue.
      if (consumer != nullptr) lease.consumer_ = *consumer;
      return lease;
    }
    // One of our pages is neither resident nor failed: drop everything and start over, so this
    // acquire fills the page itself.
    release_pins(lease, Fence{});
  }
}

}  // namespace lema::runtime
