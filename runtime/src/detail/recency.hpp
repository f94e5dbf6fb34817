// Last-access order of pages: the LRU rule, shared by the lru policy and the trace policy (which
// falls back to it while it has learned nothing).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime::detail {

inline void check_page(PageId page, std::size_t page_count) {
  LEMA_EXPECTS(page < page_count, "page " + std::to_string(page) + " is outside the policy's " +
                                      std::to_string(page_count) +
                                      " pages; create the policy with the address space's page "
                                      "count");
}

/// O(1) per access (one tick per page); choosing among k candidates is O(k), which the pager
/// pays anyway to build the candidate list.
class RecencyOrder {
 public:
  explicit RecencyOrder(std::size_t page_count) : last_(page_count, 0) {}

  void touch(PageId page) { last_[page] = ++clock_; }
  /// Makes `page` as cold as a page never accessed, until its next touch (the demote hint).
  void demote(PageId page) { last_[page] = 0; }
  /// 0 = never accessed (or demoted since).
  std::uint64_t last(PageId page) const { return page < last_.size() ? last_[page] : 0; }
  std::size_t page_count() const { return last_.size(); }

  /// True when `a` is a better LRU victim than `b`: accessed longer ago, then the lower id (so
  /// the choice never depends on the candidates' order).
  bool older(PageId a, PageId b) const {
    const std::uint64_t ta = last(a), tb = last(b);
    return ta != tb ? ta < tb : a < b;
  }

  PageId least_recent(std::span<const PageId> candidates) const {
    LEMA_EXPECTS(!candidates.empty(), "choose_victim needs at least one candidate page");
    PageId best = candidates.front();
    for (PageId c : candidates.subspan(1)) {
      if (older(c, best)) best = c;
    }
    return best;
  }

 private:
  std::vector<std::uint64_t> last_;
  std::uint64_t clock_ = 0;
};

}  // namespace lema::runtime::detail
