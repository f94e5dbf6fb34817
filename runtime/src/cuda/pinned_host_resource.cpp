#include "cuda/pinned_host_resource.hpp"

#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime::cuda {
namespace {
constexpr std::size_t kPinnedAlignment = 4096;
}  // namespace

void* PinnedHostResource::do_allocate(std::size_t bytes, std::size_t alignment) {
  LEMA_EXPECTS(alignment <= kPinnedAlignment,
               "pinned host memory is page-aligned: alignment " + std::to_string(alignment) +
                   " is larger than " + std::to_string(kPinnedAlignment) +
                   "; ask for at most a page's alignment");
  context_->enter();
  void* p = nullptr;
  const CUresult r = api_->mem_host_alloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE);
  if (r == CUDA_ERROR_OUT_OF_MEMORY) {
    throw OutOfMemory("cuMemHostAlloc could not pin " + format_size(bytes) +
                      " of host memory; lower the pager's staging (fill depth, host cache) or "
                      "free pinned memory");
  }
  api_->check(r, "cuMemHostAlloc", format_size(bytes) + " of pinned host memory");
  return p;
}

void PinnedHostResource::do_deallocate(void* p, std::size_t, std::size_t) noexcept {
  // At exit the driver may already be gone (process_is_exiting).
  if (!process_is_exiting()) api_->mem_free_host(p);
}

bool PinnedHostResource::do_is_equal(const MemoryResource& other) const noexcept {
  // Any pinned block may be freed through any table that is the same driver.
  const auto* o = dynamic_cast<const PinnedHostResource*>(&other);
  return o != nullptr && o->api_ == api_;
}

std::size_t pinned_slots_per_chunk(std::size_t slot_bytes) noexcept {
  return slot_bytes >= kPinnedChunkBytes ? 1 : kPinnedChunkBytes / slot_bytes;
}

}  // namespace lema::runtime::cuda
