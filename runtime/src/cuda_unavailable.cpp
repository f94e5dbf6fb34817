// The CUDA backends' entry points in a build without the CUDA toolkit: the same declarations
// (cuda_backend.hpp) in every build, so callers need no #ifdef; each says why it cannot work.
#include <memory>
#include <string>

#include "lema/runtime/cuda_backend.hpp"
#include "lema/runtime/pinned_host_pool.hpp"

namespace lema::runtime {
namespace {

std::string not_built() {
  return "this LEMA was built without the CUDA toolkit; rebuild it with the toolkit's headers "
         "(LEMA_WITH_CUDA) to use a GPU";
}

}  // namespace

std::string cuda_backend_unavailable_reason(const CudaBackendOptions&) { return not_built(); }
std::string managed_backend_unavailable_reason(const CudaBackendOptions&) { return not_built(); }

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions&) {
  throw CudaUnavailable(not_built());
}
std::unique_ptr<Backend> make_managed_backend(const CudaBackendOptions&) {
  throw CudaUnavailable(not_built());
}

CudaDeviceMemory cuda_device_memory(const CudaBackendOptions&) {
  throw CudaUnavailable(not_built());
}

std::unique_ptr<Backend> try_make_cuda_backend(const CudaBackendOptions&, std::string* reason) {
  if (reason != nullptr) *reason = not_built();
  return nullptr;
}

std::unique_ptr<allocator::MemoryResource> make_pinned_host_resource(const CudaBackendOptions&) {
  throw CudaUnavailable(not_built());
}
std::unique_ptr<PinnedHostPool> make_pinned_host_pool(allocator::SlotPoolOptions,
                                                      const CudaBackendOptions&) {
  throw CudaUnavailable(not_built());
}

}  // namespace lema::runtime
