#include "lema/allocator/statistics_adaptor.hpp"

#include <algorithm>

#include "lema/base/error.hpp"

namespace lema::allocator {

// Note [Adaptors own their upstream]: an adaptor holds its upstream by std::unique_ptr. A stack
// is a chain with one owner at each link, destroyed top-down, so an adaptor can never outlive
// the resource it forwards to and no reference count is needed. Sharing one upstream between
// two stacks would also share its accounting (a limit counted twice, or not at all), which
// shared_ptr would make easy to do by accident; a caller that wants to look at a lower layer
// keeps the reference upstream() gives.
StatisticsAdaptor::StatisticsAdaptor(std::unique_ptr<MemoryResource> upstream)
    : upstream_(std::move(upstream)) {
  LEMA_EXPECTS(upstream_ != nullptr, "StatisticsAdaptor needs an upstream resource, got null");
}

AllocationStats StatisticsAdaptor::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

// Note [Count only what is held]: counted after the upstream returns and uncounted before the
// block goes back. current_bytes never includes a block the upstream has not handed out or
// has already taken back, so a block freed on one thread and handed out again on another is
// never counted twice, and the peak is never above what was really live.
void* StatisticsAdaptor::do_allocate(std::size_t bytes, std::size_t alignment) {
  void* p = upstream_->allocate(bytes, alignment);
  std::lock_guard lock(mutex_);
  stats_.current_bytes += bytes;
  stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.current_bytes);
  stats_.current_count += 1;
  stats_.allocation_count += 1;
  return p;
}

void StatisticsAdaptor::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept {
  {
    std::lock_guard lock(mutex_);
    stats_.current_bytes -= bytes;
    stats_.current_count -= 1;
  }
  upstream_->deallocate(p, bytes, alignment);
}

}  // namespace lema::allocator
