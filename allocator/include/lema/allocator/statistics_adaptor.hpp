// StatisticsAdaptor: counts what passes through it to its upstream — bytes and blocks live now,
// the most bytes ever live at once, and the allocations made.
//
// Owns its upstream (Note [Adaptors own their upstream]). Counts the bytes callers asked for,
// not what the upstream rounds them up to. A failed allocate changes no number; allocate(0)
// reaches no resource and is not counted.
// Thread safety: fully thread-safe; stats() is one consistent snapshot (one mutex, held only to
// update or copy the four numbers, never across an upstream call).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>

#include "lema/allocator/memory_resource.hpp"

namespace lema::allocator {

struct AllocationStats {
  std::uint64_t current_bytes = 0;     // bytes in live blocks
  std::uint64_t peak_bytes = 0;        // the most current_bytes ever was
  std::uint64_t current_count = 0;     // live blocks
  std::uint64_t allocation_count = 0;  // successful allocations, ever
};

class StatisticsAdaptor final : public MemoryResource {
 public:
  /// Throws lema::InvalidArgument for a null upstream.
  explicit StatisticsAdaptor(std::unique_ptr<MemoryResource> upstream);

  AllocationStats stats() const;
  MemoryResource& upstream() const noexcept { return *upstream_; }

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;

  std::unique_ptr<MemoryResource> upstream_;
  mutable std::mutex mutex_;
  AllocationStats stats_;  // guarded by mutex_
};

}  // namespace lema::allocator
