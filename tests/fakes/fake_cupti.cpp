// A fake CUPTI (libfake_cupti.so), loaded by the runtime through LEMA_CUPTI_LIBRARY so that the
// unified-memory counters can be tested without a GPU. It exports, with the signatures of CUDA
// 13's <cupti.h>, the activity entry points the runtime uses, and plays CUPTI's part of the
// buffer protocol:
//  - records are produced only by a test (fake_cupti_emit_*, see fake_cupti_control.hpp) and
//    only while CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER is enabled and that counter kind
//    configured on, as CUPTI would; others are not collected (the emit call returns 0);
//  - a worker thread, as CUPTI's own, asks the client for a buffer (the buffer-requested
//    callback), writes pending records into it as CUpti_ActivityUnifiedMemoryCounter3 and hands
//    it back (the buffer-completed callback) every `period_us`; cuptiActivityFlushAll does the
//    same on the calling thread and returns once every record emitted before it was delivered;
//  - timestamps are CLOCK_REALTIME nanoseconds, another clock than the runtime's, so the
//    conversion is exercised.
//
// Misuse is counted, remembered (fake_cupti_last_misuse) and printed; with
// LEMA_FAKE_CUPTI_STRICT=1 (or configure("strict", 1)) it aborts. Detected: enabling the
// unified-memory kind twice, or before any counter was configured, or before callbacks were
// registered; disabling a kind not enabled; configuring while enabled; flushing before callbacks
// were registered; a null, misaligned or too small buffer from the client; parsing
// (cuptiActivityGetNextRecord) a buffer CUPTI did not hand back, or beyond its valid bytes.
// A kind left enabled or buffers still held at exit are printed by a destructor.
//
// Settings (environment at load, or fake_cupti_configure): LEMA_FAKE_CUPTI_REFUSE (1: configure
// and enable return CUPTI_ERROR_NOT_SUPPORTED), LEMA_FAKE_CUPTI_REFUSE_CPU_FAULTS (1: a
// configuration with CPU page faults on returns CUPTI_ERROR_UM_PROFILING_NOT_SUPPORTED),
// LEMA_FAKE_CUPTI_PERIOD_US (the worker's period, default 500; 0: deliver on flush only),
// LEMA_FAKE_CUPTI_STRICT.
//
// Thread safety: one mutex guards all state; the client's callbacks are called without it.
#include <cupti.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using Record = CUpti_ActivityUnifiedMemoryCounter3;
constexpr int kCounterKinds = CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_COUNT;

long long env_number(const char* name, long long fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoll(v) : fallback;
}

std::uint64_t realtime_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

struct Cupti {
  std::mutex mu;
  std::condition_variable cv;

  long long refuse = env_number("LEMA_FAKE_CUPTI_REFUSE", 0);
  long long refuse_cpu_faults = env_number("LEMA_FAKE_CUPTI_REFUSE_CPU_FAULTS", 0);
  long long period_us = env_number("LEMA_FAKE_CUPTI_PERIOD_US", 500);
  long long strict = env_number("LEMA_FAKE_CUPTI_STRICT", 0);
  long long duration_ns = 1500;  // of every record

  CUpti_BuffersCallbackRequestFunc request = nullptr;
  CUpti_BuffersCallbackCompleteFunc complete = nullptr;
  bool enabled = false;  // CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER
  bool configured[kCounterKinds] = {};

  std::deque<Record> pending;                     // emitted, not yet in a buffer
  int delivering = 0;                             // deliveries running without the lock
  std::set<std::uint8_t*> held;                   // buffers CUPTI holds (requested, not completed)
  std::map<std::uint8_t*, std::size_t> returned;  // buffers handed back: valid bytes

  std::uint64_t emitted = 0, not_collected = 0, delivered = 0, buffers = 0;
  std::uint64_t enables = 0, disables = 0, flushes = 0;
  std::uint64_t misuses = 0;
  std::string last_misuse;

  bool worker_started = false;
};

// Never destroyed: the detached worker may still run while the process exits.
Cupti& cupti() {
  static Cupti* c = new Cupti();
  return *c;
}

// What was left at exit, printed (never fatal: the process is exiting anyway).
struct ExitReport {
  ~ExitReport() {
    Cupti& c = cupti();
    std::lock_guard lk(c.mu);
    if (c.enabled)
      std::fprintf(stderr, "fake CUPTI: at exit the unified-memory kind is still enabled\n");
    if (!c.held.empty())
      std::fprintf(stderr, "fake CUPTI: at exit %zu buffer(s) were never handed back\n",
                   c.held.size());
  }
} exit_report;

