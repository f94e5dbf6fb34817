// torch.ops.lema: the plugin for Python users of PyTorch (python/lema wraps these ops).
// Checkpoints are held in a table under integer handles; tensors keep their checkpoint open
// after close() like in C++.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/policy.hpp"
#include "lema/torch/allocator.hpp"
#include "lema/torch/virtual_checkpoint.hpp"

namespace lema::torch {
namespace {

struct OpenCheckpoints {
  std::mutex mutex;
  std::int64_t next = 1;
  std::map<std::int64_t, VirtualCheckpoint> by_handle;
};

OpenCheckpoints& open_checkpoints() {
  static OpenCheckpoints* const table = new OpenCheckpoints;  // outlives static destruction
  return *table;
}

VirtualCheckpoint find(std::int64_t handle) {
  OpenCheckpoints& table = open_checkpoints();
  std::lock_guard lock(table.mutex);
  const auto it = table.by_handle.find(handle);
  TORCH_CHECK(it != table.by_handle.end(), "lema: no open checkpoint has handle ", handle,
              " (closed already?)");
  return it->second;
}

/// Runs `body`, turning LEMA's errors into c10::Error so Python sees RuntimeError with the text.
template <class Body>
auto translated(Body&& body) {
  try {
    return body();
  } catch (const lema::Error& e) {
    TORCH_CHECK(false, "lema: ", e.what());
  }
}

/// The budget "unlimited" stands for (lema.open passes it as -1): every page of the model, as
/// `lema train --budget unlimited` computes it, at the host's 2 MiB granularity.
std::uint64_t unlimited_budget(const std::string& path, std::optional<std::uint64_t> page_size) {
  const io::Checkpoint checkpoint = io::Checkpoint::open(path);
  const std::uint64_t page =
      runtime::resolve_page_size(page_size, std::uint64_t{2} << 20, "page_size=");
  return runtime::Layout::plan(checkpoint, page).virtual_bytes();
}

std::int64_t open_op(std::string path, std::int64_t budget, std::string policy, std::string mode,
                     std::int64_t page_size, std::string device, std::string gpu_memory,
                     std::int64_t host_cache, bool read_only) {
  return translated([&] {
    Options options;
    try {
      options.device = c10::Device(device);
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "lema: unknown device '", device, "' (cpu, cuda or cuda:N)");
    }
    const auto memory = runtime::parse_gpu_memory(gpu_memory);
    TORCH_CHECK(memory.has_value(), "lema: unknown gpu_memory '", gpu_memory,
                "' (vmm, managed or unified)");
    options.gpu_memory = *memory;
    TORCH_CHECK(host_cache >= 0, "lema: host_cache must not be negative, got ", host_cache);
    options.host_cache_bytes = static_cast<std::uint64_t>(host_cache);
    TORCH_CHECK(budget > 0 || budget == -1, "lema: the budget must be positive or 'unlimited', got ",
                budget);
    if (page_size > 0) options.page_size = static_cast<std::uint64_t>(page_size);
    options.budget_bytes = budget == -1 ? unlimited_budget(path, options.page_size)
                                        : static_cast<std::uint64_t>(budget);
    options.setting_names = {.budget = "budget=", .page_size = "page_size="};
    const auto kind = runtime::parse_policy(policy);
    TORCH_CHECK(kind.has_value(), "lema: unknown policy '", policy, "'");
    options.policy = *kind;
    const auto residency = runtime::parse_residency_mode(mode);
    TORCH_CHECK(residency.has_value(), "lema: unknown mode '", mode, "' (guard or fault)");
    options.mode = *residency;
    options.read_only = read_only;
    VirtualCheckpoint checkpoint = lema::torch::open(path, options);
    OpenCheckpoints& table = open_checkpoints();
    std::lock_guard lock(table.mutex);
    const std::int64_t handle = table.next++;
    table.by_handle.emplace(handle, std::move(checkpoint));
    return handle;
  });
}

at::Tensor tensor_op(std::int64_t handle, std::string name) {
  return translated([&] { return find(handle).tensor(name); });
}

std::vector<std::string> names_op(std::int64_t handle) {
  return translated([&] { return find(handle).names(); });
}

std::string stats_op(std::int64_t handle) {
  return translated([&] {
    const VirtualCheckpoint checkpoint = find(handle);
    const runtime::PagerStats s = checkpoint.stats();
    nlohmann::json j = {{"mode", std::string(runtime::residency_mode_name(checkpoint.mode()))},
                        {"fallback_reason", checkpoint.fallback_reason()},
                        {"fault_fallback_reason", checkpoint.mapped().fault_fallback_reason()},
                        {"fallback_faults", s.fallback_faults},
                        {"faults", s.faults},
                        {"hits", s.hits},
                        {"prefetches_issued", s.prefetches_issued},
                        {"prefetches_used", s.prefetches_used},
                        {"prefetches_wasted", s.prefetches_wasted},
                        {"bytes_read", s.bytes_read},
                        {"evictions", s.evictions},
                        {"stall_ns", s.stall_ns},
                        {"resident_bytes", s.resident_bytes},
                        {"peak_resident_bytes", s.peak_resident_bytes},
                        {"budget_bytes", s.budget_bytes},
                        {"page_size", s.page_size},
                        {"io_path", s.io_path},
                        {"host_cache_hits", s.host_cache_hits},
                        {"shared_cache_hits", s.shared_cache_hits},
                        {"shared_host_cache_bytes", s.shared_host_cache_bytes},
                        {"gpu_faults", s.gpu_faults},
                        {"migrated_to_device_bytes", s.migrated_to_device_bytes},
                        {"migrated_to_host_bytes", s.migrated_to_host_bytes},
                        {"uvm_counters", s.uvm_counters},
                        {"writable", checkpoint.mapped().writable()},
                        {"dirty_evictions", s.dirty_evictions},
                        {"spilled_bytes", s.spilled_bytes},
                        {"spilled_pages", s.spilled_pages},
                        {"spill_fills", s.spill_fills}};
    return j.dump();
  });
}

void prefetch_op(std::int64_t handle, std::vector<std::string> names) {
  translated([&] { find(handle).prefetch(names); });
}

void mark_step_op(std::int64_t handle) {
  translated([&] { find(handle).mark_step(); });
}

void pause_op(std::int64_t handle) {
  translated([&] { find(handle).pause(); });
}

void resume_op(std::int64_t handle) {
  translated([&] { find(handle).resume(); });
}

void close_op(std::int64_t handle) {
  OpenCheckpoints& table = open_checkpoints();
  std::lock_guard lock(table.mutex);
  table.by_handle.erase(handle);
}

// CPU allocators installed from Python (lema.use_allocator), by handle. A scope stays
// installed until restore_allocator, whatever Python's garbage collector does.
struct InstalledAllocators {
  std::mutex mutex;
  std::int64_t next = 1;
  std::map<std::int64_t, AllocatorScope> by_handle;
};

InstalledAllocators& installed_allocators() {
  static InstalledAllocators* const table = new InstalledAllocators;  // outlives static destruction
  return *table;
}

std::int64_t use_allocator_op(std::int64_t budget, std::int64_t capacity, std::string mode,
                              std::int64_t page_size) {
  return translated([&] {
    allocator::VmmOptions options;
    TORCH_CHECK(budget > 0, "lema: use_allocator(budget=", budget,
                "): give the memory the tensors' pages may take, e.g. budget='1GiB'");
    TORCH_CHECK(capacity >= 0, "lema: use_allocator(capacity=", capacity,
                "): give the virtual bytes to hand out, or 0 for 64 times the budget");
    options.budget_bytes = static_cast<std::uint64_t>(budget);
    options.capacity_bytes = static_cast<std::uint64_t>(capacity);
    const auto parsed = runtime::parse_residency_mode(mode);
    TORCH_CHECK(parsed, "lema: use_allocator(mode='", mode, "'): use 'fault' or 'guard'");
    options.mode = *parsed;
    if (page_size != 0) options.page_size = static_cast<std::uint64_t>(page_size);
    options.setting_names = {.budget = "budget=", .page_size = "page_size="};
    InstalledAllocators& table = installed_allocators();
    std::lock_guard lock(table.mutex);
    const std::int64_t handle = table.next++;
    table.by_handle.emplace(handle, use_allocator(options));
    return handle;
  });
}

void restore_allocator_op(std::int64_t handle) {
  InstalledAllocators& table = installed_allocators();
  std::lock_guard lock(table.mutex);
  table.by_handle.erase(handle);  // the scope restores the previous allocator
}

std::string allocator_stats_op(std::int64_t handle) {
  return translated([&] {
    InstalledAllocators& table = installed_allocators();
    std::lock_guard lock(table.mutex);
    const auto it = table.by_handle.find(handle);
    TORCH_CHECK(it != table.by_handle.end(), "lema: no allocator has handle ", handle,
                " (restored already?)");
    const allocator::VmmResource& mr = it->second.resource();
    const runtime::PagerStats s = mr.stats();
    nlohmann::json j = {{"mode", std::string(runtime::residency_mode_name(mr.memory().mode()))},
                        {"capacity_bytes", mr.capacity()},
                        {"bytes_in_use", mr.bytes_in_use()},
                        {"faults", s.faults},
                        {"evictions", s.evictions},
                        {"resident_bytes", s.resident_bytes},
                        {"peak_resident_bytes", s.peak_resident_bytes},
                        {"budget_bytes", s.budget_bytes},
                        {"page_size", s.page_size},
                        {"dirty_evictions", s.dirty_evictions},
                        {"spilled_bytes", s.spilled_bytes},
                        {"spilled_pages", s.spilled_pages},
                        {"spill_fills", s.spill_fills}};
    return j.dump();
  });
}

}  // namespace
}  // namespace lema::torch

TORCH_LIBRARY(lema, m) {
  using namespace lema::torch;
  m.def(
      "open(str path, int budget, str policy, str mode, int page_size=0, str device='cpu', "
      "str gpu_memory='vmm', int host_cache=0, bool read_only=False) -> int",
      &open_op);
  m.def("tensor(int handle, str name) -> Tensor", &tensor_op);
  m.def("names(int handle) -> str[]", &names_op);
  m.def("stats(int handle) -> str", &stats_op);
  m.def("prefetch(int handle, str[] names) -> ()", &prefetch_op);
  m.def("mark_step(int handle) -> ()", &mark_step_op);
  m.def("pause(int handle) -> ()", &pause_op);
  m.def("resume(int handle) -> ()", &resume_op);
  m.def("close(int handle) -> ()", &close_op);
  m.def("use_allocator(int budget, int capacity=0, str mode='fault', int page_size=0) -> int",
        &use_allocator_op);
  m.def("restore_allocator(int handle) -> ()", &restore_allocator_op);
  m.def("allocator_stats(int handle) -> str", &allocator_stats_op);
}
