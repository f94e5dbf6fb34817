// The process's collector of CUPTI's unified-memory counters (Note [UVM counters] in
// src/uvm_counters.hpp): start and stop by reference count, the registry of ranges, and the
// parsing of completed buffers.
#include "uvm_counters.hpp"

#include <cupti.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <string_view>

#include "cuda/cupti_api.hpp"
#include "cuda/driver_api.hpp"
#include "lema/runtime/events.hpp"

namespace lema::runtime {
namespace {

using cuda::CuptiApi;

// CUPTI fills buffers the client gives it; records are 8-byte aligned within them. A buffer
// holds ~2,500 unified-memory records; CUPTI asks for another when one is full.
constexpr std::size_t kBufferBytes = std::size_t{256} << 10;
constexpr std::size_t kBufferAlignment = 8;

struct Range {
  std::uintptr_t end = 0;
  UvmConsumer* consumer = nullptr;  // nullptr until attached: records count as outside
};

UvmRecord::Kind record_kind(CUpti_ActivityUnifiedMemoryCounterKind kind, bool* known) {
  *known = true;
  switch (kind) {
    case CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_GPU_PAGE_FAULT:
      return UvmRecord::Kind::gpu_fault;
    case CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_CPU_PAGE_FAULT_COUNT:
      return UvmRecord::Kind::cpu_fault;
    case CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_BYTES_TRANSFER_HTOD:
      return UvmRecord::Kind::to_device;
    case CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_BYTES_TRANSFER_DTOH:
      return UvmRecord::Kind::to_host;
    default:
      *known = false;
      return UvmRecord::Kind::gpu_fault;
  }
}

bool counters_turned_off() {
  const char* env = std::getenv("LEMA_UVM_COUNTERS");
  if (env == nullptr) return false;
  const std::string_view v(env);
  return v == "0" || v == "off" || v == "false" || v == "no";
}

class Collector {
 public:
  // Never destroyed: CUPTI's thread may deliver a buffer while the process exits.
  static Collector& instance() {
    static auto* collector = new Collector();
    return *collector;
  }

  /// Takes a reference, starting CUPTI for the first one, and registers [base, base + bytes).
  /// false with `reason` set when CUPTI is unavailable or the range is taken.
  bool subscribe(int device, std::uintptr_t base, std::uintptr_t end, std::string* reason) {
    std::lock_guard life(lifecycle_);
    if (refs_ == 0 && !start(device, reason)) return false;
    ++refs_;
    try {
      std::unique_lock reg(registry_);
      auto next = ranges_.lower_bound(base);
      const bool overlaps_next = next != ranges_.end() && next->first < end;
      const bool overlaps_prev = next != ranges_.begin() && std::prev(next)->second.end > base;
      if (!overlaps_next && !overlaps_prev) {
        ranges_.emplace(base, Range{end, nullptr});
        return true;
      }
    } catch (...) {
      release_locked();
      throw;
    }
    *reason =
        "the range is already counted for another consumer (two pagers over one address space)";
    release_locked();
    return false;
  }

  void attach(std::uintptr_t base, UvmConsumer* consumer) {
    std::unique_lock reg(registry_);
    if (auto it = ranges_.find(base); it != ranges_.end()) it->second.consumer = consumer;
  }

  /// Removes the range (waiting for a delivery in progress) and drops the reference.
  void unsubscribe(std::uintptr_t base) noexcept {
    std::lock_guard life(lifecycle_);
    {
      std::unique_lock reg(registry_);
      ranges_.erase(base);
    }
    release_locked();
  }

  // Called with no lock held (Note [UVM counters]: delivery takes the registry lock).
  void flush() noexcept {
    const CuptiApi* api = api_.load(std::memory_order_acquire);
    if (api == nullptr || cuda::process_is_exiting()) return;
    if (api->flush_all(0) != CUPTI_SUCCESS) flush_failures_.fetch_add(1, std::memory_order_relaxed);
  }

  void consume(std::uint8_t* buffer, std::size_t valid) noexcept {
    const CuptiApi* api = api_.load(std::memory_order_acquire);
    if (api == nullptr || buffer == nullptr || valid == 0) return;
    std::shared_lock reg(registry_);
    CUpti_Activity* record = nullptr;
    while (api->get_next_record(buffer, valid, &record) == CUPTI_SUCCESS && record != nullptr) {
      if (record->kind != CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER) continue;
      // The struct CUDA 13's CUPTI writes for this kind (cupti_activity.h); copied out of the
      // packed buffer.
      CUpti_ActivityUnifiedMemoryCounter3 um;
      std::memcpy(&um, record, sizeof um);
      records_.fetch_add(1, std::memory_order_relaxed);
      deliver(um);
    }
  }

