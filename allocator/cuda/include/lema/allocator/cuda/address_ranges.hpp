// AddressRanges: which parts of one fixed virtual range are free. The device VMM resource
// reserves its virtual range once and carves every allocation's addresses out of it here, so
// this is the whole of its bookkeeping apart from the driver calls (and what its benchmark
// measures).
//
// Offsets, not pointers: the range is [0, size). Allocations take the smallest free piece that
// holds them at an offset aligned to `alignment` (the lowest such piece among equals), found in
// logarithmic time through an index by size; frees coalesce with their free neighbours, so a
// range that is all free again is one piece.
// Thread safety: none; the resource calls it under its lock.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>

namespace lema::allocator::cuda {

class AddressRanges {
 public:
  /// A range of `size` bytes, all free.
  explicit AddressRanges(std::uint64_t size);

  /// The offset of `bytes` free bytes aligned to `alignment` (a power of two), now taken; nullopt
  /// when no free piece holds them.
  std::optional<std::uint64_t> take(std::uint64_t bytes, std::uint64_t alignment);
  /// Gives back [offset, offset + bytes), which take() handed out (precondition, unchecked).
  void give_back(std::uint64_t offset, std::uint64_t bytes);

  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t free_bytes() const noexcept { return free_bytes_; }
  /// The largest free piece (what the next take() can hold at alignment 1).
  std::uint64_t largest_free() const noexcept;
  std::size_t free_pieces() const noexcept { return free_.size(); }

 private:
  std::uint64_t size_;
  std::uint64_t free_bytes_;
  void add(std::uint64_t offset, std::uint64_t bytes);
  void remove(std::map<std::uint64_t, std::uint64_t>::iterator it);

  std::map<std::uint64_t, std::uint64_t> free_;                // offset -> bytes, no two adjacent
  std::set<std::pair<std::uint64_t, std::uint64_t>> by_size_;  // (bytes, offset) of free_
};

}  // namespace lema::allocator::cuda
