// The interposed CUDA runtime entry points (exports.map lists them) and the library's load and
// unload. See docs/USER_GUIDE.md ("LD_PRELOAD hook") for what a user sets, and the notes in
// settings.hpp, pointer_table.hpp, event_ring.hpp and profile_summary.hpp for the decisions. Every
// entry point records its call (noted()) on each of its returns.
//
// Note [Routing]: an allocation of at least the threshold, while the hook is active (mode
// managed, settings read, table mapped, budget plausible), is made with the real
// cudaMallocManaged, counted against the budget and entered in the pointer table, and advised
// to prefer the current device; anything else goes to the real function it was meant for. A
// free looks its pointer up in the table first: a managed allocation of the hook is released with
// the real cudaFree (also for cudaFreeAsync: managed memory is not stream-ordered, and cudaFree
// waits for the device), anything else goes to the real function unchanged. The table is
// consulted on frees even after the hook turned itself off, so nothing it gave out is freed
// through the wrong call. The program's own cudaMallocManaged calls of at least the threshold
// count against the budget too (they take device memory like the hook's own).
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "cudart_abi.hpp"
#include "event_ring.hpp"
#include "pointer_table.hpp"
#include "profile_summary.hpp"
#include "real_cudart.hpp"
#include "report.hpp"
#include "settings.hpp"

