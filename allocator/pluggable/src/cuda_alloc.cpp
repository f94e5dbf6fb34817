// The C ABI of liblema_cuda_alloc.so (include/lema/cuda_alloc.h).
//
// Note [Nothing crosses the C boundary]: PyTorch calls lema_alloc/lema_free from C++ that does
// not expect exceptions, and Python calls the rest through ctypes, so every entry point catches
// everything. A failure is written, without allocating, into a per-thread buffer and printed as
// one line; the caller gets nullptr or -1 (PyTorch turns a nullptr into its own OutOfMemoryError).
#include "lema/cuda_alloc.h"

#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>

#include "lema/allocator/cuda/device_vmm_resource.hpp"
#include "lema/base/error.hpp"
#include "settings.hpp"

#define LEMA_EXPORT __attribute__((visibility("default")))

namespace {

using lema::allocator::cuda::DeviceVmmResource;
using lema::allocator::cuda::ReleaseStatus;

constexpr int kMaxDevices = 64;

thread_local char t_last_error[512];

// Records and prints one line: "<function>: <what>".
void report(const char* function, const char* what) noexcept {
  std::snprintf(t_last_error, sizeof t_last_error, "%s: %s", function, what);
  std::fprintf(stderr, "lema: %s\n", t_last_error);
}

void clear_error() noexcept {
  t_last_error[0] = '\0';
}

// Resources are made on first use and never destroyed: PyTorch may free tensors while the
// process exits, after static destructors ran (they stay reachable from here, so leak checkers
// do not count them).
std::array<std::atomic<DeviceVmmResource*>, kMaxDevices> g_resources{};
std::mutex g_make_mutex;

DeviceVmmResource* find(int device) noexcept {
  if (device < 0 || device >= kMaxDevices) return nullptr;
  return g_resources[static_cast<std::size_t>(device)].load(std::memory_order_acquire);
}

DeviceVmmResource& resource(int device) {
  if (device < 0 || device >= kMaxDevices)
    throw lema::InvalidArgument("device " + std::to_string(device) +
                                " is not a device ordinal (0 to " +
                                std::to_string(kMaxDevices - 1) + ")");
  if (DeviceVmmResource* r = find(device)) return *r;
  std::lock_guard lock(g_make_mutex);
  auto& slot = g_resources[static_cast<std::size_t>(device)];
  if (DeviceVmmResource* r = slot.load(std::memory_order_acquire)) return *r;
  auto* r = new DeviceVmmResource(lema::pluggable::options_from_environment(device));
  slot.store(r, std::memory_order_release);
  return *r;
}

// Runs `f` for every device's resource; -1 with a line when the tag was refused everywhere.
template <typename F>
int for_tag(const char* function, const char* tag, F&& f) noexcept {
  clear_error();
  if (tag == nullptr) {
    report(function, "the tag is NULL; pass the tag's name");
    return -1;
  }
  try {
    bool any = false;
    std::string last;
    for (int d = 0; d < kMaxDevices; ++d) {
      DeviceVmmResource* r = find(d);
      if (r == nullptr) continue;
      try {
        f(*r);
        any = true;
      } catch (const lema::InvalidArgument& e) {
        last = e.what();  // the tag is not on this device; another may have it
      }
    }
    if (any) return 0;
    if (last.empty())
      last = std::string("tag '") + tag + "': no device memory was allocated through lema_alloc";
    report(function, last.c_str());
  } catch (const std::exception& e) {
    report(function, e.what());
  } catch (...) {
    report(function, "unknown exception");
  }
  return -1;
}

}  // namespace

extern "C" {

LEMA_EXPORT void* lema_alloc(ssize_t size, int device, cudaStream_t /*stream*/) {
  // Fresh physical memory has no pending work: usable at once on any stream.
  clear_error();
  // Some PyTorch versions call with the device as c10::DeviceIndex (int8_t), which leaves the
  // upper bits of the register unspecified: only the low byte is the device.
  device = static_cast<signed char>(device);
  if (size < 0) {
    char line[160];
    std::snprintf(line, sizeof line, "size %zd on device %d is negative; nothing allocated", size,
                  device);
    report("lema_alloc", line);
    return nullptr;
  }
  if (size == 0) return nullptr;
  try {
    return resource(device).allocate(static_cast<std::size_t>(size));
  } catch (const std::exception& e) {
    report("lema_alloc", e.what());
  } catch (...) {
    report("lema_alloc", "unknown exception");
  }
  return nullptr;
}

LEMA_EXPORT void lema_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
  clear_error();
  if (ptr == nullptr) return;
  device = static_cast<signed char>(device);  // as in lema_alloc
  char line[256];
  DeviceVmmResource* r = find(device);
  if (r == nullptr || size < 0) {
    std::snprintf(line, sizeof line,
                  "free of %p (%zd bytes) on device %d, which lema_alloc did not allocate there; "
                  "ignored",
                  ptr, size, device);
    report("lema_free", line);
    return;
  }
  switch (r->deallocate_on_stream(ptr, static_cast<std::size_t>(size), stream)) {
    case ReleaseStatus::released:
      return;
    case ReleaseStatus::unknown_pointer:
      std::snprintf(line, sizeof line,
                    "free of %p (%zd bytes) on device %d, which is not a live allocation (a "
                    "double free?); ignored",
                    ptr, size, device);
      break;
    case ReleaseStatus::size_mismatch:
      std::snprintf(line, sizeof line,
                    "free of %p on device %d says %zd bytes, which is not the size it was "
                    "allocated with; freed all the same",
                    ptr, device, size);
      break;
  }
  report("lema_free", line);
}

LEMA_EXPORT int lema_set_tag(const char* tag) {
  clear_error();
  try {
    lema::allocator::cuda::set_current_tag(tag == nullptr ? "" : tag);
    return 0;
  } catch (const std::exception& e) {
    report("lema_set_tag", e.what());
  }
  return -1;
}

LEMA_EXPORT int lema_pause(const char* tag) {
  return for_tag("lema_pause", tag, [&](DeviceVmmResource& r) { r.pause(tag, false); });
}

LEMA_EXPORT int lema_pause_keeping_contents(const char* tag) {
  return for_tag("lema_pause_keeping_contents", tag,
                 [&](DeviceVmmResource& r) { r.pause(tag, true); });
}

LEMA_EXPORT int lema_resume(const char* tag) {
  return for_tag("lema_resume", tag, [&](DeviceVmmResource& r) { r.resume(tag); });
}

LEMA_EXPORT int lema_usage(int device, unsigned long long out[4]) {
  clear_error();
  DeviceVmmResource* r = find(device);
  if (r == nullptr || out == nullptr) return -1;
  try {
    const auto u = r->usage();
    out[0] = u.mapped_bytes;
    out[1] = u.pending_bytes;
    out[2] = u.paused_bytes;
    out[3] = u.budget_bytes;
    return 0;
  } catch (const std::exception& e) {
    report("lema_usage", e.what());
  }
  return -1;
}

LEMA_EXPORT const char* lema_last_error(void) {
  return t_last_error;
}

}  // extern "C"
