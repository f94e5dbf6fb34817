// The cuda backend: the driver's virtual memory management (see cuda_backend.hpp).
#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

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

std::string hex(CUdeviceptr p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

CUmemAllocationProp device_allocation(CUdevice device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(device);
  return prop;
}

CUmemAccessDesc device_access(CUdevice device, CUmemAccess_flags flags) {
  CUmemAccessDesc desc{};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = static_cast<int>(device);
  desc.flags = flags;
  return desc;
}

// The chunks of one pool: physical allocations, each mapped once in the pool window. Releases in
// reverse order of creation: window mappings, allocations, the window's address range.
class CudaPool final : public PhysicalPool {
 public:
  CudaPool(const cuda::DeviceContext& context, std::size_t chunks, std::uint64_t chunk_bytes)
      : context_(&context), chunk_bytes_(chunk_bytes) {
    const DriverApi& api = context.api();
    const std::uint64_t bytes = chunks * chunk_bytes;
    window_bytes_ = bytes;
    try {
      api.check(api.mem_address_reserve(&window_, bytes, 0, 0, 0), "cuMemAddressReserve",
                format_size(bytes) + " for the pool window");
      const CUmemAllocationProp prop = device_allocation(context.device());
      handles_.reserve(chunks);
      for (std::size_t c = 0; c < chunks; ++c) {
        CUmemGenericAllocationHandle h = 0;
        const CUresult r = api.mem_create(&h, chunk_bytes, &prop, 0);
        if (r != CUDA_SUCCESS) throw_creation_failed(r, chunks, c);
        handles_.push_back(h);
        api.check(api.mem_map(window_ + c * chunk_bytes, chunk_bytes, 0, h, 0), "cuMemMap",
                  "chunk " + std::to_string(c) + " into the pool window");
        ++mapped_;
      }
      const CUmemAccessDesc rw =
          device_access(context.device(), CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
      api.check(api.mem_set_access(window_, bytes, &rw, 1), "cuMemSetAccess", "pool window");
    } catch (...) {
      release_all();
      throw;
    }
  }
  CudaPool(const CudaPool&) = delete;
  CudaPool& operator=(const CudaPool&) = delete;
  ~CudaPool() override {
    if (!cuda::process_is_exiting()) release_all();
  }

  std::size_t chunk_count() const noexcept override { return handles_.size(); }
  std::uint64_t chunk_bytes() const noexcept override { return chunk_bytes_; }
  std::byte* window(std::size_t) const noexcept override { return nullptr; }

  CUmemGenericAllocationHandle handle(std::size_t chunk) const { return handles_.at(chunk); }

  // Note [Released pool memory] on cuda: every chunk's allocation is unmapped from the pool
  // window and released (cuMemRelease), the window's address range kept; restoring creates
  // and maps them again. The chunk count stays what it was.
  void release_memory() {
    const DriverApi& api = context_->api();
    context_->enter();
    for (std::size_t c = mapped_; c-- > 0;) api.mem_unmap(window_ + c * chunk_bytes_, chunk_bytes_);
    mapped_ = 0;
    for (std::size_t c = handles_.size(); c-- > 0;) api.mem_release(handles_[c]);
    handles_.assign(handles_.size(), 0);
  }
  void restore_memory() {
    const DriverApi& api = context_->api();
    context_->enter();
    const std::size_t chunks = handles_.size();
    const CUmemAllocationProp prop = device_allocation(context_->device());
    try {
      for (std::size_t c = 0; c < chunks; ++c) {
        const CUresult r = api.mem_create(&handles_[c], chunk_bytes_, &prop, 0);
        if (r != CUDA_SUCCESS) {
          handles_[c] = 0;
          api.check(r, "cuMemCreate", "chunk " + std::to_string(c) + " of " +
                                          std::to_string(chunks) + " restoring the page pool");
        }
        api.check(api.mem_map(window_ + c * chunk_bytes_, chunk_bytes_, 0, handles_[c], 0),
                  "cuMemMap", "chunk " + std::to_string(c) + " into the pool window");
        ++mapped_;
      }
      const CUmemAccessDesc rw =
          device_access(context_->device(), CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
      api.check(api.mem_set_access(window_, chunks * chunk_bytes_, &rw, 1), "cuMemSetAccess",
                "pool window");
    } catch (...) {
      // Back to released, so that a later restore starts over.
      for (std::size_t c = mapped_; c-- > 0;)
        api.mem_unmap(window_ + c * chunk_bytes_, chunk_bytes_);
      mapped_ = 0;
      for (std::size_t c = chunks; c-- > 0;)
        if (handles_[c] != 0) api.mem_release(handles_[c]);
      handles_.assign(chunks, 0);
      throw;
    }
  }
  CUdeviceptr device_window(std::size_t chunk) const { return window_ + chunk * chunk_bytes_; }

 private:
  [[noreturn]] void throw_creation_failed(CUresult r, std::size_t chunks, std::size_t failed) {
    const DriverApi& api = context_->api();
    release_all();
    std::size_t free = 0, total = 0;
    const bool known = api.mem_get_info(&free, &total) == CUDA_SUCCESS;
    std::string msg = "cannot create the page pool on CUDA device " +
                      std::to_string(context_->device()) + ": asked " + std::to_string(chunks) +
                      " chunks of " + format_size(chunk_bytes_) + " = " +
                      format_size(chunks * chunk_bytes_) + "; cuMemCreate of chunk " +
                      std::to_string(failed) + " failed: " + api.describe(r);
    if (known) msg += "; the device has " + format_size(free) + " free of " + format_size(total);
    msg += "; lower the budget (everything created was released)";
    if (r == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(msg);
    throw CudaError(msg, static_cast<int>(r));
  }

  void release_all() noexcept {
    if (mapped_ == 0) {  // released memory (release_memory): only the window's range is left
      handles_.erase(std::remove(handles_.begin(), handles_.end(), CUmemGenericAllocationHandle{0}),
                     handles_.end());
    }
    const DriverApi& api = context_->api();
    try {
      context_->enter();
    } catch (...) {
    }
    for (std::size_t c = mapped_; c-- > 0;) api.mem_unmap(window_ + c * chunk_bytes_, chunk_bytes_);
    mapped_ = 0;
    for (std::size_t c = handles_.size(); c-- > 0;) api.mem_release(handles_[c]);
    handles_.clear();
    if (window_ != 0) api.mem_address_free(window_, window_bytes_);
    window_ = 0;
  }

  const cuda::DeviceContext* context_;
  std::uint64_t chunk_bytes_;
  std::uint64_t window_bytes_ = 0;
  CUdeviceptr window_ = 0;
  std::vector<CUmemGenericAllocationHandle> handles_;
  std::size_t mapped_ = 0;
};

class CudaBackend final : public cuda::DeviceBackend {
 public:
  CudaBackend(const DriverApi& api, const CudaBackendOptions& options)
      : DeviceBackend(api, options.device) {
    context().enter();
    const CUmemAllocationProp prop = device_allocation(context().device());
    std::size_t minimum = 0;
    api.check(api.mem_get_allocation_granularity(&minimum, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
              "cuMemGetAllocationGranularity");
    granularity_ = options.granularity != 0 ? options.granularity : minimum;
    LEMA_EXPECTS(minimum != 0 && is_power_of_two(granularity_) && granularity_ % minimum == 0,
                 "cuda backend: granularity " + format_size(granularity_) +
                     " must be a power-of-two multiple of the device's " + format_size(minimum));
  }

  std::string_view name() const noexcept override { return "cuda"; }
  std::uint64_t granularity() const noexcept override { return granularity_; }
  BackendCapabilities capabilities() const noexcept override {
    return {.residency = BackendCapabilities::Residency::mapped};
  }

 private:
  Reservation do_reserve(std::uint64_t bytes) override {
    context().enter();
    CUdeviceptr p = 0;
    api().check(api().mem_address_reserve(&p, bytes, granularity_, 0, 0), "cuMemAddressReserve",
                format_size(bytes));
    return Reservation(this, reinterpret_cast<std::byte*>(p), bytes);
  }

  std::unique_ptr<PhysicalPool> do_create_pool(std::size_t chunks,
                                               std::uint64_t chunk_bytes) override {
    context().enter();
    return std::make_unique<CudaPool>(context(), chunks, chunk_bytes);
  }

  void do_release_pool_memory(PhysicalPool& pool) override {
    static_cast<CudaPool&>(pool).release_memory();
  }
  void do_restore_pool_memory(PhysicalPool& pool) override {
    static_cast<CudaPool&>(pool).restore_memory();
  }

  void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    const PageMapping page{chunk, addr};
    do_map_pages(pool, std::span<const PageMapping>(&page, 1), access);
  }

  // Note [Access per run]: cuMemSetAccess is the costly half of a map (it writes the device's
  // page tables and may synchronize), and one call may span several mappings as long as the
  // whole range is mapped. So every chunk of the batch is mapped first, then the addresses are
  // sorted and each maximal run of adjacent pages gets one cuMemSetAccess: the pager's fill of
  // N consecutive pages of a layer sets access once, not N times.
  void do_map_pages(PhysicalPool& pool, std::span<const PageMapping> pages,
                    Access access) override {
    auto& cp = static_cast<CudaPool&>(pool);
    const std::uint64_t bytes = cp.chunk_bytes();
    context().enter();
    std::vector<CUdeviceptr> mapped;
    mapped.reserve(pages.size());
    try {
      for (const PageMapping& p : pages) {
        api().check(
            api().mem_map(dptr(p.addr), bytes, 0, cp.handle(p.chunk), 0), "cuMemMap",
            hex(dptr(p.addr)) + ", " + format_size(bytes) + ", chunk " + std::to_string(p.chunk));
        mapped.push_back(dptr(p.addr));
      }
      std::sort(mapped.begin(), mapped.end());
      for (std::size_t first = 0; first < mapped.size();) {
        std::size_t end = first + 1;
        while (end < mapped.size() && mapped[end] == mapped[end - 1] + bytes) ++end;
        set_access(mapped[first], (end - first) * bytes, access);
        first = end;
      }
    } catch (...) {
      // All or nothing (Backend::map_pages): the error is the one reported; an unmap failing
      // here as well is not its cause.
      for (CUdeviceptr p : mapped) api().mem_unmap(p, bytes);
      throw;
    }
    std::lock_guard lock(mutex_);
    for (CUdeviceptr p : mapped) mappings_[p] = bytes;
  }

  void do_unmap(std::byte* addr, std::uint64_t bytes) override {
    // Every mapping inside the range is unmapped on its own: the driver unmaps whole mappings,
    // and the range may hold holes (pages never mapped).
    std::vector<std::pair<CUdeviceptr, std::uint64_t>> found;
    {
      std::lock_guard lock(mutex_);
      const CUdeviceptr lo = dptr(addr), hi = lo + bytes;
      for (auto it = mappings_.lower_bound(lo); it != mappings_.end() && it->first < hi;) {
        LEMA_EXPECTS(it->first + it->second <= hi,
                     "unmap: the range ends inside the mapping at " + hex(it->first));
        found.emplace_back(*it);
        it = mappings_.erase(it);
      }
    }
    context().enter();
    for (const auto& [p, n] : found)
      api().check(api().mem_unmap(p, n), "cuMemUnmap", hex(p) + ", " + format_size(n));
  }

  Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                         std::span<const std::byte> src) override {
    auto& cp = static_cast<CudaPool&>(pool);
    context().enter();
    api().check(api().memcpy_htod_async(cp.device_window(chunk) + offset, src.data(), src.size(),
                                        context().copy_stream()),
                "cuMemcpyHtoDAsync",
                format_size(src.size()) + " into chunk " + std::to_string(chunk));
    return context().record(context().copy_stream());
  }

  void release(std::byte* base, std::uint64_t bytes) noexcept override {
    if (cuda::process_is_exiting()) return;
    try {
      context().enter();
    } catch (...) {
    }
    api().mem_address_free(dptr(base), bytes);
  }

  void set_access(CUdeviceptr p, std::uint64_t bytes, Access access) {
    // Read-only mappings catch stray writes into weights; a device that refuses them gets
    // read-write mappings instead (remembered, so the refusal is paid once).
    if (access == Access::read && !read_only_refused_.load()) {
      const CUmemAccessDesc ro = device_access(context().device(), CU_MEM_ACCESS_FLAGS_PROT_READ);
      const CUresult r = api().mem_set_access(p, bytes, &ro, 1);
      if (r == CUDA_SUCCESS) return;
      if (r != CUDA_ERROR_INVALID_VALUE && r != CUDA_ERROR_NOT_SUPPORTED)
        api().check(r, "cuMemSetAccess", hex(p) + ", " + format_size(bytes) + ", read");
      read_only_refused_.store(true);
    }
    const CUmemAccessDesc rw =
        device_access(context().device(), CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    api().check(api().mem_set_access(p, bytes, &rw, 1), "cuMemSetAccess",
                hex(p) + ", " + format_size(bytes) + ", read-write");
  }

  std::uint64_t granularity_ = 0;
  std::atomic<bool> read_only_refused_{false};
  std::mutex mutex_;  // guards mappings_
  std::map<CUdeviceptr, std::uint64_t> mappings_;
};

}  // namespace

std::string cuda_backend_unavailable_reason(const CudaBackendOptions& options) {
  std::string reason;
  const cuda::DriverApi* api = cuda::load_driver(options.driver_library, &reason);
  return api == nullptr ? reason : cuda::probe_device(*api, options, true, false);
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(cuda::require_driver(options, true, false), options);
}

CudaDeviceMemory cuda_device_memory(const CudaBackendOptions& options) {
  const DriverApi& api = cuda::require_driver(options, false, false);
  const cuda::DeviceContext context(api, options.device);
  context.enter();
  std::size_t free = 0, total = 0;
  api.check(api.mem_get_info(&free, &total), "cuMemGetInfo",
            "device " + std::to_string(options.device));
  return {free, total};
}

std::unique_ptr<Backend> try_make_cuda_backend(const CudaBackendOptions& options,
                                               std::string* reason) {
  try {
    return make_cuda_backend(options);
  } catch (const CudaUnavailable& e) {
    if (reason != nullptr) *reason = e.what();
    return nullptr;
  }
}

}  // namespace lema::runtime
