#include "real_cudart.hpp"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cstdint>
#include <cstring>

namespace lema::preload::real {
namespace {

// Note [Runtime found locally]: dlsym(RTLD_NEXT) searches the process's global scope after the
// hook. A library that links libcudart and was itself dlopen'ed with RTLD_LOCAL (a Python
// extension module, say) calls the hook, which is global, while its runtime is in its local scope
// only: RTLD_NEXT finds nothing. Then the hook looks for a loaded object named libcudart.so* and
// takes its symbols through a handle of it (RTLD_NOLOAD: nothing new is ever loaded).
struct Found {
  char path[1024];
  bool found;
};

int find_cudart(dl_phdr_info* info, std::size_t, void* data) {
  auto* out = static_cast<Found*>(data);
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libcudart.so", 12) != 0 || std::strlen(name) >= sizeof out->path)
    return 0;
  std::strcpy(out->path, name);
  out->found = true;
  return 1;
}

void* local_runtime() noexcept {
  static std::atomic<void*> handle{nullptr};
  void* h = handle.load(std::memory_order_acquire);
  if (h) return h;
  Found found{};
  dl_iterate_phdr(find_cudart, &found);  // dlopen is not allowed inside the callback
  if (!found.found) return nullptr;
  h = ::dlopen(found.path, RTLD_LAZY | RTLD_NOLOAD);
  if (h) handle.store(h, std::memory_order_release);
  return h;
}

// A function the runtime found does not have (cudaMemAdvise_v2 in CUDA 13): remembered, so the
// search is not repeated on every call.
void* const kMissing = reinterpret_cast<void*>(std::uintptr_t{1});

template <typename Fn>
Fn resolve(std::atomic<void*>& cache, const char* name) noexcept {
  void* f = cache.load(std::memory_order_acquire);
  if (f == kMissing) return nullptr;
  if (!f) {
    f = ::dlsym(RTLD_NEXT, name);
    void* local = f ? nullptr : local_runtime();
    if (!f && local) f = ::dlsym(local, name);
    if (f)
      cache.store(f, std::memory_order_release);
    else if (local || ::dlsym(RTLD_NEXT, "cudaMalloc"))
      cache.store(kMissing, std::memory_order_release);  // a runtime without it
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
