// pause(tag) / resume(tag): the physical memory of a tag's allocations goes and comes back at
// the same addresses.
#include <cuda.h>

#include <string>
#include <vector>

#include "detail/vmm_state.hpp"
#include "lema/allocator/cuda/device_vmm_resource.hpp"
#include "lema/allocator/limit_adaptor.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator::cuda {

// Note [Pause keeps addresses]: what RL trainers need between rollout and training (and what
// torch_memory_saver and vLLM's sleep mode give them) is device memory handed back while every
// tensor, CUDA graph and pointer into it stays valid. So pause releases only the physical
// allocations: the addresses stay taken in the reserved range, and resume maps new physical
// memory there. The new memory holds whatever the driver gives (contents are not kept) unless
// pause copied them out to pinned host memory first, which costs a host buffer per block for
// the pause and a copy each way.
void DeviceVmmResource::pause(std::string_view tag, bool keep_contents) {
  detail::Vmm& s = *state_;
  LEMA_EXPECTS(!tag.empty(),
               "pause of the empty tag: only tagged allocations can be paused; "
               "set a tag (ScopedTag, lema_set_tag) before allocating them");
  std::lock_guard lock(s.mu);
  auto t = s.tags.find(tag);
  LEMA_EXPECTS(t != s.tags.end(), "pause of tag '" + std::string(tag) +
                                      "', which no allocation carries; allocate under it first");
  LEMA_EXPECTS(!t->second.paused,
               "pause of tag '" + std::string(tag) + "', which is already paused; resume it first");
  s.context.enter();
  const auto& a = s.api();
  std::vector<detail::Block*> blocks;
  std::vector<CUdeviceptr> addrs;
  for (auto& [addr, block] : s.live) {
    if (block.tag != tag || block.handle == 0) continue;
    blocks.push_back(&block);
    addrs.push_back(addr);
  }
  if (keep_contents) {
    // All copies are made before anything is released: a failure leaves the tag as it was.
    std::size_t copied = 0;
    try {
      for (; copied < blocks.size(); ++copied) {
        void* host = nullptr;
        const CUresult r = a.mem_host_alloc(&host, blocks[copied]->bytes, 0);
        if (r == CUDA_ERROR_OUT_OF_MEMORY)
          throw lema::OutOfMemory("pause of tag '" + std::string(tag) + "' cannot pin " +
                                  format_size(blocks[copied]->bytes) +
                                  " of host memory to keep its contents; pause without keeping "
                                  "them or free pinned memory");
        a.check(r, "cuMemHostAlloc",
                format_size(blocks[copied]->bytes) + " to keep a paused block");
        blocks[copied]->backup = host;
        a.check(a.memcpy_dtoh(host, addrs[copied], blocks[copied]->bytes), "cuMemcpyDtoH",
                format_size(blocks[copied]->bytes) + " of tag '" + std::string(tag) + "'");
      }
    } catch (...) {
      for (detail::Block* b : blocks) {
        if (b->backup != nullptr) a.mem_free_host(b->backup);
        b->backup = nullptr;
      }
      throw;
    }
  }
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    s.unback(addrs[i], blocks[i]->bytes, blocks[i]->handle);
    blocks[i]->handle = 0;
    s.mapped -= blocks[i]->bytes;
  }
  t->second.paused = true;
  t->second.kept = keep_contents;
}

void DeviceVmmResource::resume(std::string_view tag) {
  detail::Vmm& s = *state_;
  std::lock_guard lock(s.mu);
  auto t = s.tags.find(tag);
  LEMA_EXPECTS(t != s.tags.end() && t->second.paused,
               "resume of tag '" + std::string(tag) + "', which is not paused; pause it first");
  s.context.enter();
  const auto& a = s.api();
  std::vector<detail::Block*> blocks;
  std::vector<CUdeviceptr> addrs;
  std::uint64_t needed = 0;
  for (auto& [addr, block] : s.live) {
    if (block.tag != tag) continue;
    blocks.push_back(&block);
    addrs.push_back(addr);
    needed += block.bytes;
  }
  if (!s.pending.empty()) s.reclaim(needed, /*until_fits=*/true);
  if (s.mapped + needed > s.budget) throw OutOfMemory(needed, s.mapped, s.budget);
  std::size_t done = 0;
  try {
    for (; done < blocks.size(); ++done) {
      blocks[done]->handle = s.back(addrs[done], blocks[done]->bytes);
      s.mapped += blocks[done]->bytes;
    }
    // Put kept contents back, all copies on the copy stream, then wait for them once.
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i]->backup == nullptr) continue;
      a.check(a.memcpy_htod_async(addrs[i], blocks[i]->backup, blocks[i]->bytes,
                                  s.context.copy_stream()),
              "cuMemcpyHtoDAsync", "restoring tag '" + std::string(tag) + "'");
    }
    a.check(a.stream_synchronize(s.context.copy_stream()), "cuStreamSynchronize",
            "restoring tag '" + std::string(tag) + "'");
  } catch (...) {
    // Back to paused as it was: what was mapped here goes again; the copies are still held.
    a.stream_synchronize(s.context.copy_stream());
    for (std::size_t i = 0; i < done; ++i) {
      s.unback(addrs[i], blocks[i]->bytes, blocks[i]->handle);
      blocks[i]->handle = 0;
      s.mapped -= blocks[i]->bytes;
    }
    throw;
  }
  for (detail::Block* b : blocks) {
    if (b->backup != nullptr) a.mem_free_host(b->backup);
    b->backup = nullptr;
  }
  t->second.paused = false;
  t->second.kept = false;
}

bool DeviceVmmResource::paused(std::string_view tag) const {
  const detail::Vmm& s = *state_;
  std::lock_guard lock(s.mu);
  auto t = s.tags.find(tag);
  return t != s.tags.end() && t->second.paused;
}

}  // namespace lema::allocator::cuda
