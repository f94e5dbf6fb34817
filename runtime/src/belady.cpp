// Offline simulators: Belady's MIN (the optimum) and LRU, on a recorded access sequence.
#include <algorithm>
#include <queue>
#include <set>
#include <utility>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {
namespace {

void check_capacity(std::size_t capacity) {
  LEMA_EXPECTS(capacity > 0, "a cache simulation needs at least one page frame (capacity 0)");
}

/// Dense ids 0..distinct-1 for the pages of `accesses`, so the simulators index arrays.
std::vector<std::uint32_t> dense_ids(std::span<const PageId> accesses, std::size_t& distinct) {
  std::vector<PageId> pages(accesses.begin(), accesses.end());
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  distinct = pages.size();
  std::vector<std::uint32_t> ids(accesses.size());
  for (std::size_t i = 0; i < accesses.size(); ++i) {
    ids[i] = static_cast<std::uint32_t>(std::lower_bound(pages.begin(), pages.end(), accesses[i]) -
                                        pages.begin());
  }
  return ids;
}

}  // namespace

std::uint64_t belady_fetches(std::span<const PageId> accesses, std::size_t capacity) {
  check_capacity(capacity);
  const std::size_t n = accesses.size();
  std::size_t distinct = 0;
  const std::vector<std::uint32_t> ids = dense_ids(accesses, distinct);

  // next[i]: index of the next access to the page of access i; n = never again.
  std::vector<std::size_t> next(n);
  std::vector<std::size_t> upcoming(distinct, n);
  for (std::size_t i = n; i-- > 0;) {
    next[i] = upcoming[ids[i]];
    upcoming[ids[i]] = i;
  }

  // A max-heap of (next use, page) over resident pages, with lazy deletion: an entry is live
  // while it matches the page's current next use (next-use indices are unique per page).
  constexpr std::size_t kAbsent = static_cast<std::size_t>(-1);
  std::vector<std::size_t> resident_next(distinct, kAbsent);
  std::priority_queue<std::pair<std::size_t, std::uint32_t>> furthest;
  std::size_t resident = 0;
  std::uint64_t fetches = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t page = ids[i];
    if (resident_next[page] == kAbsent) {
      ++fetches;
      if (resident == capacity) {
        for (;;) {
          const auto [use, victim] = furthest.top();
          furthest.pop();
          if (resident_next[victim] == use) {
            resident_next[victim] = kAbsent;
            --resident;
            break;
          }
        }
      }
      ++resident;
    }
    resident_next[page] = next[i];
    furthest.emplace(next[i], page);
  }
  return fetches;
}

std::uint64_t lru_fetches(std::span<const PageId> accesses, std::size_t capacity) {
  check_capacity(capacity);
  std::size_t distinct = 0;
  const std::vector<std::uint32_t> ids = dense_ids(accesses, distinct);
  constexpr std::size_t kAbsent = static_cast<std::size_t>(-1);
  std::vector<std::size_t> last(distinct, kAbsent);
  std::set<std::pair<std::size_t, std::uint32_t>> by_age;  // (last access, page) of residents
  std::uint64_t fetches = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::uint32_t page = ids[i];
    if (last[page] != kAbsent) {
      by_age.erase({last[page], page});
    } else {
      ++fetches;
      if (by_age.size() == capacity) {
        last[by_age.begin()->second] = kAbsent;
        by_age.erase(by_age.begin());
      }
    }
    last[page] = i;
    by_age.emplace(i, page);
  }
  return fetches;
}

}  // namespace lema::runtime
