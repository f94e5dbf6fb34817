// The pager's page table: what each page of the address space is (absent, being filled,
// resident), which page owns each chunk of the pool, the free chunks, and the pins.
//
// Invariants (kept by the members, checked with LEMA_ASSERT where a caller could break them):
//  - a page is filling or resident exactly when it owns a chunk: owner(entry(p).chunk) == p;
//  - a chunk is free exactly when it has no owner, and then it is on the free list once;
//  - pins_by_thread holds, per acquiring thread, the pins that thread's leases hold, so the sum
//    over threads of a page's pins is at most its PageEntry::pins (pins of a lost lease, Note
//    [Device errors without a caller] in pager.cpp, stay on the page only).
//
// Thread safety: every member but the constructor and the sizes requires mutex() held. The lock
// also guards what the pager changes together with the table (the policy, the evict hook, the
// prefetcher's flags: pager_state.hpp); Note [Pager lock order] says what may be taken under it.
// The table knows no backend: whether a page's fences completed is asked by its callers.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lema/runtime/backend.hpp"
#include "lema/runtime/policy.hpp"

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

class PageTable {
 public:
  PageTable(std::size_t pages, std::size_t chunks);
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  std::mutex& mutex() noexcept { return mutex_; }
  std::size_t page_count() const noexcept { return pages_.size(); }
  std::size_t chunk_count() const noexcept { return owner_.size(); }

  PageEntry& entry(PageId page) { return pages_[page]; }
  const PageEntry& entry(PageId page) const { return pages_[page]; }
  /// Pages of `pages` that are absent: each needs a chunk to be claimed.
  std::size_t absent_count(std::span<const PageId> pages) const;

  // ---- chunks ----
  std::size_t free_chunk_count() const noexcept { return free_.size(); }
  /// The owner of every chunk (kNoPage when free): the resident and filling set, O(chunks).
  std::span<const PageId> chunk_owners() const noexcept { return owner_; }
  /// A free chunk, taken off the free list. There must be one.
  std::uint32_t take_free_chunk();
  /// An absent page takes `chunk` (free, taken off the list) to be filled: absent -> filling.
  void claim(PageId page, std::uint32_t chunk, bool prefetched);
  /// The fill of a claimed page succeeded: filling -> resident, its copy's fence kept until seen
  /// complete (a chunk is not reused while a copy may still write it).
  void fill_succeeded(PageId page, const Fence& ready);
  /// The fill of a claimed page failed: filling -> absent, its chunk back on the free list and
  /// the error kept for the fill's waiters (Note [Failed fills]).
  void fill_failed(PageId page, std::exception_ptr error);
  /// A resident page was unmapped: resident -> absent. Returns its chunk, owned by no page and
  /// not on the free list (the caller reuses it or frees it).
  std::uint32_t evicted(PageId page);
  /// Puts a chunk without owner back on the free list.
  void free_chunk(std::uint32_t chunk);

  // ---- pins ----
  /// One more pin of `page`, by a lease of `owner`.
  void pin(PageId page, std::thread::id owner);
  /// Drops the pins of a lease of `owner` on `pages`. With `last_use`, the pages keep it until
  /// it is seen complete.
  void unpin(std::span<const PageId> pages, std::thread::id owner, const Fence* last_use);
  /// The lease of `owner` on `pages` is lost (Note [Device errors without a caller]): its pins
  /// stay on the pages for good, so their chunks are never reused, but no longer count as the
  /// thread's own.
  void forget_owner(std::span<const PageId> pages, std::thread::id owner);
  /// Pages `owner` pins outside `request` (sorted).
  std::size_t pins_outside(std::thread::id owner, std::span<const PageId> request) const;

  // ---- waiting for changes (a fill published, pins or fences released, chunks freed) ----
  template <typename Pred>
  void wait(std::unique_lock<std::mutex>& lock, Pred pred) {
    ++waiters_;
    changed_.wait(lock, pred);
    --waiters_;
  }
  void wait(std::unique_lock<std::mutex>& lock) {
    ++waiters_;
    changed_.wait(lock);
    --waiters_;
  }
  /// False when `deadline` passed first.
  bool wait_until(std::unique_lock<std::mutex>& lock,
                  std::chrono::steady_clock::time_point deadline) {
    ++waiters_;
    const bool woken = changed_.wait_until(lock, deadline) == std::cv_status::no_timeout;
    --waiters_;
    return woken;
  }
  /// Whether anyone waits; then notify() after the lock is dropped.
  bool has_waiters() const noexcept { return waiters_ > 0; }
  /// Needs no lock.
  void notify() noexcept { changed_.notify_all(); }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::uint32_t waiters_ = 0;  // threads blocked on changed_ (notify only when > 0)
  std::vector<PageEntry> pages_;
  std::vector<PageId> owner_;        // per chunk; kNoPage when free
  std::vector<std::uint32_t> free_;  // handed out from the back
  // Pins per acquiring thread, to refuse (instead of waiting forever) an acquire that the
  // caller's own leases make impossible.
  std::unordered_map<std::thread::id, std::unordered_map<PageId, std::uint32_t>> pins_by_thread_;
};

}  // namespace lema::runtime
