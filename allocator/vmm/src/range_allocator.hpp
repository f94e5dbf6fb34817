// First-fit placement of blocks inside one virtual range: offsets only, no memory touched.
//
// Best fit: free blocks are indexed by size (the smallest that fits is taken, in O(log n)) and
// by offset (to coalesce a returned block with its neighbours, so a range freed whole is one
// block again). Sizes are rounded up to kGranule so that every block starts on a granule (torch
// asks for 64-byte alignment, which then never needs padding).
//
// Thread safety: every member may be called from any thread (one mutex).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace lema::allocator {

class RangeAllocator {
 public:
  static constexpr std::uint64_t kGranule = 256;

  /// Blocks inside [base, base + bytes); `base` aligned to kGranule.
  RangeAllocator(std::uintptr_t base, std::uint64_t bytes);

  /// The address of a free block of at least `bytes` aligned to `alignment` (a power of two),
  /// or nullopt when none is large enough.
  std::optional<std::uintptr_t> allocate(std::uint64_t bytes, std::uint64_t alignment);
  /// What deallocate() freed: the block, and the free block it is now part of (coalesced).
  struct Freed {
    std::uintptr_t block = 0;
    std::uint64_t block_bytes = 0;
    std::uintptr_t free = 0;
    std::uint64_t free_bytes = 0;
  };
  /// Returns a block from allocate(); false when `addr` is not the start of a live block.
  /// `on_free` runs under the lock, before any other call can take the bytes again.
  bool deallocate(std::uintptr_t addr, const std::function<void(const Freed&)>& on_free = {});

  std::uint64_t bytes_in_use() const;
  /// The largest free block (for error messages).
  std::uint64_t largest_free() const;

 private:
  std::uintptr_t base_;
  mutable std::mutex mutex_;
  void insert_free(std::uint64_t offset, std::uint64_t bytes);
  void erase_free(std::map<std::uint64_t, std::uint64_t>::iterator it);

  std::map<std::uint64_t, std::uint64_t> free_;            // offset -> bytes
  std::multimap<std::uint64_t, std::uint64_t> by_size_;    // bytes -> offset, the same blocks
  std::unordered_map<std::uint64_t, std::uint64_t> live_;  // offset -> bytes
  std::uint64_t in_use_ = 0;
};

}  // namespace lema::allocator
