// The state of a DeviceVmmResource, shared by its source files (allocation and frees in
// device_vmm_resource.cpp, pause and resume in pause_resume.cpp).
#pragma once

#include <cuda.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/device_context.hpp"
#include "lema/allocator/cuda/address_ranges.hpp"
#include "lema/allocator/cuda/device_vmm_resource.hpp"

namespace lema::allocator::cuda::detail {

using runtime::cuda::DriverApi;

/// One live allocation: its granule-rounded bytes at a fixed address, and the physical memory
/// behind them (0 while its tag is paused).
struct Block {
  std::uint64_t bytes = 0;      // rounded to the granularity: what is mapped and budgeted
  std::uint64_t requested = 0;  // what the caller asked for (checked on free)
  CUmemGenericAllocationHandle handle = 0;
  std::string tag;
  void* backup = nullptr;  // pinned host copy while paused with keep_contents
};

/// A block freed on a stream, released once `event` has completed.
struct PendingFree {
  CUdeviceptr addr = 0;
  Block block;
  CUevent event = nullptr;
};

struct TagState {
  bool paused = false;
  bool kept = false;  // paused with keep_contents
};

struct Vmm {
  explicit Vmm(const DriverApi& api, const DeviceVmmOptions& options);

  runtime::cuda::DeviceContext context;
  const DriverApi& api() const { return context.api(); }
  std::uint64_t granularity = 0;
  std::uint64_t budget = 0;
  std::uint64_t reserve = 0;
  CUdeviceptr base = 0;

  mutable std::mutex mu;
  AddressRanges ranges{0};
  std::unordered_map<CUdeviceptr, Block> live;
  std::deque<PendingFree> pending;
  std::vector<CUevent> spare_events;  // recorded and completed, for the next pending free
  std::map<std::string, TagState, std::less<>> tags;
  std::uint64_t mapped = 0;  // physical bytes held (live with a handle + pending)
  std::uint64_t pending_bytes = 0;

  // Physical memory for `bytes` at `addr`, read-write for the device; the handle. Undoes what
  // it did and throws (allocator::OutOfMemory when the driver is out of memory) on failure.
  CUmemGenericAllocationHandle back(CUdeviceptr addr, std::uint64_t bytes);
  // Unmaps and releases what back() made. Never throws (errors are printed).
  void unback(CUdeviceptr addr, std::uint64_t bytes, CUmemGenericAllocationHandle handle) noexcept;
  // Releases a block for good: its physical memory (if any), backup and addresses.
  void release(CUdeviceptr addr, Block& block) noexcept;
  // Releases completed pending frees; with `until_fits`, waits for them in order until
  // `bytes` more fit the budget. The bytes released.
  std::uint64_t reclaim(std::uint64_t bytes = 0, bool until_fits = false);
};

}  // namespace lema::allocator::cuda::detail
