#include "lema/allocator/limit_adaptor.hpp"

#include <string>

#include "lema/base/units.hpp"

namespace lema::allocator {
namespace {

std::string size_text(std::uint64_t bytes) {
  return format_size(bytes) + " (" + std::to_string(bytes) + " bytes)";
}

}  // namespace

OutOfMemory::OutOfMemory(std::uint64_t requested_bytes, std::uint64_t used_bytes,
                         std::uint64_t limit_bytes)
    : lema::OutOfMemory("allocation of " + size_text(requested_bytes) + " exceeds the limit of " +
                        size_text(limit_bytes) + ": " + size_text(used_bytes) +
                        " already in use; raise the limit or free memory before asking"),
      requested_bytes_(requested_bytes),
      used_bytes_(used_bytes),
      limit_bytes_(limit_bytes) {}

LimitAdaptor::LimitAdaptor(std::unique_ptr<MemoryResource> upstream, std::uint64_t limit_bytes)
    : upstream_(std::move(upstream)), limit_bytes_(limit_bytes) {
  LEMA_EXPECTS(upstream_ != nullptr, "LimitAdaptor needs an upstream resource, got null");
}

void* LimitAdaptor::do_allocate(std::size_t bytes, std::size_t alignment) {
  // Reserve first, then ask: the check and the reservation are one step, so concurrent callers
  // can never together pass a limit that each alone would not.
  std::uint64_t used = used_.load(std::memory_order_relaxed);
  do {
    if (bytes > limit_bytes_ || used > limit_bytes_ - bytes) {
      throw OutOfMemory(bytes, used, limit_bytes_);
    }
  } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  try {
    return upstream_->allocate(bytes, alignment);
  } catch (...) {
    used_.fetch_sub(bytes, std::memory_order_relaxed);
    throw;
  }
}

void LimitAdaptor::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept {
  // Given back only once the upstream has the block again: used_bytes never understates.
  upstream_->deallocate(p, bytes, alignment);
  used_.fetch_sub(bytes, std::memory_order_relaxed);
}

}  // namespace lema::allocator
