#include "cuda/device_context.hpp"

#include <string>


#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime::cuda {
namespace {

EventFence* event_of(const Fence& fence) {
  auto* e = dynamic_cast<EventFence*>(fence.state());
  LEMA_EXPECTS(e != nullptr, "a fence from another backend was given to a CUDA backend");
  return e;
}

}  // namespace

std::string probe_device(const DriverApi& api, const CudaBackendOptions& options, bool vmm,
                         bool managed) {
  const std::string where = " (driver '" + api.library + "')";
  CUresult r = api.init(0);
  if (r != CUDA_SUCCESS) return "cuInit failed: " + api.describe(r) + where;
  int count = 0;
  r = api.device_get_count(&count);
  if (r != CUDA_SUCCESS) return "cuDeviceGetCount failed: " + api.describe(r) + where;
  if (count == 0) return "no CUDA device is present" + where;
  if (options.device < 0 || options.device >= count)
    return "CUDA device " + std::to_string(options.device) +
           " does not exist: " + std::to_string(count) + " device(s) present" + where;
  CUdevice dev = 0;
  r = api.device_get(&dev, options.device);
  if (r != CUDA_SUCCESS) return "cuDeviceGet failed: " + api.describe(r) + where;
  char name[256] = {};
  if (api.device_get_name(name, sizeof name - 1, dev) != CUDA_SUCCESS) name[0] = '\0';
  const std::string device = "CUDA device " + std::to_string(options.device) + " (" + name + ")";
  auto attribute = [&](CUdevice_attribute a) {
    int v = 0;
    return api.device_get_attribute(&v, a, dev) == CUDA_SUCCESS ? v : 0;
  };
  if (vmm && attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) == 0)
    return device +
           " does not support virtual memory management "
           "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 0); use the managed or "
           "host backend" +
           where;
  if (managed && (attribute(CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY) == 0 ||
                  attribute(CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS) == 0))
    return device +
           " does not support concurrent managed memory access (needed to prefetch managed "
           "memory); use the cuda or host backend" +
           where;
  return {};
}

const DriverApi& require_driver(const CudaBackendOptions& options, bool vmm, bool managed) {
  std::string reason;
  const DriverApi* api = load_driver(options.driver_library, &reason);
  if (api != nullptr) reason = probe_device(*api, options, vmm, managed);
  if (!reason.empty()) throw CudaUnavailable(reason);
  return *api;
}

EventFence::~EventFence() {
  if (!process_is_exiting()) api_->event_destroy(event_);
}

DeviceContext::DeviceContext(const DriverApi& api, int device) : api_(&api) {
  api.check(api.device_get(&device_, device), "cuDeviceGet", std::to_string(device));
  api.check(api.primary_ctx_retain(&ctx_, device_), "cuDevicePrimaryCtxRetain",
            "device " + std::to_string(device));
  try {
    enter();
    // Non-blocking: fills must not serialize with work on the legacy default stream.
    api.check(api.stream_create(&copy_stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate",
              "copy stream");
  } catch (...) {
    api.primary_ctx_release(device_);
    throw;
  }
}

DeviceContext::~DeviceContext() {
  if (process_is_exiting()) return;
  api_->ctx_set_current(ctx_);
  api_->stream_synchronize(copy_stream_);
  api_->stream_destroy(copy_stream_);
  api_->primary_ctx_release(device_);
}

void DeviceContext::enter() const {
  make_current(*api_, ctx_);
}

Fence DeviceContext::record(CUstream stream) const {
  enter();
  CUevent ev = nullptr;
  api_->check(api_->event_create(&ev, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  auto state = std::make_shared<EventFence>(*api_, ev);  // owns ev from here on
  api_->check(api_->event_record(ev, stream), "cuEventRecord");
  return Fence(std::move(state));
}

bool DeviceContext::complete(const Fence& fence) const {
  if (fence.trivially_complete()) return true;
  const CUresult r = api_->event_query(event_of(fence)->event());
  if (r == CUDA_ERROR_NOT_READY) return false;
  api_->check(r, "cuEventQuery");
  return true;
}

void DeviceContext::wait(const Fence& fence) const {
  if (fence.trivially_complete()) return;
  api_->check(api_->event_synchronize(event_of(fence)->event()), "cuEventSynchronize");
}

void DeviceContext::queue_wait(CUstream stream, const Fence& fence) const {
  if (fence.trivially_complete()) return;
  enter();
  api_->check(api_->stream_wait_event(stream, event_of(fence)->event(), 0), "cuStreamWaitEvent");
}

}  // namespace lema::runtime::cuda
