#include "real_cudart.hpp"

#include <dlfcn.h>

#include <atomic>

namespace lema::preload::real {
namespace {

template <typename Fn>
Fn resolve(std::atomic<void*>& cache, const char* name) noexcept {
  void* f = cache.load(std::memory_order_acquire);
  if (!f) {
    f = ::dlsym(RTLD_NEXT, name);
    if (f) cache.store(f, std::memory_order_release);
  }
  return reinterpret_cast<Fn>(f);
}

#define LEMA_PRELOAD_REAL(fn, Type, name)     \
  Type fn() noexcept {                        \
    static std::atomic<void*> cache{nullptr}; \
    return resolve<Type>(cache, name);        \
  }

}  // namespace

LEMA_PRELOAD_REAL(malloc_fn, MallocFn, "cudaMalloc")
LEMA_PRELOAD_REAL(free_fn, FreeFn, "cudaFree")
LEMA_PRELOAD_REAL(malloc_async_fn, MallocAsyncFn, "cudaMallocAsync")
LEMA_PRELOAD_REAL(free_async_fn, FreeAsyncFn, "cudaFreeAsync")
LEMA_PRELOAD_REAL(malloc_managed_fn, MallocManagedFn, "cudaMallocManaged")
LEMA_PRELOAD_REAL(mem_get_info_fn, MemGetInfoFn, "cudaMemGetInfo")

namespace {
using GetDeviceFn = cuda_error (*)(int*);
using RuntimeVersionFn = cuda_error (*)(int*);
using AdviseLocationFn = cuda_error (*)(const void*, std::size_t, int, CudaMemLocation);
using AdviseDeviceFn = cuda_error (*)(const void*, std::size_t, int, int);
LEMA_PRELOAD_REAL(get_device_fn, GetDeviceFn, "cudaGetDevice")
LEMA_PRELOAD_REAL(runtime_version_fn, RuntimeVersionFn, "cudaRuntimeGetVersion")
LEMA_PRELOAD_REAL(advise_v2_fn, AdviseLocationFn, "cudaMemAdvise_v2")
LEMA_PRELOAD_REAL(advise_raw_fn, void*, "cudaMemAdvise")
}  // namespace

// Note [cudaMemAdvise signatures]: CUDA 12 declares cudaMemAdvise(ptr, count, advice, int
// device) and, from 12.2, cudaMemAdvise_v2(…, cudaMemLocation); CUDA 13 drops _v2 and gives
// cudaMemAdvise the cudaMemLocation parameter. The two differ in the register the device number
// lands in, so the hook asks the runtime its version (cudaRuntimeGetVersion ≥ 13000: the
// location form) rather than guessing from the names present.
bool prefer_device(void* ptr, std::size_t bytes) noexcept {
  auto get_device = get_device_fn();
  int device = 0;
  if (!get_device || get_device(&device) != kCudaSuccess) return false;
  const CudaMemLocation where{kCudaMemLocationTypeDevice, device};
  if (auto v2 = advise_v2_fn())
    return v2(ptr, bytes, kCudaMemAdviseSetPreferredLocation, where) == 0;
  void* advise = advise_raw_fn();
  auto version_fn = runtime_version_fn();
  int version = 0;
  if (!advise || !version_fn || version_fn(&version) != kCudaSuccess) return false;
  if (version >= 13000)
    return reinterpret_cast<AdviseLocationFn>(advise)(
               ptr, bytes, kCudaMemAdviseSetPreferredLocation, where) == kCudaSuccess;
  return reinterpret_cast<AdviseDeviceFn>(advise)(ptr, bytes, kCudaMemAdviseSetPreferredLocation,
                                                  device) == kCudaSuccess;
}

}  // namespace lema::preload::real
