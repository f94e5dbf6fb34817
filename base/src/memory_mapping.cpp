#include "lema/base/memory_mapping.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema {

MemoryMapping MemoryMapping::anonymous(std::size_t bytes, const std::string& purpose,
                                       int extra_flags) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    throw OutOfMemory("cannot map " + format_size(bytes) + " for " + purpose + ": " +
                      std::strerror(err));
  }
  return MemoryMapping(p, bytes);
}

void MemoryMapping::reset() noexcept {
  if (addr_ != nullptr) ::munmap(addr_, bytes_);
  addr_ = nullptr;
  bytes_ = 0;
}

}  // namespace lema
