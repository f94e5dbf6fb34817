// The CUDA backends. Both reach the driver through a function table filled at run time (dlopen of
// libcuda.so.1, or the library $LEMA_CUDA_DRIVER names, then cuGetProcAddress; lema::cuda): the
// project links no libcuda, builds wherever the toolkit headers are, and runs where no driver
// is. Declared in every build: one built without the CUDA toolkit says so through
// *_unavailable_reason() and CudaUnavailable, so callers need no #ifdef.
//
// cuda (make_cuda_backend), the driver's virtual memory management:
//  - granularity() = cuMemGetAllocationGranularity(minimum) for device memory (2 MiB on current
//    GPUs), or the larger CudaBackendOptions::granularity;
//  - reserve = cuMemAddressReserve; the reservation is device address space, not CPU-visible
//    (host_accessible() is false; touching an unmapped page from a kernel is a fatal fault);
//  - create_pool = cuMemCreate of every chunk once, each mapped in one pool window reserved for
//    the pool (read-write for the device); window() is nullptr, fills go through staging. If one
//    chunk cannot be created, everything created so far is released and OutOfMemory names the
//    sizes asked and the device's free memory;
//  - map = cuMemMap of the chunk's allocation at the model address + cuMemSetAccess for the
//    device (read-only when the device accepts it, else read-write); map_pages maps every chunk
//    of the batch, then sets access once per run of adjacent pages, and on an error unmaps what
//    it mapped before throwing; unmap = cuMemUnmap of every mapping in the range;
//  - allocate_staging = pinned host memory (cuMemHostAlloc);
//  - copy_to_chunk = cuMemcpyHtoDAsync on the backend's own copy stream into the chunk through
//    the pool window; the fence is a CUDA event recorded after the copy;
//  - fences are CUDA events; Queue::native is a CUstream (nullptr: the legacy default stream);
//    queue_wait = cuStreamWaitEvent (no host synchronization).
//
// managed (make_managed_backend), unified memory, mapped onto the same table:
//  - reserve = cuMemAllocManaged of the whole range: every page always has memory behind it
//    (host or device) and is readable by the CPU and the GPU (host_accessible() is true);
//    touching a page the schedule missed is served by a GPU page fault, not a crash;
//  - create_pool = a managed staging window of chunks × chunk_bytes, preferred on the CPU; the
//    pool only counts the budget, since UVM pages cannot be remapped to another address;
//  - map = copy the filled chunk from the window to the model address on the CPU, advise the
//    device as preferred location and prefetch the page to it (cuMemPrefetchAsync with a
//    CUmemLocation, on the copy stream, not waited for: a kernel that runs first faults it in);
//  - unmap = advise the CPU as preferred location and prefetch the range back to the CPU: the
//    device memory is freed, the bytes stay valid at their address;
//  - with CudaBackendOptions::managed_prefetch false (plain unified memory), map only copies the
//    bytes on the CPU and unmap does nothing: the driver places every page on its own;
//  - staging, copies and fences as for cuda (copy_to_chunk writes the window on the CPU);
//  - unified_memory_device() is the device: a Pager over it counts, through CUPTI's
//    unified-memory counters where the library and the device provide them, the GPU page
//    faults that served what the schedule missed and the bytes the driver migrated each way
//    (PagerStats::gpu_faults, migrated_*; Note [UVM counters] in src/uvm_counters.hpp).
//
// Thread safety: as Backend. Every call makes the device's primary context current on the
// calling thread first.
#pragma once

#include <memory>
#include <string>

#include "lema/runtime/backend.hpp"
#include "lema/runtime/cuda_driver.hpp"

namespace lema::runtime {

/// Empty when make_cuda_backend(options) can work here; otherwise why not.
std::string cuda_backend_unavailable_reason(const CudaBackendOptions& options = {});
/// Empty when make_managed_backend(options) can work here; otherwise why not.
std::string managed_backend_unavailable_reason(const CudaBackendOptions& options = {});

/// Throws CudaUnavailable with the reason, CudaError for a failing driver call.
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options = {});
std::unique_ptr<Backend> make_managed_backend(const CudaBackendOptions& options = {});

/// The device's free and total memory (cuMemGetInfo in its primary context).
struct CudaDeviceMemory {
  std::uint64_t free_bytes = 0;
  std::uint64_t total_bytes = 0;
};
/// Throws CudaUnavailable with the reason, CudaError for a failing driver call.
CudaDeviceMemory cuda_device_memory(const CudaBackendOptions& options = {});

/// As above, but nullptr with `reason` set instead of CudaUnavailable (for callers that fall
/// back to the host backend).
std::unique_ptr<Backend> try_make_cuda_backend(const CudaBackendOptions& options,
                                               std::string* reason);

}  // namespace lema::runtime