using Lock = std::unique_lock<std::mutex>;

void misuse(Cupti& c, const std::string& what) {
  ++c.misuses;
  c.last_misuse = what;
  std::fprintf(stderr, "fake CUPTI: misuse: %s\n", what.c_str());
  if (c.strict != 0) {
    std::fprintf(stderr, "fake CUPTI: aborting (strict mode)\n");
    std::abort();
  }
}

// Moves every pending record into client buffers and hands them back. Called with the lock held;
// releases it around the client's callbacks.
void deliver(Cupti& c, Lock& lk) {
  while (!c.pending.empty() && c.request != nullptr) {
    ++c.delivering;
    const auto request = c.request;
    const auto complete = c.complete;
    lk.unlock();
    std::uint8_t* buffer = nullptr;
    std::size_t size = 0, max_records = 0;
    request(&buffer, &size, &max_records);
    lk.lock();
    if (buffer == nullptr || reinterpret_cast<std::uintptr_t>(buffer) % 8 != 0 ||
        size < sizeof(Record)) {
      misuse(c,
             "the buffer-requested callback gave a buffer that is null, not 8-byte aligned "
             "or smaller than one record");
      c.not_collected += c.pending.size();
      c.pending.clear();
      --c.delivering;
      c.cv.notify_all();
      return;
    }
    c.held.insert(buffer);
    c.returned.erase(buffer);  // the client gave it back to us: no longer parsable
    ++c.buffers;
    std::size_t fit = size / sizeof(Record);
    if (max_records != 0 && max_records < fit) fit = max_records;
    std::size_t n = 0;
    for (; n < fit && !c.pending.empty(); ++n) {
      std::memcpy(buffer + n * sizeof(Record), &c.pending.front(), sizeof(Record));
      c.pending.pop_front();
    }
    c.delivered += n;
    c.held.erase(buffer);
    c.returned[buffer] = n * sizeof(Record);
    lk.unlock();
    complete(nullptr, 0, buffer, size, n * sizeof(Record));
    lk.lock();
    --c.delivering;
    c.cv.notify_all();
  }
}

void run_worker() {
  Cupti& c = cupti();
  Lock lk(c.mu);
  for (;;) {
    const long long period = c.period_us;
    if (period <= 0) {
      c.cv.wait(lk);
      continue;
    }
    c.cv.wait_for(lk, std::chrono::microseconds(period));
    if (c.period_us > 0) deliver(c, lk);
  }
}

// Produces a record as the device would: only for a configured counter of the enabled kind.
int emit(Record r) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  if (!c.enabled || r.counterKind < 0 || r.counterKind >= kCounterKinds ||
      !c.configured[r.counterKind]) {
    ++c.not_collected;
    return 0;
  }
  r.kind = CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER;
  r.start = realtime_ns();
  r.end = r.start + static_cast<std::uint64_t>(c.duration_ns);
  r.processId = static_cast<std::uint32_t>(::getpid());
  c.pending.push_back(r);
  ++c.emitted;
  c.cv.notify_all();
  return 1;
}

}  // namespace

// ---- the CUPTI entry points ----

