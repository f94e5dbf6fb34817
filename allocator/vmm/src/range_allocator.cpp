#include "range_allocator.hpp"

#include <algorithm>
#include <iterator>
#include <limits>

namespace lema::allocator {

RangeAllocator::RangeAllocator(std::uintptr_t base, std::uint64_t bytes) : base_(base) {
  const std::uint64_t usable = bytes - bytes % kGranule;
  if (usable != 0) insert_free(0, usable);
}

void RangeAllocator::insert_free(std::uint64_t offset, std::uint64_t bytes) {
  free_.emplace(offset, bytes);
  by_size_.emplace(bytes, offset);
}

void RangeAllocator::erase_free(std::map<std::uint64_t, std::uint64_t>::iterator it) {
  auto [first, last] = by_size_.equal_range(it->second);
  for (auto s = first; s != last; ++s) {
    if (s->second == it->first) {
      by_size_.erase(s);
      break;
    }
  }
  free_.erase(it);
}

std::optional<std::uintptr_t> RangeAllocator::allocate(std::uint64_t bytes,
                                                       std::uint64_t alignment) {
  if (bytes > std::numeric_limits<std::uint64_t>::max() - 2 * kGranule) return std::nullopt;
  const std::uint64_t size = (bytes + kGranule - 1) / kGranule * kGranule;
  const std::uint64_t align = std::max(alignment, kGranule);
  std::lock_guard lock(mutex_);
  // The smallest block that holds the request; with an alignment above the granule, the
  // smallest that holds it after its padding.
  for (auto by = by_size_.lower_bound(size); by != by_size_.end(); ++by) {
    const std::uint64_t off = by->second, len = by->first;
    // Aligned as an address, not as an offset: the base is only granule-aligned.
    const std::uint64_t addr = base_ + off;
    const std::uint64_t pad = (align - addr % align) % align;
    if (pad > len || len - pad < size) continue;
    const std::uint64_t start = off + pad;
    erase_free(free_.find(off));
    if (pad != 0) insert_free(off, pad);
    if (len - pad > size) insert_free(start + size, len - pad - size);
    live_.emplace(start, size);
    in_use_ += size;
    return base_ + start;
  }
  return std::nullopt;
}

bool RangeAllocator::deallocate(std::uintptr_t addr,
                                const std::function<void(const Freed&)>& on_free) {
  std::lock_guard lock(mutex_);
  if (addr < base_) return false;
  auto live = live_.find(addr - base_);
  if (live == live_.end()) return false;
  std::uint64_t off = live->first, len = live->second;
  const Freed block{base_ + off, len, 0, 0};
  live_.erase(live);
  in_use_ -= len;
  // Coalesce with the free block after, then the one before.
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + len) {
    len += next->second;
    auto after = std::next(next);
    erase_free(next);
    next = after;
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      off = prev->first;
      len += prev->second;
      erase_free(prev);
    }
  }
  insert_free(off, len);
  if (on_free) on_free(Freed{block.block, block.block_bytes, base_ + off, len});
  return true;
}

std::uint64_t RangeAllocator::bytes_in_use() const {
  std::lock_guard lock(mutex_);
  return in_use_;
}

std::uint64_t RangeAllocator::largest_free() const {
  std::lock_guard lock(mutex_);
  return by_size_.empty() ? 0 : std::prev(by_size_.end())->first;
}

}  // namespace lema::allocator
