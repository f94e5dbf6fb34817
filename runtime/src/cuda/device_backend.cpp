// DeviceBackend's staging: slots of one pinned pool. Compiled into the runtime, not lema::cuda:
// DeviceBackend is a runtime Backend, whose vtable and base members live in the runtime.
#include <memory>
#include <utility>

#include "cuda/device_context.hpp"
#include "cuda/pinned_host_resource.hpp"

namespace lema::runtime::cuda {
namespace {

// A slot of the backend's pinned pool; gives it back when destroyed. The pager leaks one (never
// destroys it) when a copy from it may still be running: the slot stays out of the pool, and the
// reference it holds keeps the pool, with that slot's chunk, alive for good.
class PooledStaging final : public StagingBuffer {
 public:
  PooledStaging(std::shared_ptr<allocator::SlotPool> pool, void* data, std::uint64_t bytes) noexcept
      : pool_(std::move(pool)), data_(static_cast<std::byte*>(data)), bytes_(bytes) {}
  PooledStaging(const PooledStaging&) = delete;
  PooledStaging& operator=(const PooledStaging&) = delete;
  ~PooledStaging() override { pool_->deallocate(data_, bytes_); }
  std::span<std::byte> bytes() noexcept override { return {data_, bytes_}; }

 private:
  std::shared_ptr<allocator::SlotPool> pool_;
  std::byte* data_;
  std::uint64_t bytes_;
};

}  // namespace

// Note [One pinned staging pool]: the pager's fill staging and its host page cache both take
// page buffers from Backend::allocate_staging. Each used to be its own cuMemHostAlloc, and
// pinning is slow (it maps and locks every page, and serializes in the driver), so a pager with a
// deep pipeline and a large host cache pinned memory hundreds of times. The backend now owns one
// SlotPool over PinnedHostResource (the PinnedHostPool of lema::allocator's shape) whose slot is
// the first request's size -- every request of a pager is one page, and a backend serves one
// pager -- and whose chunks hold kPinnedChunkBytes: a pager pins about total / 32 MiB times.
// A request of another size passes through the pool to cuMemHostAlloc unchanged.
std::unique_ptr<StagingBuffer> DeviceBackend::do_allocate_staging(std::uint64_t bytes) {
  std::call_once(pool_once_, [&] {
    const auto slot = static_cast<std::size_t>(bytes);
    staging_pool_ = std::make_shared<allocator::SlotPool>(
        std::make_unique<PinnedHostResource>(context_),
        allocator::SlotPoolOptions{.slot_bytes = slot,
                                   .slots_per_chunk = pinned_slots_per_chunk(slot)});
  });
  void* p = staging_pool_->allocate(static_cast<std::size_t>(bytes));
  return std::make_unique<PooledStaging>(staging_pool_, p, bytes);
}

}  // namespace lema::runtime::cuda
