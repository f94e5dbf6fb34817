// Eviction and prefetch policies of the Pager.
//
// A policy sees every page access in program order and decides which resident page to give up
// when the pool is full, and which pages to load ahead of use.
//  - lru:   evicts the least recently used page; predicts nothing (pure demand paging).
//  - trace: records the access sequence, detects by itself that it repeats (a training step
//           walks the same pages in the same order every step), then evicts the page whose next
//           use is furthest away (Belady's MIN) and predicts the next pages for the prefetcher.
//           When the sequence stops matching the learned period it forgets it and re-learns.
//
// Thread safety: none. The Pager calls a policy under its own lock only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace lema::runtime {

using PageId = std::uint32_t;

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string_view name() const = 0;

  /// Page `page` was accessed (acquired by a caller), hit or miss, in program order.
  virtual void on_access(PageId page) = 0;
  /// Page `page` became resident (demand fill or prefetch) / was evicted.
  virtual void on_resident(PageId page) = 0;
  virtual void on_evicted(PageId page) = 0;

  /// A caller's hint that resident, unpinned `page` will not be used soon (Pager::demote): make
  /// it the next victim, ahead of every page the policy would otherwise pick, until it is
  /// accessed again. Not an eviction. Default: ignore (Note [Demote hint] in pager_evict.cpp).
  virtual void on_demote(PageId page) { (void)page; }

  /// Picks the page to evict among `candidates` (resident, unpinned, fence complete; non-empty).
  virtual PageId choose_victim(std::span<const PageId> candidates) = 0;

  /// Accesses from now until `page` is used next: 0 = it is the very next access; nullopt =
  /// unknown or never again (treated as infinitely far).
  virtual std::optional<std::uint64_t> next_use(PageId page) const = 0;

  /// Up to `max` distinct pages predicted to be accessed next, soonest first (empty when the
  /// policy predicts nothing). Includes resident pages; the pager skips those.
  virtual std::vector<PageId> predict_next(std::size_t max) const = 0;

  /// For loading `page` (not resident) ahead of its next use: the candidate that Belady's MIN
  /// will evict when `page` is next accessed, provided evicting it already now costs no extra
  /// fetch (it is not used before then, nor is it the page accessed last when that page tends
  /// to be accessed again at once). nullopt = not now (or the policy predicts nothing). Loading the
  /// predicted pages soonest first this way, into free chunks or in place of this victim, and
  /// stopping at the first nullopt, fetches exactly what MIN fetches, only earlier. (Swapping
  /// whenever the victim's next use is later than the page's does not: on a cyclic scan it
  /// evicts the page just used, which MIN would keep, and fetches on every access.)
  virtual std::optional<PageId> prefetch_victim(PageId page,
                                                std::span<const PageId> candidates) const {
    (void)page;
    (void)candidates;
    return std::nullopt;
  }

  /// A training step ended (optional hint from a caller that knows; the trace policy also
  /// detects steps by itself).
  virtual void mark_step() {}

  /// True once the trace policy has learned a repeating sequence.
  virtual bool has_prediction() const { return false; }

  /// Length of the learned repeating sequence, counted in accesses to a page other than the one
  /// accessed just before (repeats of a page in a row are one access to the trace policy); 0 when
  /// nothing is learned.
  virtual std::size_t period_length() const { return 0; }
  /// Times a learned sequence stopped matching and was forgotten.
  virtual std::uint64_t relearns() const { return 0; }
};

enum class PolicyKind { lru, trace };

std::optional<PolicyKind> parse_policy(std::string_view name);
std::unique_ptr<EvictionPolicy> make_policy(PolicyKind kind, std::size_t page_count);
std::unique_ptr<EvictionPolicy> make_lru_policy(std::size_t page_count);
std::unique_ptr<EvictionPolicy> make_trace_policy(std::size_t page_count);

/// Fetches that Belady's MIN needs to serve `accesses` (page ids) with `capacity` page frames,
/// starting empty: the optimum any demand pager (or prefetcher that never evicts a page needed
/// sooner than the one it loads) can reach. Used by tests, `lema bench pager` and the profiler.
std::uint64_t belady_fetches(std::span<const PageId> accesses, std::size_t capacity);
/// The same sequence served by LRU, for comparison.
std::uint64_t lru_fetches(std::span<const PageId> accesses, std::size_t capacity);

}  // namespace lema::runtime
