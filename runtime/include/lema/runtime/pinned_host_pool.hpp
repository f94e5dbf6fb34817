// Pinned host memory for code outside the pager: the resource the CUDA backends stage through,
// and PinnedHostPool, the pool of fixed-size slots carved from few large pinned blocks of it
// (Note [One pinned staging pool] in the backends). The same declarations in every build; a
// build without the CUDA toolkit throws CudaUnavailable saying so.
#pragma once

#include <memory>

#include "lema/allocator/memory_resource.hpp"
#include "lema/allocator/slot_pool.hpp"
#include "lema/runtime/cuda_driver.hpp"

namespace lema::runtime {

/// Page-locked host memory on `options.device`'s primary context (cuMemHostAlloc, portable):
/// alignments up to 4096; lema::OutOfMemory when the driver cannot pin more. Holds the device's
/// primary context while it lives. Throws CudaUnavailable with the reason when no driver or
/// device can be used.
std::unique_ptr<allocator::MemoryResource> make_pinned_host_resource(
    const CudaBackendOptions& options = {});

/// The pinned staging pool: allocator::SlotPool over make_pinned_host_resource(options).
using PinnedHostPool = allocator::SlotPool;
std::unique_ptr<PinnedHostPool> make_pinned_host_pool(allocator::SlotPoolOptions pool,
                                                      const CudaBackendOptions& options = {});

}  // namespace lema::runtime