  UvmCounterTotals totals() noexcept {
    UvmCounterTotals t;
    t.records = records_.load(std::memory_order_relaxed);
    t.delivered = delivered_.load(std::memory_order_relaxed);
    t.outside = outside_.load(std::memory_order_relaxed);
    t.flush_failures = flush_failures_.load(std::memory_order_relaxed);
    std::lock_guard life(lifecycle_);
    t.starts = starts_;
    t.running = refs_ > 0;
    t.cpu_faults = cpu_faults_;
    return t;
  }

 private:
  Collector() = default;

  // ---- under lifecycle_ ----

  bool start(int device, std::string* reason) {
    if (counters_turned_off()) {
      *reason = "turned off by LEMA_UVM_COUNTERS";
      return false;
    }
    const CuptiApi* api = cuda::load_cupti(reason);
    if (api == nullptr) return false;
    api_.store(api, std::memory_order_release);
    auto failed = [&](const char* call, CUptiResult r, std::string_view hint) {
      *reason = "CUPTI '" + api->library + "': " + call + " failed with " + api->describe(r) +
                (hint.empty() ? "" : " (" + std::string(hint) + ")");
      return false;
    };
    if (const CUptiResult r = api->register_callbacks(buffer_requested, buffer_completed);
        r != CUPTI_SUCCESS)
      return failed("cuptiActivityRegisterCallbacks", r, {});
    // Scope and device are ignored since CUDA 7 but still checked for validity.
    auto config = [&](CUpti_ActivityUnifiedMemoryCounterKind kind) {
      CUpti_ActivityUnifiedMemoryCounterConfig c{};
      c.scope = CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_SCOPE_PROCESS_SINGLE_DEVICE;
      c.kind = kind;
      c.deviceId = static_cast<std::uint32_t>(std::max(device, 0));
      c.enable = 1;
      return c;
    };
    CUpti_ActivityUnifiedMemoryCounterConfig configs[] = {
        config(CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_BYTES_TRANSFER_HTOD),
        config(CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_BYTES_TRANSFER_DTOH),
        config(CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_GPU_PAGE_FAULT),
        config(CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_KIND_CPU_PAGE_FAULT_COUNT)};
    // CPU page faults are refused on some platforms where the other three work: ask without.
    cpu_faults_ = api->configure_unified_memory_counter(configs, 4) == CUPTI_SUCCESS;
    if (!cpu_faults_) {
      if (const CUptiResult r = api->configure_unified_memory_counter(configs, 3);
          r != CUPTI_SUCCESS)
        return failed("cuptiActivityConfigureUnifiedMemoryCounter", r,
                      "the device or platform has no unified-memory counters: WSL, MPS and "
                      "several GPUs without peer access have none");
    }
    std::uint64_t cupti_now = 0;
    const bool timed =
        api->get_timestamp != nullptr && api->get_timestamp(&cupti_now) == CUPTI_SUCCESS;
    clock_offset_.store(timed ? static_cast<std::int64_t>(now_ns() - cupti_now) : 0,
                        std::memory_order_relaxed);
    timed_.store(timed, std::memory_order_relaxed);
    if (const CUptiResult r = api->activity_enable(CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER);
        r != CUPTI_SUCCESS)
      return failed("cuptiActivityEnable(CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER)", r,
                    "another profiler in the process may hold CUPTI; LEMA_UVM_COUNTERS=0 leaves it "
                    "to that one");
    ++starts_;
    return true;
  }

  void release_locked() noexcept {
    if (--refs_ > 0) return;
    const CuptiApi* api = api_.load(std::memory_order_relaxed);
    if (api == nullptr || cuda::process_is_exiting()) return;
    // Disabled first, then a forced flush returns every buffer CUPTI still holds (its records
    // fall in no range now and count as outside).
    api->activity_disable(CUPTI_ACTIVITY_KIND_UNIFIED_MEMORY_COUNTER);
    api->flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  }

  // ---- under registry_ (shared) ----

  void hand(UvmConsumer* consumer, const UvmRecord& r) noexcept {
    consumer->on_uvm_record(r);
    delivered_.fetch_add(1, std::memory_order_relaxed);
  }