namespace lema::preload {
namespace {

Settings g_settings;
PointerTable g_table;
EventRing g_events;                      // Note [Preload event ring]; on with LEMA_PRELOAD_PROFILE
std::atomic<bool> g_active{false};       // new large allocations go to managed memory
std::atomic<std::uint64_t> g_budget{0};  // 0: none
std::atomic<int> g_budget_checked{0};    // 0: not yet, 1: being checked, 2: done
std::atomic<std::uint64_t> g_passed_through{0};
std::uint64_t g_start_ns = 0;
pid_t g_pid = 0;  // the process that loaded the hook: a forked child exiting writes no profile

std::uintptr_t addr(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p);
}

// Records the call in the event ring and returns its result.
cuda_error noted(Call call, Route route, std::uint64_t bytes, const void* address, cuda_error rc,
                 std::uint8_t flags = 0) {
  g_events.record(call, route, bytes, address, rc, flags);
  return rc;
}
// What an allocation gave out, for its record.
const void* given(void* const* ptr, cuda_error rc) {
  return rc == kCudaSuccess && ptr ? *ptr : nullptr;
}

cuda_error no_runtime(const char* call) {
  static std::atomic<bool> reported{false};
  if (!reported.exchange(true)) {
    Line line;
    line.add(call)
        .add(": no CUDA runtime in this process (dlsym(RTLD_NEXT) found no ")
        .add(call)
        .add("); returning cudaErrorInitializationError (link or load libcudart)");
    report(Level::warn, line);
  }
  return kCudaErrorInitializationError;
}

// Note [Budget above the device]: a budget is the device memory a program may fill through the
// hook; one above what the device has (cudaMemGetInfo's total, asked once, at the first call
// that needs the budget) is a setting that cannot be meant, and is treated as any bad setting
// (Note [Bad settings pass through]): one line, and the hook stops routing.
void check_budget_once() {
  if (g_budget_checked.load(std::memory_order_acquire) == 2) return;
  int expected = 0;
  if (!g_budget_checked.compare_exchange_strong(expected, 1)) return;
  const std::uint64_t budget = g_budget.load(std::memory_order_relaxed);
  auto get_info = real::mem_get_info_fn();
  std::size_t free_bytes = 0, total = 0;
  if (budget && get_info && get_info(&free_bytes, &total) == kCudaSuccess && total > 0 &&
      budget > total) {
    Line line;
    line.add("LEMA_BUDGET=")
        .size(budget)
        .add(" is more than the device's ")
        .size(total)
        .add(" (cudaMemGetInfo); the hook passes every call through (set LEMA_BUDGET to at most ")
        .size(total)
        .add(")");
    report(Level::warn, line);
    g_active.store(false, std::memory_order_release);
    g_budget.store(0, std::memory_order_relaxed);
  }
  g_budget_checked.store(2, std::memory_order_release);
}

bool routes(std::size_t size) {
  // A zero-byte request stays the runtime's: the table cannot hold the null pointer it may get.
  if (!g_active.load(std::memory_order_acquire) || size < g_settings.threshold || size == 0)
    return false;
  check_budget_once();
  return g_active.load(std::memory_order_acquire);
}

void report_table_full() {
  static std::atomic<bool> reported{false};
  if (reported.exchange(true)) return;
  Line line;
  line.add("the pointer table is full (")
      .dec(g_settings.table_entries / 4 * 3)
      .add(
          " allocations live); further large allocations pass through to the CUDA runtime "
          "(raise LEMA_PRELOAD_TABLE)");
  report(Level::warn, line);
}

void debug_call(const char* call, std::size_t size, const void* ptr, const char* where,
                cuda_error rc) {
  if (!reporting(Level::debug)) return;
  Line line;
  line.add(call)
      .add("(")
      .size(size)
      .add(") = ")
      .dec(static_cast<std::uint64_t>(rc))
      .add(", ")
      .hex(addr(ptr))
      .add(" ")
      .add(where);
  report(Level::debug, line);
}

// Note [Routing]. `fallback` makes the allocation the program asked for, untouched.
template <typename Fallback>
cuda_error managed_alloc(Call kind, const char* call, void** ptr, std::size_t size, unsigned flags,
                         bool advise, Fallback fallback) {
  auto passed = [&] {
    const cuda_error rc = fallback();
    return noted(kind, Route::passthrough, size, given(ptr, rc), rc);
  };
  auto managed = real::malloc_managed_fn();
  if (!managed) {
    g_passed_through.fetch_add(1, std::memory_order_relaxed);
    return passed();
  }
  switch (g_table.reserve(size, g_budget.load(std::memory_order_relaxed))) {
    case PointerTable::Reserve::ok:
      break;
    case PointerTable::Reserve::over_budget:
      if (reporting(Level::info)) {
        Line line;
        line.add(call)
            .add("(")
            .size(size)
            .add("): over the budget of ")
            .size(g_budget.load(std::memory_order_relaxed))
            .add(" (")
            .size(g_table.in_use())
            .add(" in use); cudaErrorMemoryAllocation");
        report(Level::info, line);
      }
      return noted(kind, Route::refused, size, nullptr, kCudaErrorMemoryAllocation);
    case PointerTable::Reserve::full:
      report_table_full();
      g_passed_through.fetch_add(1, std::memory_order_relaxed);
      return passed();
  }
  void* p = nullptr;
  const cuda_error rc = managed(&p, size, flags);
  if (rc != kCudaSuccess || p == nullptr) {
    g_table.cancel(size);
    if (rc == kCudaSuccess) *ptr = p;
    debug_call(call, size, nullptr, "managed (failed)", rc);
    return noted(kind, Route::managed, size, given(ptr, rc), rc);
  }
  g_table.insert(addr(p), size);
  if (advise && g_settings.advise) real::prefer_device(p, size);
  *ptr = p;
  debug_call(call, size, p, "managed", rc);
  return noted(kind, Route::managed, size, p, kCudaSuccess);
}

// A free the table did not know that the runtime refused: a double free of the hook's memory,
// or a pointer nobody gave out. Reported while the hook routes (a pass-through hook adds
// nothing to what the runtime says).
// Returns the record's flags.
std::uint8_t report_bad_free(const char* call, const void* ptr, cuda_error rc) {
  if (!g_table.ready()) return kFlagBadFree;
  const bool twice = g_table.recently_freed(addr(ptr));
  Line line;
  line.add(call).add("(").hex(addr(ptr)).add("): ");
  if (twice)
    line.add("double free of managed memory the hook gave out");
  else
    line.add("not memory of this process");
  line.add(" (the CUDA runtime returned error ").dec(static_cast<std::uint64_t>(rc)).add(")");
  report(Level::warn, line);
  return twice ? kFlagBadFree | kFlagDoubleFree : kFlagBadFree;
}

void before_fork() {
  if (g_table.ready()) g_table.lock();
}
void after_fork_parent() {
  if (g_table.ready()) g_table.unlock();
}
void after_fork_child() {
  if (g_table.ready()) g_table.reset_after_fork();
}

__attribute__((constructor)) void load() {
  g_start_ns = monotonic_ns();
  g_pid = ::getpid();
  g_settings = read_settings();
  if (g_settings.managed && !g_table.init(g_settings.table_entries)) {
    Line line;
    line.add("cannot map the pointer table (")
        .dec(g_settings.table_entries)
        .add(" entries: ")
        .add(std::strerror(errno))
        .add("); the hook passes every call through (lower LEMA_PRELOAD_TABLE)");
    report(Level::warn, line);
    g_settings.managed = false;
  }
  if (g_settings.profile_path[0] && !g_events.init(g_settings.events)) {
    Line line;
    line.add("cannot map the event ring (")
        .dec(g_settings.events)
        .add(" events: ")
        .add(std::strerror(errno))
        .add("); the profile holds no per-call events (lower LEMA_PRELOAD_EVENTS)");
    report(Level::warn, line);
  }
  pthread_atfork(before_fork, after_fork_parent, after_fork_child);
  g_budget.store(g_settings.managed ? g_settings.budget : 0, std::memory_order_relaxed);
  g_active.store(g_settings.managed, std::memory_order_release);
  if (reporting(Level::debug)) {
    Line line;
    line.add("loaded: mode ")
        .add(g_settings.managed ? "managed" : "passthrough")
        .add(", threshold ")
        .size(g_settings.threshold)
        .add(", budget ");
    if (g_settings.budget)
      line.size(g_settings.budget);
    else
      line.add("none");
    report(Level::debug, line);
  }
}

__attribute__((destructor)) void unload() {
  const TableCounters c = g_table.ready() ? g_table.counters() : TableCounters{};
  const std::uint64_t passed = g_passed_through.load(std::memory_order_relaxed);
  if (reporting(Level::info)) {
    Line line;
    line.add("exit: ")
        .dec(c.managed_allocs)
        .add(" allocations in managed memory (")
        .size(c.managed_bytes)
        .add(", peak in use ")
        .size(c.peak)
        .add("), ")
        .dec(c.refused)
        .add(" over budget, ")
        .dec(passed)
        .add(" passed through");
    report(Level::info, line);
  }
  if (g_settings.profile_path[0] && ::getpid() == g_pid) {
    ProfileSummary s;
    s.path = g_settings.profile_path;
    s.managed = g_active.load(std::memory_order_relaxed);
    s.threshold = g_settings.threshold;
    s.budget = g_budget.load(std::memory_order_relaxed);
    s.passed_through = passed;
    s.start_ns = g_start_ns;
    s.end_ns = monotonic_ns();
    s.counters = c;
    s.events = &g_events;
    if (!write_profile_summary(s)) {
      Line line;
      line.add("LEMA_PRELOAD_PROFILE='")
          .add(g_settings.profile_path)
          .add("' cannot be written (")
          .add(std::strerror(errno))
          .add(")");
      report(Level::warn, line);
    }
  }
}

}  // namespace
}  // namespace lema::preload

