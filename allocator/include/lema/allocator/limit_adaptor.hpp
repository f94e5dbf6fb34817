// LimitAdaptor: refuses an allocation that would take the bytes live through it above a limit,
// with allocator::OutOfMemory carrying the numbers, before its upstream is asked.
//
// Owns its upstream (Note [Adaptors own their upstream]). Counts the bytes callers asked for,
// not what the upstream rounds them up to. A refused or failed allocate changes nothing.
// Thread safety: fully thread-safe; the bytes in use are one atomic, reserved before the upstream
// call (so two threads cannot both pass the check with room for one) and given back if it fails.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "lema/allocator/memory_resource.hpp"
#include "lema/base/error.hpp"

namespace lema::allocator {

/// An allocation would exceed a resource's limit. A lema::OutOfMemory: code that handles any
/// out-of-memory handles this one; code that wants the numbers reads them here.
class OutOfMemory : public lema::OutOfMemory {
 public:
  OutOfMemory(std::uint64_t requested_bytes, std::uint64_t used_bytes, std::uint64_t limit_bytes);

  std::uint64_t requested_bytes() const noexcept { return requested_bytes_; }
  std::uint64_t used_bytes() const noexcept { return used_bytes_; }  // live when it was refused
  std::uint64_t limit_bytes() const noexcept { return limit_bytes_; }

 private:
  std::uint64_t requested_bytes_;
  std::uint64_t used_bytes_;
  std::uint64_t limit_bytes_;
};

class LimitAdaptor final : public MemoryResource {
 public:
  /// Throws lema::InvalidArgument for a null upstream.
  LimitAdaptor(std::unique_ptr<MemoryResource> upstream, std::uint64_t limit_bytes);

  std::uint64_t limit_bytes() const noexcept { return limit_bytes_; }
  std::uint64_t used_bytes() const noexcept { return used_.load(std::memory_order_relaxed); }
  MemoryResource& upstream() const noexcept { return *upstream_; }

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;

  std::unique_ptr<MemoryResource> upstream_;
  const std::uint64_t limit_bytes_;
  std::atomic<std::uint64_t> used_{0};
};

}  // namespace lema::allocator
