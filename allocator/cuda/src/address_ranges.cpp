#include "lema/allocator/cuda/address_ranges.hpp"

#include <iterator>

namespace lema::allocator::cuda {

AddressRanges::AddressRanges(std::uint64_t size) : size_(size), free_bytes_(size) {
  if (size > 0) add(0, size);
}

void AddressRanges::add(std::uint64_t offset, std::uint64_t bytes) {
  free_.emplace(offset, bytes);
  by_size_.emplace(bytes, offset);
}

void AddressRanges::remove(std::map<std::uint64_t, std::uint64_t>::iterator it) {
  by_size_.erase({it->second, it->first});
  free_.erase(it);
}

std::optional<std::uint64_t> AddressRanges::take(std::uint64_t bytes, std::uint64_t alignment) {
  // Pieces too small to hold the block are skipped by the index; a larger one may still fail
  // for its alignment padding, so walk up until one fits (at once when every offset is aligned,
  // as the resource's granule-sized blocks are).
  for (auto s = by_size_.lower_bound({bytes, 0}); s != by_size_.end(); ++s) {
    const auto [length, start] = *s;
    const std::uint64_t end = start + length;
    const std::uint64_t aligned = (start + alignment - 1) & ~(alignment - 1);
    if (aligned < start || aligned > end || end - aligned < bytes) continue;
    remove(free_.find(start));
    // What is left of the piece before and after the block stays free.
    if (aligned > start) add(start, aligned - start);
    if (aligned + bytes < end) add(aligned + bytes, end - aligned - bytes);
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
      remove(prev);
    }
  }
  if (next != free_.end() && next->first == offset + bytes) {
    length += next->second;
    remove(next);
  }
  add(start, length);
  free_bytes_ += bytes;
}

std::uint64_t AddressRanges::largest_free() const noexcept {
  return by_size_.empty() ? 0 : by_size_.rbegin()->first;
}

}  // namespace lema::allocator::cuda
