// Unified memory: the pager's side of CUPTI's unified-memory counters (Note [UVM counters] in
// uvm_counters.hpp). The driver's GPU page faults serve what the schedule missed; they and its
// migrations become counters and events of the pager, with the page of each address.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <string>

#include "pager_state.hpp"
#include "uvm_counters.hpp"

namespace lema::runtime {
namespace {

// Runs on CUPTI's thread (or one that flushes) under the collector's registry lock: counters
// and events only, both lock-free.
class PagerUvmConsumer final : public UvmConsumer {
 public:
  explicit PagerUvmConsumer(Pager::State& s)
      : s_(s), base_(reinterpret_cast<std::uintptr_t>(s.space->base())) {}

  void on_uvm_record(const UvmRecord& r) noexcept override {
    const std::uint64_t offset = r.address - base_;
    const auto first = static_cast<PageId>(offset / s_.page_size);
    PagerCounters& c = s_.counters;
    switch (r.kind) {
      case UvmRecord::Kind::gpu_fault:
        c.add(c.gpu_faults, r.value);
        record_event(s_, EventKind::gpu_fault, first, 1, r.value, r.start_ns, r.duration_ns);
        break;
      case UvmRecord::Kind::cpu_fault:
        c.add(c.cpu_faults);
        if (s_.profile) s_.profile->update(c, s_.page_size);
        break;
      case UvmRecord::Kind::to_device:
      case UvmRecord::Kind::to_host: {
        const bool to_device = r.kind == UvmRecord::Kind::to_device;
        c.add(to_device ? c.migrated_to_device_bytes : c.migrated_to_host_bytes, r.value);
        const std::uint64_t last =
            (offset + std::max<std::uint64_t>(r.value, 1) - 1) / s_.page_size;
        record_event(s_, to_device ? EventKind::migrate_to_device : EventKind::migrate_to_host,
                     first, static_cast<std::uint32_t>(last - first + 1), r.value, r.start_ns,
                     r.duration_ns);
        break;
      }
    }
  }

 private:
  Pager::State& s_;
  std::uintptr_t base_;
};

// Every pager of a process usually fails for the same reason: said once.
void report_off(const std::string& reason) {
  static std::mutex mutex;
  static std::set<std::string> said;
  std::lock_guard lock(mutex);
  if (!said.insert(reason).second) return;
  spdlog::warn(
      "unified memory: GPU page faults and migrations are not counted ({}); paging works as "
      "without them",
      reason);
}

}  // namespace

void subscribe_uvm(Pager::State& s) {
  const int device = s.backend->capabilities().unified_memory_device;
  if (device < 0) return;
#ifdef LEMA_HAVE_CUDA
  std::string reason;
  s.uvm =
      subscribe_uvm_counters(device, s.space->base(), s.space->page_count() * s.page_size, &reason);
  if (s.uvm) {
    s.uvm_status = "on";
    return;
  }
#else
  const std::string reason = "this runtime was built without the CUDA toolkit";
#endif
  s.uvm_status = reason;
  report_off(reason);
}

void attach_uvm(Pager::State& s) {
  if (!s.uvm) return;
  s.uvm_consumer = std::make_unique<PagerUvmConsumer>(s);
  s.uvm->attach(*s.uvm_consumer);
}

}  // namespace lema::runtime
