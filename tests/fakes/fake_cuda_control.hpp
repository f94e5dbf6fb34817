// The test side of the fake CUDA driver (libfake_cuda_driver.so): its control and inspection
// entry points, looked up with dlsym in the library the backends loaded, so tests and backends
// see the same driver state.
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lema::test {

/// Where a fake device address stands (fake_cuda_query_mapped).
enum class FakeMapping : int {
  outside = -1,    // in no reservation
  reserved = 0,    // reserved, nothing mapped (a touch would fault)
  no_access = 1,   // mapped, cuMemSetAccess not called yet
  read = 2,        // mapped read-only
  read_write = 3,  // mapped read-write
};

class FakeCudaControl {
 public:
  /// Opens the fake named by `library` (the path the backends load).
  explicit FakeCudaControl(const std::string& library) {
    handle_ = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) throw std::runtime_error("cannot open the fake driver " + library);
    bind(configure_, "fake_cuda_configure");
    bind(misuse_count_, "fake_cuda_misuse_count");
    bind(last_misuse_, "fake_cuda_last_misuse");
    bind(live_handles_, "fake_cuda_live_handles");
    bind(query_mapped_, "fake_cuda_query_mapped");
    bind(stream_hold_, "fake_cuda_stream_hold");
    bind(stream_touch_, "fake_cuda_stream_touch");
    bind(prefetches_, "fake_cuda_prefetches");
    bind(test_stream_, "fake_cuda_test_stream");
    bind(stream_sum_, "fake_cuda_stream_sum");
    bind(calls_, "fake_cuda_calls");
    bind(fail_, "fake_cuda_fail");
    bind(registered_copies_, "fake_cuda_registered_copies");
  }
  FakeCudaControl(const FakeCudaControl&) = delete;
  FakeCudaControl& operator=(const FakeCudaControl&) = delete;
  ~FakeCudaControl() { ::dlclose(handle_); }

  /// Settings: "vmm" (0/1), "devices", "memory" (bytes of device memory), "granularity",
  /// "strict" (abort on misuse), "managed" (0/1), "hold" (1: every stream, the backends' copy
  /// streams included, starts no further operation), "hold_backend" (1: the same for every
  /// stream but the tests' own). Returns the previous value.
  long long configure(const char* key, long long value) { return configure_(key, value); }
  std::uint64_t misuse_count() { return misuse_count_(); }
  std::string last_misuse() {
    char buf[512] = {};
    last_misuse_(buf, sizeof buf);
    return buf;
  }
  /// Live reservations, allocations, mappings, streams, events, pinned and managed buffers.
  std::uint64_t live_handles() { return live_handles_(); }
  FakeMapping query_mapped(const void* addr) { return FakeMapping(query_mapped_(addr)); }
  /// While held, the stream starts no further operation.
  void hold(void* stream, bool held) { stream_hold_(stream, held ? 1 : 0); }
  /// Enqueues on `stream` an operation that reads [addr, addr + bytes) as a kernel would.
  int touch(void* stream, const void* addr, std::size_t bytes) {
    return stream_touch_(stream, addr, bytes);
  }
  /// Enqueues on `stream` a kernel that reads [addr, addr + bytes) and writes a hash of the bytes
  /// (FNV-style, as hash_bytes below) into *out when it runs.
  int sum(void* stream, const void* addr, std::size_t bytes, std::uint64_t* out) {
    return stream_sum_(stream, addr, bytes, out);
  }
  static std::uint64_t hash_bytes(const void* addr, std::size_t bytes) {
    std::uint64_t sum = 0;
    const auto* p = static_cast<const unsigned char*>(addr);
    for (std::size_t i = 0; i < bytes; ++i) sum = sum * 1099511628211ull + p[i];
    return sum;
  }
  /// Calls so far of the driver entry point `entry` ("cuMemMap", "cuMemSetAccess", ...) through
  /// the table the backends loaded, by every backend in the process: compare before and after.
  std::uint64_t calls(const char* entry) { return calls_(entry); }
  /// Makes the `nth` next call of `entry` (1: the next one) return `result` (a CUresult) without
  /// doing anything; nth == 0 cancels a failure not reached yet.
  void fail(const char* entry, std::uint64_t nth, int result) { fail_(entry, nth, result); }
  /// Copies to the device issued so far straight from memory registered with cuMemHostRegister.
  std::uint64_t registered_copies() { return registered_copies_(); }
  /// Prefetches issued so far, to the device (to_device) or to the host.
  std::uint64_t prefetches(bool to_device) { return prefetches_(to_device ? 1 : 0); }
  /// A stream owned by the fake for tests that play the compute stream (create != 0), or
  /// destroys it (create == 0).
  void* test_stream(void* stream, int create) { return test_stream_(stream, create); }

 private:
  template <typename Fn>
  void bind(Fn& fn, const char* name) {
    fn = reinterpret_cast<Fn>(::dlsym(handle_, name));
    if (fn == nullptr) throw std::runtime_error(std::string("the fake driver lacks ") + name);
  }
  void* handle_ = nullptr;
  long long (*configure_)(const char*, long long) = nullptr;
  std::uint64_t (*misuse_count_)() = nullptr;
  void (*last_misuse_)(char*, std::size_t) = nullptr;
  std::uint64_t (*live_handles_)() = nullptr;
  int (*query_mapped_)(const void*) = nullptr;
  void (*stream_hold_)(void*, int) = nullptr;
  int (*stream_touch_)(void*, const void*, std::size_t) = nullptr;
  std::uint64_t (*prefetches_)(int) = nullptr;
  void* (*test_stream_)(void*, int) = nullptr;
  int (*stream_sum_)(void*, const void*, std::size_t, std::uint64_t*) = nullptr;
  std::uint64_t (*calls_)(const char*) = nullptr;
  void (*fail_)(const char*, std::uint64_t, int) = nullptr;
  std::uint64_t (*registered_copies_)() = nullptr;
};

}  // namespace lema::test
