// Pinned host memory as an allocator::MemoryResource: cuMemHostAlloc (portable, on the device's
// primary context) and cuMemFreeHost through the driver table. The upstream of the pinned
// staging pool (PinnedHostPool, make_pinned_host_pool), which carves page-sized slots from a few
// large blocks of it so the pager pins memory a few times, not once per page.
//
// Blocks are page-aligned (the driver pins whole pages): alignments up to 4096 are honoured, a
// larger one is refused with lema::InvalidArgument. A block the driver cannot pin throws
// lema::OutOfMemory naming the size; any other driver error throws CudaError.
// Thread safety: fully thread-safe (the driver is; the context is made current per call).
#pragma once

#include <cstddef>

#include "cuda/device_context.hpp"
#include "lema/allocator/memory_resource.hpp"

namespace lema::runtime::cuda {

class PinnedHostResource final : public allocator::MemoryResource {
 public:
  /// `context` must outlive every allocate(); deallocate needs only the driver table, so blocks
  /// may be given back after the context is gone.
  explicit PinnedHostResource(const DeviceContext& context) noexcept
      : context_(&context), api_(&context.api()) {}

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;
  bool do_is_equal(const MemoryResource& other) const noexcept override;

  const DeviceContext* context_;
  const DriverApi* api_;
};

/// The slots of the pinned staging pool: how many of a slot size one chunk holds (chunks of
/// about kPinnedChunkBytes, at least one slot).
inline constexpr std::size_t kPinnedChunkBytes = std::size_t{32} << 20;
std::size_t pinned_slots_per_chunk(std::size_t slot_bytes) noexcept;

}  // namespace lema::runtime::cuda