using namespace lema::preload;

#define LEMA_PRELOAD_EXPORT extern "C" __attribute__((visibility("default")))

LEMA_PRELOAD_EXPORT cuda_error cudaMalloc(void** ptr, std::size_t size) {
  auto real_malloc = real::malloc_fn();
  if (!real_malloc)
    return noted(Call::malloc, Route::passthrough, size, nullptr, no_runtime("cudaMalloc"));
  if (!ptr || !routes(size)) {
    g_passed_through.fetch_add(1, std::memory_order_relaxed);
    const cuda_error rc = real_malloc(ptr, size);
    return noted(Call::malloc, Route::passthrough, size, given(ptr, rc), rc);
  }
  return managed_alloc(Call::malloc, "cudaMalloc", ptr, size, kCudaMemAttachGlobal, true,
                       [&] { return real_malloc(ptr, size); });
}

LEMA_PRELOAD_EXPORT cuda_error cudaMallocAsync(void** ptr, std::size_t size, cuda_stream stream) {
  auto real_malloc = real::malloc_async_fn();
  if (!real_malloc)
    return noted(Call::malloc_async, Route::passthrough, size, nullptr,
                 no_runtime("cudaMallocAsync"));
  if (!ptr || !routes(size)) {
    g_passed_through.fetch_add(1, std::memory_order_relaxed);
    const cuda_error rc = real_malloc(ptr, size, stream);
    return noted(Call::malloc_async, Route::passthrough, size, given(ptr, rc), rc);
  }
  return managed_alloc(Call::malloc_async, "cudaMallocAsync", ptr, size, kCudaMemAttachGlobal, true,
                       [&] { return real_malloc(ptr, size, stream); });
}

