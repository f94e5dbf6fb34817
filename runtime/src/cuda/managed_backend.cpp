// The managed backend: unified memory mapped onto the Backend table (see cuda_backend.hpp).
//
// Note [Managed residency]: UVM pages cannot be moved to another virtual address, so "map" and
// "unmap" here move residency instead of mappings. Every model address has its own managed
// memory; the pool is a managed staging window that the pager fills on the CPU and whose chunk
// count enforces the budget. map copies the chunk to the page's address and prefetches it to the
// device; unmap prefetches it back to the CPU. The prefetches are hints: a kernel that reaches a
// page first takes a GPU page fault and still reads the right bytes. Without prefetch (plain
// unified memory) map only writes the bytes and unmap does nothing; the driver alone decides
// where each page lives.
#include <cuda.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "cuda/device_context.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/cuda_backend.hpp"

namespace lema::runtime {
namespace {

using cuda::DriverApi;

CUdeviceptr dptr(const std::byte* p) {
  return reinterpret_cast<CUdeviceptr>(p);
}

CUmemLocation host_location() {
  CUmemLocation l{};
  l.type = CU_MEM_LOCATION_TYPE_HOST;
  l.id = 0;
  return l;
}

CUmemLocation device_location(CUdevice device) {
  CUmemLocation l{};
  l.type = CU_MEM_LOCATION_TYPE_DEVICE;
  l.id = static_cast<int>(device);
  return l;
}

// Managed memory for the staging window, preferred on the CPU where the pager's reads land.
class ManagedPool final : public PhysicalPool {
 public:
  ManagedPool(const cuda::DeviceContext& context, std::size_t chunks, std::uint64_t chunk_bytes)
      : context_(&context), chunks_(chunks), chunk_bytes_(chunk_bytes) {
    const DriverApi& api = context.api();
    const std::uint64_t bytes = chunks * chunk_bytes;
    CUdeviceptr p = 0;
    api.check(api.mem_alloc_managed(&p, bytes, CU_MEM_ATTACH_GLOBAL), "cuMemAllocManaged",
              format_size(bytes) + " for the staging window");
    window_ = reinterpret_cast<std::byte*>(p);
    const CUresult r =
        api.mem_advise(p, bytes, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, host_location());
    if (r != CUDA_SUCCESS) {
      api.mem_free(p);
      api.check(r, "cuMemAdvise", "preferred location host, staging window");
    }
  }
  ManagedPool(const ManagedPool&) = delete;
  ManagedPool& operator=(const ManagedPool&) = delete;
  ~ManagedPool() override {
    if (cuda::process_is_exiting()) return;
    try {
      context_->enter();
    } catch (...) {
    }
    context_->api().mem_free(dptr(window_));
  }
  std::size_t chunk_count() const noexcept override { return chunks_; }
  std::uint64_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  std::byte* window(std::size_t chunk) const noexcept override {
    return window_ + chunk * chunk_bytes_;
  }

 private:
  const cuda::DeviceContext* context_;
  std::byte* window_ = nullptr;
  std::size_t chunks_;
  std::uint64_t chunk_bytes_;
};

class ManagedBackend final : public cuda::DeviceBackend {
 public:
  ManagedBackend(const DriverApi& api, const CudaBackendOptions& options)
      : DeviceBackend(api, options.device),
        granularity_(options.granularity != 0 ? options.granularity : 2_MiB),
        prefetch_(options.managed_prefetch) {
    const auto os_page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    LEMA_EXPECTS(is_power_of_two(granularity_) && granularity_ >= os_page,
                 "managed backend: granularity " + format_size(granularity_) +
                     " must be a power of two of at least the OS page size");
  }

