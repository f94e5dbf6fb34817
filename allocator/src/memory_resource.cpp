#include "lema/allocator/memory_resource.hpp"

#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator {

void* MemoryResource::allocate(std::size_t bytes, std::size_t alignment) {
  LEMA_EXPECTS(
      is_power_of_two(alignment),
      "allocation of " + std::to_string(bytes) + " bytes asks for alignment " +
          std::to_string(alignment) +
          ", which is not a power of two; pass 1, 2, 4, ... (default alignof(max_align_t))");
  // Zero bytes: no resource has to decide what a zero-length block is, and none is counted.
  if (bytes == 0) return nullptr;
  return do_allocate(bytes, alignment);
}

void MemoryResource::deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept {
  if (p == nullptr) return;
  do_deallocate(p, bytes, alignment);
}

bool MemoryResource::is_equal(const MemoryResource& other) const noexcept {
  return this == &other || do_is_equal(other);
}

// Note [Resource equality]: equality says a block may be returned through the other resource.
// Adaptors keep accounting (bytes counted, bytes under a limit, lines in a log), so returning a
// block through another adaptor, even one over an equal upstream, would leave both wrong: an
// adaptor is equal only to itself, which is this default. A stateless resource (host memory)
// says so by overriding it.
bool MemoryResource::do_is_equal(const MemoryResource& /*other*/) const noexcept {
  return false;
}

}  // namespace lema::allocator