  void deliver(const CUpti_ActivityUnifiedMemoryCounter3& um) noexcept {
    bool known = false;
    UvmRecord r;
    r.kind = record_kind(um.counterKind, &known);
    if (!known) return;
    const bool timed = timed_.load(std::memory_order_relaxed) && um.start != 0;
    r.start_ns =
        timed ? um.start + static_cast<std::uint64_t>(clock_offset_.load(std::memory_order_relaxed))
              : now_ns();
    r.duration_ns =
        r.kind != UvmRecord::Kind::cpu_fault && um.end > um.start ? um.end - um.start : 0;
    const auto address = static_cast<std::uintptr_t>(um.address);
    bool handed = false;
    if (r.kind == UvmRecord::Kind::gpu_fault || r.kind == UvmRecord::Kind::cpu_fault) {
      r.address = address;
      r.value = r.kind == UvmRecord::Kind::cpu_fault ? 1 : std::max<std::uint64_t>(um.value, 1);
      auto it = ranges_.upper_bound(address);
      if (it != ranges_.begin()) {
        --it;
        if (address < it->second.end && it->second.consumer != nullptr) {
          hand(it->second.consumer, r);
          handed = true;
        }
      }
    } else {
      // A migration may straddle ranges: each gets its part.
      const std::uintptr_t end =
          um.value > std::numeric_limits<std::uintptr_t>::max() - address
              ? std::numeric_limits<std::uintptr_t>::max()
              : address + static_cast<std::uintptr_t>(std::max<std::uint64_t>(um.value, 1));
      auto it = ranges_.upper_bound(address);
      if (it != ranges_.begin() && std::prev(it)->second.end > address) --it;
      for (; it != ranges_.end() && it->first < end; ++it) {
        if (it->second.consumer == nullptr) continue;
        const std::uintptr_t from = std::max(address, it->first);
        const std::uintptr_t to = std::min(end, it->second.end);
        if (from >= to) continue;
        r.address = from;
        r.value = std::min<std::uint64_t>(to - from, um.value);
        hand(it->second.consumer, r);
        handed = true;
      }
    }
    if (!handed) outside_.fetch_add(1, std::memory_order_relaxed);
  }

  // ---- CUPTI's callbacks (any thread; never throw) ----

  static void CUPTIAPI buffer_requested(std::uint8_t** buffer, std::size_t* size,
                                        std::size_t* max_records) {
    // nullptr declines: CUPTI drops records rather than fail.
    *buffer = static_cast<std::uint8_t*>(std::aligned_alloc(kBufferAlignment, kBufferBytes));
    *size = *buffer != nullptr ? kBufferBytes : 0;
    *max_records = 0;
  }

  static void CUPTIAPI buffer_completed(CUcontext, std::uint32_t, std::uint8_t* buffer, std::size_t,
                                        std::size_t valid) {
    instance().consume(buffer, valid);
    std::free(buffer);
  }

  std::mutex lifecycle_;
  int refs_ = 0;              // guarded by lifecycle_
  std::uint64_t starts_ = 0;  // guarded by lifecycle_
  bool cpu_faults_ = false;   // guarded by lifecycle_
  std::atomic<const CuptiApi*> api_{nullptr};
  std::atomic<std::int64_t> clock_offset_{0};  // now_ns() - CUPTI's timestamp at start
  std::atomic<bool> timed_{false};

  std::shared_mutex registry_;
  std::map<std::uintptr_t, Range> ranges_;  // by base; guarded by registry_

  std::atomic<std::uint64_t> records_{0};
  std::atomic<std::uint64_t> delivered_{0};
  std::atomic<std::uint64_t> outside_{0};
  std::atomic<std::uint64_t> flush_failures_{0};
};

class Subscription final : public UvmSubscription {
 public:
  explicit Subscription(std::uintptr_t base) : base_(base) {}
  Subscription(const Subscription&) = delete;
  Subscription& operator=(const Subscription&) = delete;
  // Records completed so far reach the consumer before it is removed.
  ~Subscription() override {
    Collector& c = Collector::instance();
    c.flush();
    c.unsubscribe(base_);
  }
  void attach(UvmConsumer& consumer) override { Collector::instance().attach(base_, &consumer); }
  void flush() noexcept override { Collector::instance().flush(); }

 private:
  std::uintptr_t base_;
};

}  // namespace

std::unique_ptr<UvmSubscription> subscribe_uvm_counters(int device, const std::byte* base,
                                                        std::uint64_t bytes, std::string* reason) {
  const auto b = reinterpret_cast<std::uintptr_t>(base);
  std::string why;
  if (base == nullptr || bytes == 0) {
    why = "an empty range has nothing to count";
  } else if (Collector::instance().subscribe(device, b, b + bytes, &why)) {
    return std::make_unique<Subscription>(b);
  }
  if (reason != nullptr) *reason = why;
  return nullptr;
}

UvmCounterTotals uvm_counter_totals() noexcept {
  return Collector::instance().totals();
}

}  // namespace lema::runtime
