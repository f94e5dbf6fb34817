// Loading the driver: dlopen, cuGetProcAddress_v2, one table per library.
#include "cuda/driver_api.hpp"

#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>


namespace lema::runtime::cuda {
namespace {

std::atomic<bool> g_exiting{false};

void mark_exiting() {
  g_exiting.store(true);
}

using GetProcAddress = CUresult (*)(const char*, void**, int, cuuint64_t,
                                    CUdriverProcAddressQueryResult*);

template <typename Fn>
bool resolve(GetProcAddress get, const char* symbol, Fn& out, std::string* missing) {
  void* p = nullptr;
  CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  const CUresult r = get(symbol, &p, kDriverApiVersion, CU_GET_PROC_ADDRESS_DEFAULT, &status);
  if (r != CUDA_SUCCESS || status != CU_GET_PROC_ADDRESS_SUCCESS || p == nullptr) {
    if (!missing->empty()) *missing += ", ";
    *missing += symbol;
    return false;
  }
  out = reinterpret_cast<Fn>(p);
  return true;
}

std::unique_ptr<DriverApi> open_driver(const std::string& library, std::string* reason) {
  // RTLD_NOW: a driver with unresolved symbols fails here, not on first use.
  void* handle = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = ::dlerror();
    *reason = "cannot load the CUDA driver '" + library + "' (" + (err ? err : "dlopen failed") +
              "); install the NVIDIA driver, or name the library in LEMA_CUDA_DRIVER";
    return nullptr;
  }
  auto get = reinterpret_cast<GetProcAddress>(::dlsym(handle, "cuGetProcAddress_v2"));
  if (get == nullptr) {
    *reason = "the CUDA driver '" + library +
              "' has no cuGetProcAddress_v2 (older than CUDA 12); the CUDA backends need a "
              "driver for CUDA 13 or later";
    ::dlclose(handle);
    return nullptr;
  }
  auto api = std::make_unique<DriverApi>();
  api->library = library;
  std::string missing;
  decltype(&::cuDriverGetVersion) driver_get_version = nullptr;
  if (!resolve(get, "cuDriverGetVersion", driver_get_version, &missing) ||
      driver_get_version(&api->driver_version) != CUDA_SUCCESS) {
    *reason = "the CUDA driver '" + library + "' does not report its version";
    ::dlclose(handle);
    return nullptr;
  }
  if (api->driver_version < kDriverApiVersion) {
    *reason = "the CUDA driver '" + library + "' supports CUDA " +
              std::to_string(api->driver_version / 1000) + "." +
              std::to_string(api->driver_version % 1000 / 10) +
              "; the CUDA backends need CUDA 13.0 or later (update the NVIDIA driver)";
    ::dlclose(handle);
    return nullptr;
  }
  resolve(get, "cuGetErrorString", api->get_error_string, &missing);
  resolve(get, "cuGetErrorName", api->get_error_name, &missing);
  resolve(get, "cuInit", api->init, &missing);
  resolve(get, "cuDeviceGetCount", api->device_get_count, &missing);
  resolve(get, "cuDeviceGet", api->device_get, &missing);
  resolve(get, "cuDeviceGetName", api->device_get_name, &missing);
  resolve(get, "cuDeviceGetAttribute", api->device_get_attribute, &missing);
  resolve(get, "cuDevicePrimaryCtxRetain", api->primary_ctx_retain, &missing);
  resolve(get, "cuDevicePrimaryCtxRelease", api->primary_ctx_release, &missing);
  resolve(get, "cuCtxSetCurrent", api->ctx_set_current, &missing);
  resolve(get, "cuMemGetInfo", api->mem_get_info, &missing);
  resolve(get, "cuMemGetAllocationGranularity", api->mem_get_allocation_granularity, &missing);
  resolve(get, "cuMemAddressReserve", api->mem_address_reserve, &missing);
  resolve(get, "cuMemAddressFree", api->mem_address_free, &missing);
  resolve(get, "cuMemCreate", api->mem_create, &missing);
  resolve(get, "cuMemRelease", api->mem_release, &missing);
  resolve(get, "cuMemMap", api->mem_map, &missing);
  resolve(get, "cuMemUnmap", api->mem_unmap, &missing);
  resolve(get, "cuMemSetAccess", api->mem_set_access, &missing);
  resolve(get, "cuMemHostAlloc", api->mem_host_alloc, &missing);
  resolve(get, "cuMemFreeHost", api->mem_free_host, &missing);
  std::string optional;
  resolve(get, "cuMemHostRegister", api->mem_host_register, &optional);
  resolve(get, "cuMemHostUnregister", api->mem_host_unregister, &optional);
  resolve(get, "cuMemAlloc", api->mem_alloc, &missing);
  resolve(get, "cuMemAllocManaged", api->mem_alloc_managed, &missing);
  resolve(get, "cuMemFree", api->mem_free, &missing);
  resolve(get, "cuMemPrefetchAsync", api->mem_prefetch_async, &missing);
  resolve(get, "cuMemAdvise", api->mem_advise, &missing);
  resolve(get, "cuMemcpyHtoDAsync", api->memcpy_htod_async, &missing);
  resolve(get, "cuMemcpyDtoH", api->memcpy_dtoh, &missing);
  resolve(get, "cuStreamCreate", api->stream_create, &missing);
  resolve(get, "cuStreamDestroy", api->stream_destroy, &missing);
  resolve(get, "cuStreamSynchronize", api->stream_synchronize, &missing);
  resolve(get, "cuStreamWaitEvent", api->stream_wait_event, &missing);
  resolve(get, "cuEventCreate", api->event_create, &missing);
  resolve(get, "cuEventRecord", api->event_record, &missing);
  resolve(get, "cuEventQuery", api->event_query, &missing);
  resolve(get, "cuEventSynchronize", api->event_synchronize, &missing);
  resolve(get, "cuEventDestroy", api->event_destroy, &missing);
  if (!missing.empty()) {
    *reason = "the CUDA driver '" + library + "' lacks entry points the backends use: " + missing;
    ::dlclose(handle);
    return nullptr;
  }
  return api;
}

}  // namespace