  std::string_view name() const noexcept override { return prefetch_ ? "managed" : "unified"; }
  std::uint64_t granularity() const noexcept override { return granularity_; }
  // Note [Managed residency]: a Backend whose unmap keeps the bytes (Residency::unified).
  BackendCapabilities capabilities() const noexcept override {
    return {.residency = BackendCapabilities::Residency::unified,
            .host_window = true,
            .host_accessible = true,
            .unified_memory_device = static_cast<int>(context().device())};
  }

 private:
  // Aligned to the granularity as every backend's reservation is (Note [Backend contract]):
  // cuMemAllocManaged promises less, so one granule more is allocated and the base rounded up.
  Reservation do_reserve(std::uint64_t bytes) override {
    context().enter();
    CUdeviceptr p = 0;
    api().check(api().mem_alloc_managed(&p, bytes + granularity_, CU_MEM_ATTACH_GLOBAL),
                "cuMemAllocManaged", format_size(bytes) + " for the model range");
    const CUdeviceptr base = align_up(p, granularity_);
    {
      std::lock_guard lock(mutex_);
      allocations_[base] = p;
    }
    return Reservation(this, reinterpret_cast<std::byte*>(base), bytes);
  }

  std::unique_ptr<PhysicalPool> do_create_pool(std::size_t chunks,
                                               std::uint64_t chunk_bytes) override {
    context().enter();
    return std::make_unique<ManagedPool>(context(), chunks, chunk_bytes);
  }

  // Note [Managed residency].
  void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access) override {
    const std::uint64_t bytes = pool.chunk_bytes();
    std::memcpy(addr, pool.window(chunk), bytes);
    if (!prefetch_) return;  // plain unified memory: the GPU's first touch migrates the page
    context().enter();
    const CUmemLocation device = device_location(context().device());
    api().check(api().mem_advise(dptr(addr), bytes, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, device),
                "cuMemAdvise", "preferred location device, " + format_size(bytes));
    api().check(api().mem_prefetch_async(dptr(addr), bytes, device, 0, context().copy_stream()),
                "cuMemPrefetchAsync", "to the device, " + format_size(bytes));
  }

  void do_unmap(std::byte* addr, std::uint64_t bytes) override {
    // Plain unified memory: the bytes stay valid wherever the driver put them.
    if (!prefetch_) return;
    context().enter();
    const CUmemLocation host = host_location();
    api().check(api().mem_advise(dptr(addr), bytes, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, host),
                "cuMemAdvise", "preferred location host, " + format_size(bytes));
    api().check(api().mem_prefetch_async(dptr(addr), bytes, host, 0, context().copy_stream()),
                "cuMemPrefetchAsync", "to the host, " + format_size(bytes));
  }

  Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                         std::span<const std::byte> src) override {
    std::memcpy(pool.window(chunk) + offset, src.data(), src.size());
    return Fence{};
  }

  void release(std::byte* base, std::uint64_t) noexcept override {
    CUdeviceptr allocation = 0;
    {
      std::lock_guard lock(mutex_);
      auto it = allocations_.find(dptr(base));
      if (it == allocations_.end()) return;
      allocation = it->second;
      allocations_.erase(it);
    }
    if (cuda::process_is_exiting()) return;
    try {
      context().enter();
    } catch (...) {
    }
    api().mem_free(allocation);
  }

  const std::uint64_t granularity_;
  const bool prefetch_;  // CudaBackendOptions::managed_prefetch
  std::mutex mutex_;     // guards allocations_
  std::map<CUdeviceptr, CUdeviceptr> allocations_;  // reservation base → cuMemAllocManaged's
};

}  // namespace

std::string managed_backend_unavailable_reason(const CudaBackendOptions& options) {
  std::string reason;
  const cuda::DriverApi* api = cuda::load_driver(options.driver_library, &reason);
  return api == nullptr ? reason : cuda::probe_device(*api, options, false, true);
}

std::unique_ptr<Backend> make_managed_backend(const CudaBackendOptions& options) {
  return std::make_unique<ManagedBackend>(cuda::require_driver(options, false, true), options);
}

}  // namespace lema::runtime
