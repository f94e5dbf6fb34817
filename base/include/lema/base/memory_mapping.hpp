// Move-only owner of an mmap'ed range; munmap on destruction.
#pragma once

#include <cstddef>
#include <string>
#include <utility>

namespace lema {

class MemoryMapping {
 public:
  MemoryMapping() = default;
  /// Adopts the range a successful mmap returned.
  MemoryMapping(void* addr, std::size_t bytes) noexcept : addr_(addr), bytes_(bytes) {}
  /// Private anonymous read-write memory of `bytes` (plus `extra_flags`, e.g. MAP_NORESERVE).
  /// Throws OutOfMemory with "cannot map <size> for <purpose>".
  static MemoryMapping anonymous(std::size_t bytes, const std::string& purpose,
                                 int extra_flags = 0);

  MemoryMapping(const MemoryMapping&) = delete;
  MemoryMapping& operator=(const MemoryMapping&) = delete;
  MemoryMapping(MemoryMapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  MemoryMapping& operator=(MemoryMapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~MemoryMapping() { reset(); }

  std::byte* data() const noexcept { return static_cast<std::byte*>(addr_); }
  std::size_t size() const noexcept { return bytes_; }
  explicit operator bool() const noexcept { return addr_ != nullptr; }
  void reset() noexcept;

 private:
  void* addr_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace lema
