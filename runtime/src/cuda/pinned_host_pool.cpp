#include "lema/runtime/pinned_host_pool.hpp"

#include "cuda/device_context.hpp"
#include "cuda/pinned_host_resource.hpp"

namespace lema::runtime {
namespace {

// The context the resource pins on, owned with it (the backends own theirs and lend it).
class OwningPinnedHostResource final : public allocator::MemoryResource {
 public:
  explicit OwningPinnedHostResource(const CudaBackendOptions& options)
      : context_(cuda::require_driver(options, /*vmm=*/false, /*managed=*/false), options.device),
        pinned_(context_) {}

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    return pinned_.allocate(bytes, alignment);
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override {
    pinned_.deallocate(p, bytes, alignment);
  }

  cuda::DeviceContext context_;
  cuda::PinnedHostResource pinned_;
};

}  // namespace

std::unique_ptr<allocator::MemoryResource> make_pinned_host_resource(
    const CudaBackendOptions& options) {
  return std::make_unique<OwningPinnedHostResource>(options);
}

std::unique_ptr<PinnedHostPool> make_pinned_host_pool(allocator::SlotPoolOptions pool,
                                                      const CudaBackendOptions& options) {
  return std::make_unique<PinnedHostPool>(make_pinned_host_resource(options), pool);
}

}  // namespace lema::runtime