LEMA_PRELOAD_EXPORT cuda_error cudaMallocManaged(void** ptr, std::size_t size, unsigned flags) {
  auto real_managed = real::malloc_managed_fn();
  if (!real_managed)
    return noted(Call::malloc_managed, Route::passthrough, size, nullptr,
                 no_runtime("cudaMallocManaged"));
  if (!ptr || !routes(size)) {
    const cuda_error rc = real_managed(ptr, size, flags);
    return noted(Call::malloc_managed, Route::passthrough, size, given(ptr, rc), rc);
  }
  return managed_alloc(Call::malloc_managed, "cudaMallocManaged", ptr, size, flags, false,
                       [&] { return real_managed(ptr, size, flags); });
}

LEMA_PRELOAD_EXPORT cuda_error cudaFree(void* ptr) {
  auto real_free = real::free_fn();
  if (!real_free) return noted(Call::free, Route::passthrough, 0, ptr, no_runtime("cudaFree"));
  std::uint64_t bytes = 0;
  if (!ptr || !g_table.ready()) {
    const cuda_error rc = real_free(ptr);
    return noted(Call::free, Route::passthrough, 0, ptr, rc,
                 rc != kCudaSuccess && ptr ? kFlagBadFree : 0);
  }
  if (g_table.remove(addr(ptr), &bytes)) {
    const cuda_error rc = real_free(ptr);
    debug_call("cudaFree", bytes, ptr, "managed", rc);
    return noted(Call::free, Route::managed, bytes, ptr, rc);
  }
  const cuda_error rc = real_free(ptr);
  const std::uint8_t flags = rc != kCudaSuccess ? report_bad_free("cudaFree", ptr, rc) : 0;
  return noted(Call::free, Route::passthrough, 0, ptr, rc, flags);
}

LEMA_PRELOAD_EXPORT cuda_error cudaFreeAsync(void* ptr, cuda_stream stream) {
  auto real_free = real::free_async_fn();
  if (!real_free)
    return noted(Call::free_async, Route::passthrough, 0, ptr, no_runtime("cudaFreeAsync"));
  std::uint64_t bytes = 0;
  if (!ptr || !g_table.ready()) {
    const cuda_error rc = real_free(ptr, stream);
    return noted(Call::free_async, Route::passthrough, 0, ptr, rc,
                 rc != kCudaSuccess && ptr ? kFlagBadFree : 0);
  }
  if (g_table.remove(addr(ptr), &bytes)) {
    auto sync_free = real::free_fn();  // Note [Routing]: managed memory is not stream-ordered
    const cuda_error rc = sync_free ? sync_free(ptr) : no_runtime("cudaFree");
    debug_call("cudaFreeAsync", bytes, ptr, "managed", rc);
    return noted(Call::free_async, Route::managed, bytes, ptr, rc);
  }
  const cuda_error rc = real_free(ptr, stream);
  const std::uint8_t flags = rc != kCudaSuccess ? report_bad_free("cudaFreeAsync", ptr, rc) : 0;
  return noted(Call::free_async, Route::passthrough, 0, ptr, rc, flags);
}

LEMA_PRELOAD_EXPORT cuda_error cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total) {
  auto real_info = real::mem_get_info_fn();
  if (!real_info)
    return noted(Call::mem_get_info, Route::passthrough, 0, nullptr, no_runtime("cudaMemGetInfo"));
  if (g_active.load(std::memory_order_acquire) && g_budget.load(std::memory_order_relaxed)) {
    check_budget_once();
    const std::uint64_t budget = g_budget.load(std::memory_order_relaxed);
    if (budget && g_active.load(std::memory_order_acquire)) {
      if (!free_bytes || !total)
        return noted(Call::mem_get_info, Route::budget, 0, nullptr, kCudaErrorInvalidValue);
      const std::uint64_t used = g_table.in_use();
      *free_bytes = used < budget ? budget - used : 0;
      *total = budget;
      return noted(Call::mem_get_info, Route::budget, *free_bytes, nullptr, kCudaSuccess);
    }
  }
  const cuda_error rc = real_info(free_bytes, total);
  return noted(Call::mem_get_info, Route::passthrough,
               rc == kCudaSuccess && free_bytes ? *free_bytes : 0, nullptr, rc);
}
