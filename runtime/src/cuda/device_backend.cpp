// DeviceBackend's staging: slots of one pinned pool. Compiled into the runtime, not lema::cuda:
// DeviceBackend is a runtime Backend, whose vtable and base members live in the runtime.
#include <memory>
#include <utility>

#include <spdlog/spdlog.h>

#include "lema/base/units.hpp"

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

bool DeviceBackend::do_register_host(std::byte* p, std::uint64_t bytes) noexcept {
  const DriverApi& driver = context_.api();
  if (driver.mem_host_register == nullptr || driver.mem_host_unregister == nullptr) {
    spdlog::warn("the CUDA driver lacks cuMemHostRegister: pages of the shared host cache reach "
                 "the GPU through pinned staging");
    return false;
  }
  try {
    context_.enter();
  } catch (const std::exception& e) {
    spdlog::warn("cannot register {} of host memory with the GPU ({}): copying through pinned "
                 "staging",
                 format_size(bytes), e.what());
    return false;
  }
  const CUresult r = driver.mem_host_register(p, static_cast<std::size_t>(bytes),
                                              CU_MEMHOSTREGISTER_PORTABLE);
  if (r == CUDA_SUCCESS) return true;
  spdlog::warn("cuMemHostRegister could not pin the shared host cache's {} ({}; RLIMIT_MEMLOCK "
               "or the driver's limit): its pages reach the GPU through pinned staging",
               format_size(bytes), driver.describe(r));
  return false;
}

void DeviceBackend::do_unregister_host(std::byte* p) noexcept {
  // At exit the driver may already be gone (process_is_exiting).
  if (process_is_exiting() || context_.api().mem_host_unregister == nullptr) return;
  try {
    context_.enter();
  } catch (...) {
    return;
  }
  context_.api().mem_host_unregister(p);
}

}  // namespace lema::runtime::cuda
