// The test side of the fake CUPTI (libfake_cupti.so): its control and inspection entry points,
// looked up with dlsym in the library the runtime loaded, so tests and the runtime's collector
// see the same CUPTI state.
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lema::test {

class FakeCuptiControl {
 public:
  /// Opens the fake named by `library` (the path LEMA_CUPTI_LIBRARY gives the runtime).
  explicit FakeCuptiControl(const std::string& library) {
    handle_ = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) throw std::runtime_error("cannot open the fake CUPTI " + library);
    bind(configure_, "fake_cupti_configure");
    bind(emit_gpu_faults_, "fake_cupti_emit_gpu_faults");
    bind(emit_cpu_fault_, "fake_cupti_emit_cpu_fault");
    bind(emit_migration_, "fake_cupti_emit_migration");
    bind(misuse_count_, "fake_cupti_misuse_count");
    bind(last_misuse_, "fake_cupti_last_misuse");
    bind(enabled_, "fake_cupti_enabled");
    bind(counter_configured_, "fake_cupti_counter_configured");
    bind(count_, "fake_cupti_count");
  }
  FakeCuptiControl(const FakeCuptiControl&) = delete;
  FakeCuptiControl& operator=(const FakeCuptiControl&) = delete;
  ~FakeCuptiControl() { ::dlclose(handle_); }

  /// Settings: "refuse" (1: configure and enable fail with CUPTI_ERROR_NOT_SUPPORTED),
  /// "refuse_cpu_faults", "period_us" (the worker's delivery period; 0: on flush only),
  /// "duration_ns" (of each record), "strict" (abort on misuse). Returns the previous value.
  long long configure(const char* key, long long value) { return configure_(key, value); }

  /// Each returns whether CUPTI collected the record (the unified-memory kind enabled and the
  /// counter configured); it is delivered by the worker or the next flush.
  bool emit_gpu_faults(const void* address, std::uint64_t count) {
    return emit_gpu_faults_(reinterpret_cast<std::uintptr_t>(address), count) != 0;
  }
  bool emit_cpu_fault(const void* address) {
    return emit_cpu_fault_(reinterpret_cast<std::uintptr_t>(address)) != 0;
  }
  bool emit_migration(bool to_device, const void* address, std::uint64_t bytes) {
    return emit_migration_(to_device ? 1 : 0, reinterpret_cast<std::uintptr_t>(address), bytes) !=
           0;
  }

  std::uint64_t misuse_count() { return misuse_count_(); }
  std::string last_misuse() {
    char buf[512] = {};
    last_misuse_(buf, sizeof buf);
    return buf;
  }
  /// Whether CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER is enabled now.
  bool enabled() { return enabled_() != 0; }
  /// Whether a CUpti_ActivityUnifiedMemoryCounterKind is configured on.
  bool counter_configured(int counter_kind) { return counter_configured_(counter_kind) != 0; }
  /// "emitted", "not_collected", "delivered", "pending", "held" (buffers CUPTI holds),
  /// "buffers", "enables", "disables", "flushes".
  std::uint64_t count(const char* what) { return count_(what); }

 private:
  template <typename Fn>
  void bind(Fn& fn, const char* name) {
    fn = reinterpret_cast<Fn>(::dlsym(handle_, name));
    if (fn == nullptr) throw std::runtime_error(std::string("the fake CUPTI lacks ") + name);
  }
  void* handle_ = nullptr;
  long long (*configure_)(const char*, long long) = nullptr;
  int (*emit_gpu_faults_)(unsigned long long, unsigned long long) = nullptr;
  int (*emit_cpu_fault_)(unsigned long long) = nullptr;
  int (*emit_migration_)(int, unsigned long long, unsigned long long) = nullptr;
  unsigned long long (*misuse_count_)() = nullptr;
  void (*last_misuse_)(char*, std::size_t) = nullptr;
  int (*enabled_)() = nullptr;
  int (*counter_configured_)(int) = nullptr;
  unsigned long long (*count_)(const char*) = nullptr;
};

}  // namespace lema::test
