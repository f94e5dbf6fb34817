// MemoryResource: the interface every allocator in LEMA implements and every adaptor stacks on.
//
// The public functions are not virtual: they check the caller's preconditions once, here, and
// then call the private virtuals, so no resource re-checks them and none forgets to (the shape
// of rmm's device_memory_resource).
//
// Contract of every resource:
//  - allocate(bytes, alignment): alignment must be a power of two (else lema::InvalidArgument,
//    before any resource sees the call); bytes == 0 returns nullptr and reaches no resource. The
//    block is at least `bytes` long, aligned to `alignment`, and distinct from every other live
//    block. Failure to get memory throws lema::OutOfMemory (or a type derived from it).
//  - deallocate(p, bytes, alignment): p must come from allocate() on a resource that is_equal()
//    to this one, with the same bytes and alignment; nullptr is a no-op. Never throws.
//  - is_equal(other): true when memory from one may be deallocated through the other; always
//    true for the resource itself (Note [Resource equality]).
//
// Thread safety: every resource in lema::allocator may be called from any number of threads at
// once, unless its header says otherwise.
#pragma once

#include <cstddef>

namespace lema::allocator {

inline constexpr std::size_t kDefaultAlignment = alignof(std::max_align_t);

class MemoryResource {
 public:
  MemoryResource() = default;
  virtual ~MemoryResource() = default;
  // Adaptors hand out references to themselves and their upstream: a resource stays put.
  MemoryResource(const MemoryResource&) = delete;
  MemoryResource& operator=(const MemoryResource&) = delete;
  MemoryResource(MemoryResource&&) = delete;
  MemoryResource& operator=(MemoryResource&&) = delete;

  /// A block of at least `bytes`, aligned to `alignment`; nullptr when bytes == 0. Throws
  /// lema::InvalidArgument for an alignment that is not a power of two, lema::OutOfMemory (or a
  /// derived type) when no memory can be had.
  void* allocate(std::size_t bytes, std::size_t alignment = kDefaultAlignment);

  /// Returns a block from allocate() (same bytes and alignment); nullptr is a no-op.
  void deallocate(void* p, std::size_t bytes, std::size_t alignment = kDefaultAlignment) noexcept;

  /// Whether memory allocated by one may be deallocated by the other.
  bool is_equal(const MemoryResource& other) const noexcept;

 private:
  // Called with alignment a power of two and bytes > 0.
  virtual void* do_allocate(std::size_t bytes, std::size_t alignment) = 0;
  // Called with p != nullptr and the bytes and alignment it was allocated with.
  virtual void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept = 0;
  // Called only when &other != this. Default: resources are equal only to themselves.
  virtual bool do_is_equal(const MemoryResource& other) const noexcept;
};

}  // namespace lema::allocator
