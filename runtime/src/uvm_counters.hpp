// CUPTI's unified-memory counters, attributed to address ranges: what the CUDA driver did to
// unified memory behind the pager's back (GPU page faults, CPU page faults, migrations between
// host and device). Implemented in src/cuda/uvm_counters.cpp (CUDA builds only); this header
// names no CUPTI type.
//
// Note [UVM counters]: CUPTI's activity API is process-global (one pair of buffer callbacks, one
// configuration of the counters), so one collector per process serves every consumer, shared
// by reference count. The first subscription loads the library ($LEMA_CUPTI_LIBRARY, else
// libcupti.so.13, else libcupti.so, the latter two only over the system's driver; nothing
// links it), registers the buffer callbacks,
// configures the counters (bytes host to device, device to host, GPU page faults, and CPU page
// faults where the platform accepts them) and enables CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER;
// the last one to go flushes and disables it. CUPTI hands completed buffers back on its own
// thread, or on the thread that flushes; each record is given to the subscription whose range
// holds its address (a migration: each range it overlaps, clipped to it). Records in no range,
// or in a range whose consumer is not attached yet, are counted as outside, never dropped
// silently. Where CUPTI is missing or refuses (no library, CUPTI_ERROR_NOT_SUPPORTED, a
// device without the counters), subscribing fails with the reason and nothing else changes.
// LEMA_UVM_COUNTERS=0 turns the counters off: CUPTI's activity callbacks are one per process,
// and another profiler in the process (Nsight Systems, torch.profiler) needs them itself.
//
// Lock order: Collector::lifecycle (reference count, start and stop) → CUPTI's own locks →
// Collector::registry (shared while delivering records, exclusive to add, attach or remove a
// range) → nothing. Consumers are called under the registry lock (shared), so removing a range
// waits for a delivery in progress and a consumer is never called after its subscription is
// gone. Hence CUPTI is never called (flush!) with the registry lock held, and a consumer takes
// no lock: it may run while any thread of the program holds any lock and calls flush().
//
// Thread safety: every function and member may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace lema::runtime {

/// One record of CUPTI's unified-memory counters, clipped to the consumer's range.
struct UvmRecord {
  enum class Kind : std::uint8_t { gpu_fault, cpu_fault, to_device, to_host };
  Kind kind = Kind::gpu_fault;
  std::uint64_t address = 0;
  /// gpu_fault: the faults on the page served together (at least 1); cpu_fault: 1;
  /// to_device / to_host: the bytes moved inside the range.
  std::uint64_t value = 0;
  std::uint64_t start_ns = 0;  // steady clock (now_ns())
  std::uint64_t duration_ns = 0;
};

/// Receives the records of a range. Called on CUPTI's thread or on a thread in flush(), under
/// the collector's registry lock: must not block, take locks or call back into the collector.
class UvmConsumer {
 public:
  virtual ~UvmConsumer() = default;
  virtual void on_uvm_record(const UvmRecord& record) noexcept = 0;
};

/// A range registered with the process's collector. Destruction flushes CUPTI, removes the range
/// (its consumer is never called again) and stops CUPTI when it was the last subscription.
class UvmSubscription {
 public:
  virtual ~UvmSubscription() = default;
  /// Records of the range go to `consumer` from now on (it must outlive the subscription).
  virtual void attach(UvmConsumer& consumer) = 0;
  /// Asks CUPTI for every record it completed (cuptiActivityFlushAll); they have been handed to
  /// the consumers when this returns. Never throws; a failure is counted, not reported.
  virtual void flush() noexcept = 0;
};

/// Subscribes [base, base + bytes), unified memory of CUDA device `device`, to the counters.
/// nullptr with `reason` set when they are not available (see the note): the library cannot
/// be loaded, CUPTI refuses the configuration, or the range overlaps one already subscribed.
std::unique_ptr<UvmSubscription> subscribe_uvm_counters(int device, const std::byte* base,
                                                        std::uint64_t bytes, std::string* reason);

/// What the process's collector saw since it first started (for tests and diagnostics).
struct UvmCounterTotals {
  std::uint64_t records = 0;         // unified-memory records parsed
  std::uint64_t delivered = 0;       // records (or clipped parts) handed to a consumer
  std::uint64_t outside = 0;         // records in no attached range
  std::uint64_t starts = 0;          // times CUPTI was started (first subscription after none)
  std::uint64_t flush_failures = 0;  // cuptiActivityFlushAll calls that failed
  bool running = false;              // a subscription holds CUPTI now
  bool cpu_faults = false;           // CPU page faults are counted (the platform accepted them)
};
UvmCounterTotals uvm_counter_totals() noexcept;

}  // namespace lema::runtime
