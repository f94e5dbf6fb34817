// How many pages a budget holds, for both residency modes, and what to tell a user whose budget
// is too small.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/pager.hpp"

namespace lema::runtime::detail {

/// "the smallest budget that works is 6 MiB (6291456 bytes): raise the budget (--budget) to at
/// least that", and the page size as a way out only when it can still be lowered (Note [Budget
/// advice] in pager_acquire.cpp).
inline std::string budget_advice(std::uint64_t smallest_budget, std::uint64_t page_size,
                                 std::uint64_t min_page_size, const SettingNames& names) {
  std::string text = "the smallest budget that works is " + format_size(smallest_budget) + " (" +
                     std::to_string(smallest_budget) + " bytes): raise the budget (" +
                     names.budget + ") to at least that";
  if (page_size > min_page_size) {
    text += ", or lower the page size (" + names.page_size + "; its minimum is " +
            format_size(min_page_size) + ")";
  }
  return text;
}

/// Pages of `page_size` the pool holds for `budget`, capped at the model's `model_pages` (more
/// would never be used). Throws BudgetError with both numbers when the budget holds no page.
inline std::size_t pool_pages(std::uint64_t budget, std::uint64_t page_size,
                              std::size_t model_pages, std::uint64_t min_page_size,
                              const SettingNames& names) {
  if (budget < page_size)
    throw BudgetError("budget " + format_size(budget) + " (" + std::to_string(budget) +
                          " bytes) is smaller than one page (" + format_size(page_size) + "); " +
                          budget_advice(page_size, page_size, min_page_size, names),
                      {.needed_bytes = page_size,
                       .pinned_bytes = 0,
                       .budget_bytes = budget,
                       .smallest_budget = page_size,
                       .page_size = page_size});
  return static_cast<std::size_t>(
      std::min<std::uint64_t>(budget / page_size, std::max<std::size_t>(model_pages, 1)));
}

}  // namespace lema::runtime::detail
