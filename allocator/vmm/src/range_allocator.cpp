#include "range_allocator.hpp"

#include <algorithm>
#include <limits>

namespace lema::allocator {

RangeAllocator::RangeAllocator(std::uintptr_t base, std::uint64_t bytes) : base_(base) {
  const std::uint64_t usable = bytes - bytes % kGranule;
  if (usable != 0) free_.emplace(0, usable);
}

std::optional<std::uintptr_t> RangeAllocator::allocate(std::uint64_t bytes,
                                                       std::uint64_t alignment) {
  if (bytes > std::numeric_limits<std::uint64_t>::max() - 2 * kGranule) return std::nullopt;
  const std::uint64_t size = (bytes + kGranule - 1) / kGranule * kGranule;
  const std::uint64_t align = std::max(alignment, kGranule);
  std::lock_guard lock(mutex_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const std::uint64_t off = it->first, len = it->second;
    // Aligned as an address, not as an offset: the base is only granule-aligned.
    const std::uint64_t addr = base_ + off;
    const std::uint64_t pad = (align - addr % align) % align;
    if (pad > len || len - pad < size) continue;
    const std::uint64_t start = off + pad;
    free_.erase(it);
    if (pad != 0) free_.emplace(off, pad);
    if (len - pad > size) free_.emplace(start + size, len - pad - size);
    live_.emplace(start, size);
    in_use_ += size;
    return base_ + start;
  }
  return std::nullopt;
}

bool RangeAllocator::deallocate(std::uintptr_t addr) {
  std::lock_guard lock(mutex_);
  if (addr < base_) return false;
  auto live = live_.find(addr - base_);
  if (live == live_.end()) return false;
  std::uint64_t off = live->first, len = live->second;
  live_.erase(live);
  in_use_ -= len;
  // Coalesce with the free block after, then the one before.
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + len) {
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += len;
      return true;
    }
  }
  free_.emplace(off, len);
  return true;
}

std::uint64_t RangeAllocator::bytes_in_use() const {
  std::lock_guard lock(mutex_);
  return in_use_;
}

std::uint64_t RangeAllocator::largest_free() const {
  std::lock_guard lock(mutex_);
  std::uint64_t best = 0;
  for (const auto& [off, len] : free_) best = std::max(best, len);
  return best;
}

}  // namespace lema::allocator
