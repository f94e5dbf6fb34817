// How many pages a budget holds, for both residency modes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime::detail {

/// Pages of `page_size` the pool holds for `budget`, capped at the model's `model_pages` (more
/// would never be used). Throws BudgetError with both numbers when the budget holds no page.
inline std::size_t pool_pages(std::uint64_t budget, std::uint64_t page_size,
                              std::size_t model_pages) {
  if (budget < page_size)
    throw BudgetError("budget " + format_size(budget) + " (" + std::to_string(budget) +
                      " bytes) is smaller than one page (" + format_size(page_size) +
                      "); raise --budget or lower --page-size");
  return static_cast<std::size_t>(
      std::min<std::uint64_t>(budget / page_size, std::max<std::size_t>(model_pages, 1)));
}

}  // namespace lema::runtime::detail
