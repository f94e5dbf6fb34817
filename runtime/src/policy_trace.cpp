// The trace policy: learns the repeating access sequence of a training step, then evicts the
// page used furthest in the future (Belady's MIN) and predicts the next pages for prefetch.
#include <algorithm>
#include <limits>

#include "detail/period_detector.hpp"
#include "detail/recency.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {
namespace {

// Note [Trace positions]
// ~~~~~~~~~~~~~~~~~~~~~~
// Repeats of a page in a row (several tensors of one page acquired one after another) are
// collapsed into one access: they never cost a fetch, and leaving them out keeps the recorded
// sequence short and free of trivial repetitions. Distances returned by next_use() are counted
// in these collapsed accesses; only their order matters to the pager. Once a period is learned,
// `cursor_` is the position in `cycle_` of the access expected next; each page's positions in
// the cycle are kept sorted (CSR arrays), so next_use() is one binary search. Because the
// eviction rule then is MIN on the periodic future, a demand pager driven by this policy fetches
// exactly what Belady's MIN fetches per step in steady state (asserted in the tests).
//
// Note [Prefetch victim]
// ~~~~~~~~~~~~~~~~~~~~~~
// Loading page q ahead of its use at distance d costs nothing extra only when it replaces the
// page MIN will evict at that moment: the resident page whose first use at or after d is the
// furthest. If that page is used before d, evicting it now would cost a fetch MIN does not make,
// so the prefetcher waits; likewise for the page just accessed when that page has been seen
// accessed twice in a row (repeats are collapsed, so the next access may be it again). Since q is
// the soonest missing page, nothing else is fetched before d, so MIN's resident set at d is the
// current one and the choice is exactly MIN's.
class TracePolicy final : public EvictionPolicy {
 public:
  explicit TracePolicy(std::size_t page_count)
      : recency_(page_count),
        detector_(std::clamp<std::size_t>(16 * page_count, 1u << 14, 1u << 24)),
        repeats_in_a_row_(page_count, false),
        seen_(page_count, 0) {}

  std::string_view name() const override { return "trace"; }

  void on_access(PageId page) override {
    detail::check_page(page, recency_.page_count());
    recency_.touch(page);
    if (page == last_) {  // Note [Trace positions]
      repeats_in_a_row_[page] = true;
      return;
    }
    last_ = page;
    if (!cycle_.empty()) {
      if (cycle_[cursor_] == page) {
        if (++cursor_ == cycle_.size()) cursor_ = 0;
        return;
      }
      forget();
    }
    if (detector_.push(page)) learn(detector_.cycle());
  }

  // Before a period is learned the LRU fallback picks victims, so the demoted page goes to its
  // cold end. Once one is learned, MIN already knows each page's next use, which is exact on a
  // repeating step and better than the hint; the hint then only breaks ties among pages not
  // used again (Note [Demote hint] in pager_evict.cpp).
  void on_demote(PageId page) override {
    detail::check_page(page, recency_.page_count());
    recency_.demote(page);
  }
  void on_resident(PageId) override {}
  void on_evicted(PageId) override {}

  PageId choose_victim(std::span<const PageId> candidates) override {
    if (cycle_.empty()) return recency_.least_recent(candidates);
    LEMA_EXPECTS(!candidates.empty(), "choose_victim needs at least one candidate page");
    // Furthest next use first; "never again" is furthest; ties (only among those) go to LRU.
    constexpr std::uint64_t kNever = std::numeric_limits<std::uint64_t>::max();
    PageId best = candidates.front();
    std::uint64_t best_use = next_use(best).value_or(kNever);
    for (PageId c : candidates.subspan(1)) {
      const std::uint64_t use = next_use(c).value_or(kNever);
      if (use > best_use || (use == best_use && recency_.older(c, best))) {
        best = c;
        best_use = use;
      }
    }
    return best;
  }

  std::optional<std::uint64_t> next_use(PageId page) const override {
    return use_at_or_after(page, 0);
  }

