#include "lema/allocator/host_memory_resource.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator {

void* HostMemoryResource::do_allocate(std::size_t bytes, std::size_t alignment) {
  // posix_memalign wants a multiple of sizeof(void*); a stronger alignment is also a weaker one.
  const std::size_t align = alignment < sizeof(void*) ? sizeof(void*) : alignment;
  void* p = nullptr;
  const int rc = ::posix_memalign(&p, align, bytes);
  if (rc != 0) {
    throw lema::OutOfMemory("host memory: could not allocate " + format_size(bytes) + " (" +
                            std::to_string(bytes) + " bytes) aligned to " +
                            std::to_string(alignment) + " (posix_memalign: " + std::strerror(rc) +
                            "); free memory or ask for less");
  }
  return p;
}

void HostMemoryResource::do_deallocate(void* p, std::size_t /*bytes*/,
                                       std::size_t /*alignment*/) noexcept {
  std::free(p);
}

bool HostMemoryResource::do_is_equal(const MemoryResource& other) const noexcept {
  return dynamic_cast<const HostMemoryResource*>(&other) != nullptr;
}

}  // namespace lema::allocator