std::string driver_library_name(std::string_view library) {
  if (!library.empty()) return std::string(library);
  if (const char* env = std::getenv("LEMA_CUDA_DRIVER"); env != nullptr && *env != '\0') return env;
  return "libcuda.so.1";
}

const DriverApi* load_driver(std::string_view library, std::string* reason) {
  static std::mutex mutex;
  // Never freed: fences and pools may outlive any owner we could give the tables.
  static auto* loaded = new std::map<std::string, std::unique_ptr<DriverApi>>();
  static std::once_flag exit_hook;
  std::call_once(exit_hook, [] { std::atexit(mark_exiting); });

  const std::string name = driver_library_name(library);
  std::lock_guard lock(mutex);
  if (auto it = loaded->find(name); it != loaded->end()) return it->second.get();
  std::string why;
  auto api = open_driver(name, &why);
  if (!api) {
    if (reason != nullptr) *reason = why;
    return nullptr;
  }
  return loaded->emplace(name, std::move(api)).first->second.get();
}

bool process_is_exiting() noexcept {
  return g_exiting.load();
}

std::string DriverApi::describe(CUresult r) const {
  const char* name = nullptr;
  const char* text = nullptr;
  if (get_error_name == nullptr || get_error_name(r, &name) != CUDA_SUCCESS) name = nullptr;
  if (get_error_string == nullptr || get_error_string(r, &text) != CUDA_SUCCESS) text = nullptr;
  std::string out = name ? name : "CUresult " + std::to_string(static_cast<int>(r));
  if (text) out += std::string(" (") + text + ")";
  return out;
}

void DriverApi::check(CUresult r, const char* call, std::string_view what) const {
  if (r == CUDA_SUCCESS) return;
  std::string msg = std::string(call);
  if (!what.empty()) msg += "(" + std::string(what) + ")";
  msg += " failed: " + describe(r);
  if (r == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(msg);
  throw CudaError(msg, static_cast<int>(r));
}

void make_current(const DriverApi& api, CUcontext ctx) {
  api.check(api.ctx_set_current(ctx), "cuCtxSetCurrent");
}

}  // namespace lema::runtime::cuda