  std::optional<PageId> prefetch_victim(PageId page,
                                        std::span<const PageId> candidates) const override {
    const std::optional<std::uint64_t> due = next_use(page);
    if (!due || candidates.empty()) return std::nullopt;
    // MIN's victim at that access: the furthest use counted from then (Note [Prefetch victim]).
    constexpr std::uint64_t kNever = std::numeric_limits<std::uint64_t>::max();
    PageId best = candidates.front();
    std::uint64_t best_use = use_at_or_after(best, *due).value_or(kNever);
    for (PageId c : candidates.subspan(1)) {
      const std::uint64_t use = use_at_or_after(c, *due).value_or(kNever);
      if (use > best_use || (use == best_use && recency_.older(c, best))) {
        best = c;
        best_use = use;
      }
    }
    if (best == last_ && repeats_in_a_row_[best]) return std::nullopt;
    if (next_use(best).value_or(kNever) < *due) return std::nullopt;
    return best;
  }

  /// Uses a per-page stamp array to keep pages distinct; like every method, not thread-safe.
  std::vector<PageId> predict_next(std::size_t max) const override {
    std::vector<PageId> out;
    if (cycle_.empty() || max == 0) return out;
    ++stamp_;
    for (std::size_t i = 0, pos = cursor_; i < cycle_.size() && out.size() < max; ++i) {
      const PageId page = cycle_[pos];
      if (seen_[page] != stamp_) {
        seen_[page] = stamp_;
        out.push_back(page);
      }
      if (++pos == cycle_.size()) pos = 0;
    }
    return out;
  }

  // Steps are detected from the sequence itself (Note [Period detection]); the hint adds
  // nothing the recording does not already show.
  void mark_step() override {}

  bool has_prediction() const override { return !cycle_.empty(); }
  std::size_t period_length() const override { return cycle_.size(); }
  std::uint64_t relearns() const override { return relearns_; }

 private:
  void learn(std::span<const PageId> cycle) {
    cycle_.assign(cycle.begin(), cycle.end());
    cursor_ = 0;
    // Positions of each page in the cycle, ascending, as CSR arrays indexed by page.
    offsets_.assign(recency_.page_count() + 1, 0);
    for (PageId page : cycle_) ++offsets_[page + 1];
    for (std::size_t i = 1; i < offsets_.size(); ++i) offsets_[i] += offsets_[i - 1];
    positions_.resize(cycle_.size());
    std::vector<std::uint32_t> fill(offsets_.begin(), offsets_.end() - 1);
    for (std::size_t pos = 0; pos < cycle_.size(); ++pos) {
      positions_[fill[cycle_[pos]]++] = static_cast<std::uint32_t>(pos);
    }
    detector_.restart(cycle_.size());
  }

  /// Accesses from now until the first use of `page` that is at least `from` accesses away.
  std::optional<std::uint64_t> use_at_or_after(PageId page, std::uint64_t from) const {
    if (cycle_.empty() || page >= recency_.page_count()) return std::nullopt;
    const auto first = positions_.begin() + offsets_[page];
    const auto last = positions_.begin() + offsets_[page + 1];
    if (first == last) return std::nullopt;
    const std::uint64_t period = cycle_.size();
    const std::uint64_t target = cursor_ + from;  // a position in the unrolled cycle
    const std::uint64_t base = target - target % period;
    const auto it = std::lower_bound(first, last, static_cast<std::uint32_t>(target % period));
    const std::uint64_t at = it != last ? base + *it : base + period + *first;
    return at - cursor_;
  }

  void forget() {
    ++relearns_;
    cycle_.clear();
    positions_.clear();
    offsets_.clear();
    cursor_ = 0;
    detector_.make_stricter();
  }

  detail::RecencyOrder recency_;
  detail::PeriodDetector detector_;
  PageId last_ = std::numeric_limits<PageId>::max();
  std::vector<PageId> cycle_;  // the learned period; empty = none
  std::size_t cursor_ = 0;
  std::vector<std::uint32_t> offsets_;    // page -> first index in positions_
  std::vector<std::uint32_t> positions_;  // positions in cycle_, grouped by page, ascending
  std::uint64_t relearns_ = 0;
  std::vector<bool> repeats_in_a_row_;  // pages ever accessed twice in a row
  mutable std::vector<std::uint64_t> seen_;
  mutable std::uint64_t stamp_ = 0;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_trace_policy(std::size_t page_count) {
  return std::make_unique<TracePolicy>(page_count);
}

}  // namespace lema::runtime
