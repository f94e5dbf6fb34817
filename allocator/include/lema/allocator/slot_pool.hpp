// SlotPool: fixed-size slots carved from a few large chunks of its upstream, for memory that is
// costly to get one block at a time (pinned host memory: one cuMemHostAlloc per staging page is
// what the pager's two staging pools do today). The pinned staging pool is this pool over a
// pinned upstream resource.
//
// A request that fits a slot (bytes <= slot_bytes, alignment <= slot_alignment()) takes a free
// slot, growing the pool by one chunk of slots_per_chunk slots when none is free; any other
// request passes through to the upstream unchanged (deallocate tells the two apart by the same
// bytes and alignment). With max_chunks set, a request that needs a chunk beyond it throws
// allocator::OutOfMemory with the pool's numbers. Chunks are kept until the pool is destroyed,
// which gives back to the upstream every chunk whose slots have all been returned; a chunk with
// a slot still out is leaked (Note [A slot still out keeps its chunk]).
// Owns its upstream (Note [Adaptors own their upstream]).
// Thread safety: fully thread-safe; one mutex guards the free list and is held while a chunk is
// taken from the upstream (Note [Grow under the lock]).
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "lema/allocator/memory_resource.hpp"

namespace lema::allocator {

struct SlotPoolOptions {
  std::size_t slot_bytes = 0;       // every slot's size; > 0
  std::size_t slots_per_chunk = 0;  // slots taken from the upstream at once; > 0
  std::size_t max_chunks = 0;       // 0: no limit
};

class SlotPool final : public MemoryResource {
 public:
  /// Throws lema::InvalidArgument naming the option for a zero slot size or chunk, a chunk size
  /// that overflows, or a null upstream.
  SlotPool(std::unique_ptr<MemoryResource> upstream, SlotPoolOptions options);
  ~SlotPool() override;

  std::size_t slot_bytes() const noexcept { return options_.slot_bytes; }
  /// The alignment every slot has: the largest power of two dividing slot_bytes, at most 4096.
  std::size_t slot_alignment() const noexcept { return slot_alignment_; }
  std::size_t chunk_count() const;
  std::size_t free_slots() const;
  MemoryResource& upstream() const noexcept { return *upstream_; }

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;
  bool fits_slot(std::size_t bytes, std::size_t alignment) const noexcept {
    return bytes <= options_.slot_bytes && alignment <= slot_alignment_;
  }

  std::unique_ptr<MemoryResource> upstream_;
  const SlotPoolOptions options_;
  const std::size_t slot_alignment_;
  const std::size_t chunk_bytes_;
  mutable std::mutex mutex_;
  std::vector<void*> chunks_;  // guarded by mutex_
  std::vector<void*> free_;    // guarded by mutex_; the last freed is handed out first
};

}  // namespace lema::allocator
