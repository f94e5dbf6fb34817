// HostMemoryResource: aligned host memory from the C library (posix_memalign / free).
//
// Stateless: any two HostMemoryResources are equal, so a block may be returned through either.
// Thread safety: as the C library's allocator, fully thread-safe. Throws lema::OutOfMemory
// naming the bytes and alignment when the C library has no memory to give.
#pragma once

#include "lema/allocator/memory_resource.hpp"

namespace lema::allocator {

class HostMemoryResource final : public MemoryResource {
 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;
  bool do_is_equal(const MemoryResource& other) const noexcept override;
};

}  // namespace lema::allocator
