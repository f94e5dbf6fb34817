// The CUDA driver's function table, filled at run time: dlopen of the driver library, then
// cuGetProcAddress_v2 for every entry point, asked for the CUDA 13 signatures declared in the
// toolkit's <cuda.h> (which this file includes for the types only; nothing links libcuda).
//
// The library is `CudaBackendOptions::driver_library`, else $LEMA_CUDA_DRIVER, else
// "libcuda.so.1". Loaded libraries stay loaded for the life of the process: fences and pools hold
// its function pointers, and unloading a driver is never safe.
//
// The options and errors (CudaBackendOptions, CudaError, CudaUnavailable) come with this header
// from lema/runtime/cuda_driver.hpp.
//
// Thread safety: load_driver() may be called from any thread; a DriverApi is immutable.
#pragma once

#include <cuda.h>

#include <string>
#include <string_view>

#include "lema/runtime/cuda_driver.hpp"

namespace lema::runtime::cuda {

/// The CUDA version whose entry-point signatures the table is filled with (CUDA 13's
/// cuMemPrefetchAsync / cuMemAdvise take a CUmemLocation).
inline constexpr int kDriverApiVersion = 13000;

struct DriverApi {
  std::string library;  // as given to dlopen
  int driver_version = 0;

  decltype(&::cuGetErrorString) get_error_string = nullptr;
  decltype(&::cuGetErrorName) get_error_name = nullptr;
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuDeviceGetCount) device_get_count = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetName) device_get_name = nullptr;
  decltype(&::cuDeviceGetAttribute) device_get_attribute = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) primary_ctx_release = nullptr;
  decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&::cuMemGetInfo) mem_get_info = nullptr;
  decltype(&::cuMemGetAllocationGranularity) mem_get_allocation_granularity = nullptr;
  decltype(&::cuMemAddressReserve) mem_address_reserve = nullptr;
  decltype(&::cuMemAddressFree) mem_address_free = nullptr;
  decltype(&::cuMemCreate) mem_create = nullptr;
  decltype(&::cuMemRelease) mem_release = nullptr;
  decltype(&::cuMemMap) mem_map = nullptr;
  decltype(&::cuMemUnmap) mem_unmap = nullptr;
  decltype(&::cuMemSetAccess) mem_set_access = nullptr;
  decltype(&::cuMemHostAlloc) mem_host_alloc = nullptr;
  decltype(&::cuMemFreeHost) mem_free_host = nullptr;
  // Optional (null where the driver lacks them): pinning memory the process mapped itself.
  decltype(&::cuMemHostRegister) mem_host_register = nullptr;
  decltype(&::cuMemHostUnregister) mem_host_unregister = nullptr;
  decltype(&::cuMemAlloc) mem_alloc = nullptr;
  decltype(&::cuMemAllocManaged) mem_alloc_managed = nullptr;
  decltype(&::cuMemFree) mem_free = nullptr;
  decltype(&::cuMemPrefetchAsync) mem_prefetch_async = nullptr;
  decltype(&::cuMemAdvise) mem_advise = nullptr;
  decltype(&::cuMemcpyHtoDAsync) memcpy_htod_async = nullptr;
  decltype(&::cuMemcpyDtoH) memcpy_dtoh = nullptr;  // tests and benchmarks read back
  decltype(&::cuStreamCreate) stream_create = nullptr;
  decltype(&::cuStreamDestroy) stream_destroy = nullptr;
  decltype(&::cuStreamSynchronize) stream_synchronize = nullptr;
  decltype(&::cuStreamWaitEvent) stream_wait_event = nullptr;
  decltype(&::cuEventCreate) event_create = nullptr;
  decltype(&::cuEventRecord) event_record = nullptr;
  decltype(&::cuEventQuery) event_query = nullptr;
  decltype(&::cuEventSynchronize) event_synchronize = nullptr;
  decltype(&::cuEventDestroy) event_destroy = nullptr;

  /// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)".
  std::string describe(CUresult r) const;
  /// Throws lema::runtime::CudaError (OutOfMemory for CUDA_ERROR_OUT_OF_MEMORY) naming `call`,
  /// `what` (the arguments that matter) and the driver's text, unless r == CUDA_SUCCESS.
  void check(CUresult r, const char* call, std::string_view what = {}) const;
};

/// The table for `library` (empty: $LEMA_CUDA_DRIVER, else "libcuda.so.1"), loaded once per
/// library; nullptr with `reason` set when the library cannot be loaded, is older than
/// kDriverApiVersion, or lacks an entry point. Failures are not cached.
const DriverApi* load_driver(std::string_view library, std::string* reason);

/// The library load_driver() would open for `library`.
std::string driver_library_name(std::string_view library);

/// True once the process has begun exiting: destructors skip driver calls then (the driver
/// may already have torn itself down).
bool process_is_exiting() noexcept;

/// Makes the device's primary context current on the calling thread (driver calls act on the
/// thread's current context, and the pager calls the backend from several threads).
void make_current(const DriverApi& api, CUcontext ctx);

}  // namespace lema::runtime::cuda
