#include "lema/allocator/cuda/address_ranges.hpp"

#include <algorithm>

namespace lema::allocator::cuda {

AddressRanges::AddressRanges(std::uint64_t size) : size_(size), free_bytes_(size) {
  if (size > 0) free_.emplace(0, size);
}

std::optional<std::uint64_t> AddressRanges::take(std::uint64_t bytes, std::uint64_t alignment) {
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const std::uint64_t start = it->first;
    const std::uint64_t end = start + it->second;
    const std::uint64_t aligned = (start + alignment - 1) & ~(alignment - 1);
    if (aligned < start || aligned > end || end - aligned < bytes) continue;
    // Split the piece into what is left before and after the block.
    free_.erase(it);
    if (aligned > start) free_.emplace(start, aligned - start);
    if (aligned + bytes < end) free_.emplace(aligned + bytes, end - aligned - bytes);
    free_bytes_ -= bytes;
    return aligned;
  }
  return std::nullopt;
}

void AddressRanges::give_back(std::uint64_t offset, std::uint64_t bytes) {
  std::uint64_t start = offset;
  std::uint64_t length = bytes;
  auto next = free_.lower_bound(offset);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      length += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && next->first == offset + bytes) {
    length += next->second;
    free_.erase(next);
  }
  free_.emplace(start, length);
  free_bytes_ += bytes;
}

std::uint64_t AddressRanges::largest_free() const noexcept {
  std::uint64_t largest = 0;
  for (const auto& [offset, bytes] : free_) largest = std::max(largest, bytes);
  return largest;
}

}  // namespace lema::allocator::cuda
