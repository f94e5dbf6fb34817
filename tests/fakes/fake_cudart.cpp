// A stand-in for the CUDA runtime's allocation calls over host memory (malloc), for the preload
// hook's tests on machines without a GPU: a program links it in place of libcudart, and the hook
// finds it with dlsym(RTLD_NEXT) as it would find the real one. It keeps what a test needs to
// see where a call went (fake_cudart.h). FAKE_CUDART_TOTAL (bytes) is the device's size that
// cudaMemGetInfo reports and allocations are refused beyond (default 80 GiB).
#include "fake_cudart.h"

#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace {

struct Block {
  std::size_t bytes;
  bool managed;
};

struct State {
  std::mutex mutex;
  std::unordered_map<void*, Block> live;
  std::size_t live_bytes = 0;
  long long malloc_calls = 0, async_calls = 0, managed_calls = 0, free_calls = 0,
            free_async_calls = 0, free_errors = 0, advise_calls = 0;
};

State& state() {
  static State* s = [] {
    auto* st = new State;  // never destroyed: the hook may free during exit
    pthread_atfork([] { state().mutex.lock(); }, [] { state().mutex.unlock(); },
                   [] { state().mutex.unlock(); });
    return st;
  }();
  return *s;
}

std::size_t total_bytes() {
  const char* v = std::getenv("FAKE_CUDART_TOTAL");
  return v && *v ? std::strtoull(v, nullptr, 10) : std::size_t{80} << 30;
}

int allocate(void** ptr, std::size_t bytes, bool managed, long long State::*counter) {
  if (!ptr) return 1;  // cudaErrorInvalidValue
  State& s = state();
  std::lock_guard lock(s.mutex);
  ++(s.*counter);
  if (bytes > total_bytes() - std::min(total_bytes(), s.live_bytes)) return 2;
  void* p = std::malloc(bytes ? bytes : 1);
  if (!p) return 2;  // cudaErrorMemoryAllocation
  s.live[p] = {bytes, managed};
  s.live_bytes += bytes;
  *ptr = p;
  return 0;
}

int release(void* ptr, long long State::*counter) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  ++(s.*counter);
  if (!ptr) return 0;
  auto it = s.live.find(ptr);
  if (it == s.live.end()) {
    ++s.free_errors;
    return 1;  // cudaErrorInvalidValue, as the runtime answers a pointer it does not know
  }
  s.live_bytes -= it->second.bytes;
  s.live.erase(it);
  std::free(ptr);
  return 0;
}

}  // namespace

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

FAKE_EXPORT int cudaMalloc(void** ptr, std::size_t bytes) {
  return allocate(ptr, bytes, false, &State::malloc_calls);
}
FAKE_EXPORT int cudaMallocAsync(void** ptr, std::size_t bytes, void* /*stream*/) {
  return allocate(ptr, bytes, false, &State::async_calls);
}
FAKE_EXPORT int cudaMallocManaged(void** ptr, std::size_t bytes, unsigned /*flags*/) {
  return allocate(ptr, bytes, true, &State::managed_calls);
}
FAKE_EXPORT int cudaFree(void* ptr) {
  return release(ptr, &State::free_calls);
}
FAKE_EXPORT int cudaFreeAsync(void* ptr, void* /*stream*/) {
  return release(ptr, &State::free_async_calls);
}
FAKE_EXPORT int cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total) {
  if (!free_bytes || !total) return 1;
  State& s = state();
  std::lock_guard lock(s.mutex);
  *total = total_bytes();
  *free_bytes = *total - std::min(*total, s.live_bytes);
  return 0;
}
FAKE_EXPORT int cudaGetDevice(int* device) {
  if (!device) return 1;
  *device = 0;
  return 0;
}
FAKE_EXPORT int cudaRuntimeGetVersion(int* version) {
  if (!version) return 1;
  *version = 13000;
  return 0;
}
struct FakeMemLocation {
  int type;
  int id;
};
// CUDA 13's form (Note [cudaMemAdvise signatures] in the hook): counted when it names a device
// location for managed memory the fake gave out.
FAKE_EXPORT int cudaMemAdvise(const void* ptr, std::size_t /*bytes*/, int advice,
                              FakeMemLocation location) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  auto it = s.live.find(const_cast<void*>(ptr));
  if (it == s.live.end() || !it->second.managed || advice != 3 || location.type != 1 ||
      location.id != 0)
    return 1;
  ++s.advise_calls;
  return 0;
}

FAKE_EXPORT long long fake_cudart_count(const char* name) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  const struct {
    const char* name;
    long long value;
  } counts[] = {{"malloc", s.malloc_calls},
                {"malloc_async", s.async_calls},
                {"managed", s.managed_calls},
                {"free", s.free_calls},
                {"free_async", s.free_async_calls},
                {"free_errors", s.free_errors},
                {"advise", s.advise_calls},
                {"live", static_cast<long long>(s.live.size())},
                {"live_bytes", static_cast<long long>(s.live_bytes)}};
  for (const auto& c : counts)
    if (name && std::strcmp(name, c.name) == 0) return c.value;
  return -1;
}

FAKE_EXPORT int fake_cudart_is_managed(const void* ptr) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  auto it = s.live.find(const_cast<void*>(ptr));
  return it != s.live.end() && it->second.managed;
}