FAKE_EXPORT CUptiResult cuptiGetResultString(CUptiResult result, const char** str) {
  if (str == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  switch (result) {
    case CUPTI_SUCCESS:
      *str = "CUPTI_SUCCESS";
      break;
    case CUPTI_ERROR_INVALID_PARAMETER:
      *str = "CUPTI_ERROR_INVALID_PARAMETER";
      break;
    case CUPTI_ERROR_INVALID_OPERATION:
      *str = "CUPTI_ERROR_INVALID_OPERATION";
      break;
    case CUPTI_ERROR_MAX_LIMIT_REACHED:
      *str = "CUPTI_ERROR_MAX_LIMIT_REACHED";
      break;
    case CUPTI_ERROR_INVALID_KIND:
      *str = "CUPTI_ERROR_INVALID_KIND";
      break;
    case CUPTI_ERROR_NOT_SUPPORTED:
      *str = "CUPTI_ERROR_NOT_SUPPORTED";
      break;
    case CUPTI_ERROR_UM_PROFILING_NOT_SUPPORTED:
      *str = "CUPTI_ERROR_UM_PROFILING_NOT_SUPPORTED";
      break;
    default:
      *str = "CUPTI_ERROR_UNKNOWN";
      return CUPTI_ERROR_INVALID_PARAMETER;
  }
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiGetTimestamp(uint64_t* timestamp) {
  if (timestamp == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  *timestamp = realtime_ns();
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiActivityRegisterCallbacks(
    CUpti_BuffersCallbackRequestFunc requested, CUpti_BuffersCallbackCompleteFunc completed) {
  if (requested == nullptr || completed == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  Cupti& c = cupti();
  Lock lk(c.mu);
  c.request = requested;
  c.complete = completed;
  if (!c.worker_started) {
    c.worker_started = true;
    std::thread(run_worker).detach();
  }
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiActivityConfigureUnifiedMemoryCounter(
    CUpti_ActivityUnifiedMemoryCounterConfig* config, uint32_t count) {
  if (config == nullptr || count == 0) return CUPTI_ERROR_INVALID_PARAMETER;
  Cupti& c = cupti();
  Lock lk(c.mu);
  if (c.enabled) {
    misuse(c,
           "cuptiActivityConfigureUnifiedMemoryCounter while the unified-memory kind is "
           "enabled (configure before cuptiActivityEnable)");
    return CUPTI_ERROR_INVALID_OPERATION;
  }
  if (c.refuse != 0) return CUPTI_ERROR_NOT_SUPPORTED;
  bool next[kCounterKinds] = {};
  for (uint32_t i = 0; i < count; ++i) {
    const CUpti_ActivityUnifiedMemoryCounterConfig& k = config[i];
    if (k.kind <= CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_UNKNOWN || k.kind >= kCounterKinds ||
        k.scope >= CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_SCOPE_COUNT)
      return CUPTI_ERROR_INVALID_PARAMETER;
    if (k.kind == CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_CPU_PAGE_FAULT_COUNT &&
        k.enable != 0 && c.refuse_cpu_faults != 0)
      return CUPTI_ERROR_UM_PROFILING_NOT_SUPPORTED;
    next[k.kind] = k.enable != 0;
  }
  std::memcpy(c.configured, next, sizeof next);
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiActivityEnable(CUpti_ActivityKind kind) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  if (kind != CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER) return CUPTI_ERROR_NOT_SUPPORTED;
  if (c.refuse != 0) return CUPTI_ERROR_NOT_SUPPORTED;
  if (c.request == nullptr) {
    misuse(c, "cuptiActivityEnable before cuptiActivityRegisterCallbacks");
    return CUPTI_ERROR_INVALID_OPERATION;
  }
  bool any = false;
  for (bool on : c.configured) any = any || on;
  if (!any) {
    misuse(c, "cuptiActivityEnable of the unified-memory kind with no counter configured");
    return CUPTI_ERROR_INVALID_OPERATION;
  }
  if (c.enabled) {
    misuse(c, "cuptiActivityEnable of the unified-memory kind, already enabled (unbalanced)");
    return CUPTI_SUCCESS;
  }
  c.enabled = true;
  ++c.enables;
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiActivityDisable(CUpti_ActivityKind kind) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  if (kind != CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER || !c.enabled) {
    misuse(c, "cuptiActivityDisable of a kind that is not enabled (unbalanced)");
    return CUPTI_ERROR_INVALID_KIND;
  }
  c.enabled = false;
  ++c.disables;
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiActivityFlushAll(uint32_t) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  if (c.request == nullptr) {
    misuse(c, "cuptiActivityFlushAll before cuptiActivityRegisterCallbacks");
    return CUPTI_ERROR_INVALID_OPERATION;
  }
  ++c.flushes;
  deliver(c, lk);
  // Records the worker took before this call are delivered too before it returns.
  c.cv.wait(lk, [&] { return c.delivering == 0; });
  return CUPTI_SUCCESS;
}

FAKE_EXPORT CUptiResult cuptiActivityGetNextRecord(uint8_t* buffer, size_t valid,
                                                   CUpti_Activity** record) {
  if (buffer == nullptr || record == nullptr) return CUPTI_ERROR_INVALID_PARAMETER;
  Cupti& c = cupti();
  Lock lk(c.mu);
  auto it = c.returned.find(buffer);
  if (it == c.returned.end()) {
    misuse(c, c.held.count(buffer) != 0
                  ? "cuptiActivityGetNextRecord on a buffer CUPTI still holds"
                  : "cuptiActivityGetNextRecord on a buffer CUPTI never handed back");
    return CUPTI_ERROR_INVALID_PARAMETER;
  }
  if (valid > it->second) {
    misuse(c, "cuptiActivityGetNextRecord with more valid bytes than the completed buffer has");
    return CUPTI_ERROR_INVALID_PARAMETER;
  }
  std::uint8_t* next =
      *record == nullptr ? buffer : reinterpret_cast<std::uint8_t*>(*record) + sizeof(Record);
  if (next < buffer || next + sizeof(Record) > buffer + valid) return CUPTI_ERROR_MAX_LIMIT_REACHED;
  *record = reinterpret_cast<CUpti_Activity*>(next);
  return CUPTI_SUCCESS;
}

// ---- control and inspection for tests (fake_cupti_control.hpp) ----

FAKE_EXPORT long long fake_cupti_configure(const char* key, long long value) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  const std::string k = key;
  long long* slot = nullptr;
  if (k == "refuse") slot = &c.refuse;
  if (k == "refuse_cpu_faults") slot = &c.refuse_cpu_faults;
  if (k == "period_us") slot = &c.period_us;
  if (k == "strict") slot = &c.strict;
  if (k == "duration_ns") slot = &c.duration_ns;
  if (slot == nullptr) return -1;
  const long long old = *slot;
  *slot = value;
  c.cv.notify_all();
  return old;
}

FAKE_EXPORT int fake_cupti_emit_gpu_faults(unsigned long long address, unsigned long long count) {
  Record r{};
  r.counterKind = CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_GPU_PAGE_FAULT;
  r.address = address;
  r.value = count;
  r.srcId = 0;
  r.flags = CUPTI_ACTIVITY_UNIFIED_MEMORY_ACCESS_TYPE_READ;
  return emit(r);
}

FAKE_EXPORT int fake_cupti_emit_cpu_fault(unsigned long long address) {
  Record r{};
  r.counterKind = CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_CPU_PAGE_FAULT_COUNT;
  r.address = address;
  r.value = 0x401000;  // the faulting instruction's address
  return emit(r);
}

FAKE_EXPORT int fake_cupti_emit_migration(int to_device, unsigned long long address,
                                          unsigned long long bytes) {
  Record r{};
  r.counterKind = to_device != 0 ? CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_BYTES_TRANSFER_HTOD
                                 : CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_BYTES_TRANSFER_DTOH;
  r.address = address;
  r.value = bytes;
  r.srcId = to_device != 0 ? CUPTI_UNIFIED_MEMORY_CPU_DEVICE_ID : 0;
  r.dstId = to_device != 0 ? 0 : CUPTI_UNIFIED_MEMORY_CPU_DEVICE_ID;
  r.flags = CUPTI_ACTIVITY_UNIFIED_MEMORY_MIGRATION_CAUSE_COHERENCE;
  return emit(r);
}

FAKE_EXPORT unsigned long long fake_cupti_misuse_count() {
  Cupti& c = cupti();
  Lock lk(c.mu);
  return c.misuses;
}

FAKE_EXPORT void fake_cupti_last_misuse(char* buf, std::size_t len) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  std::snprintf(buf, len, "%s", c.last_misuse.c_str());
}

/// 1 while the unified-memory kind is enabled.
FAKE_EXPORT int fake_cupti_enabled() {
  Cupti& c = cupti();
  Lock lk(c.mu);
  return c.enabled ? 1 : 0;
}

/// Whether `counter_kind` (CUpti_ActivityUnifiedMemoryCounterKind) is configured on.
FAKE_EXPORT int fake_cupti_counter_configured(int counter_kind) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  return counter_kind > 0 && counter_kind < kCounterKinds && c.configured[counter_kind] ? 1 : 0;
}

/// "emitted", "not_collected", "delivered", "pending", "held" (buffers CUPTI holds), "buffers"
/// (ever filled), "enables", "disables", "flushes"; ~0 for another name.
FAKE_EXPORT unsigned long long fake_cupti_count(const char* what) {
  Cupti& c = cupti();
  Lock lk(c.mu);
  const std::string w = what;
  if (w == "emitted") return c.emitted;
  if (w == "not_collected") return c.not_collected;
  if (w == "delivered") return c.delivered;
  if (w == "pending") return c.pending.size() + static_cast<unsigned long long>(c.delivering);
  if (w == "held") return c.held.size();
  if (w == "buffers") return c.buffers;
  if (w == "enables") return c.enables;
  if (w == "disables") return c.disables;
  if (w == "flushes") return c.flushes;
  return ~0ull;
}
