#include "lema/allocator/cuda/device_vmm_resource.hpp"

#include <cuda.h>

#include <cstdio>
#include <string>

#include "detail/vmm_state.hpp"
#include "lema/allocator/limit_adaptor.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator::cuda {
namespace detail {
namespace {

CUmemAllocationProp device_allocation(CUdevice device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(device);
  return prop;
}

std::uint64_t round_up(std::uint64_t n, std::uint64_t to) {
  return (n + to - 1) / to * to;
}

std::string hex(CUdeviceptr p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

const DriverApi& driver_for(const DeviceVmmOptions& options) {
  runtime::CudaBackendOptions o;
  o.device = options.device;
  o.driver_library = options.driver_library;
  return runtime::cuda::require_driver(o, /*vmm=*/true, /*managed=*/false);
}

}  // namespace

Vmm::Vmm(const DriverApi& api, const DeviceVmmOptions& options) : context(api, options.device) {
  context.enter();
  const CUmemAllocationProp prop = device_allocation(context.device());
  std::size_t g = 0;
  api.check(api.mem_get_allocation_granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity");
  granularity = g;
  budget = options.budget_bytes;
  if (budget == 0) {
    std::size_t free = 0, total = 0;
    api.check(api.mem_get_info(&free, &total), "cuMemGetInfo");
    budget = total;
  }
  budget = round_up(budget, granularity);
  reserve = options.reserve_bytes == 0 ? 4 * budget : round_up(options.reserve_bytes, granularity);
  LEMA_EXPECTS(reserve >= budget, "the virtual range of " + format_size(reserve) +
                                      " is smaller than the budget of " + format_size(budget) +
                                      "; reserve at least the budget (0: four times it)");
  api.check(api.mem_address_reserve(&base, reserve, 0, 0, 0), "cuMemAddressReserve",
            format_size(reserve) + " of device addresses");
  ranges = AddressRanges(reserve);
}

CUmemGenericAllocationHandle Vmm::back(CUdeviceptr addr, std::uint64_t bytes) {
  const DriverApi& a = api();
  const CUmemAllocationProp prop = device_allocation(context.device());
  CUmemGenericAllocationHandle h = 0;
  const CUresult r = a.mem_create(&h, bytes, &prop, 0);
  if (r == CUDA_ERROR_OUT_OF_MEMORY) {
    // The device, not the budget, is full (other processes, or a budget above what is free).
    std::size_t free = 0, total = 0;
    a.mem_get_info(&free, &total);
    throw lema::OutOfMemory("cuMemCreate of " + format_size(bytes) + " on CUDA device " +
                            std::to_string(context.device()) + ": the device is out of memory (" +
                            format_size(free) + " free of " + format_size(total) +
                            "); lower the budget or free device memory elsewhere");
  }
  a.check(r, "cuMemCreate", format_size(bytes) + " on device " + std::to_string(context.device()));
  try {
    a.check(a.mem_map(addr, bytes, 0, h, 0), "cuMemMap", format_size(bytes) + " at " + hex(addr));
  } catch (...) {
    a.mem_release(h);
    throw;
  }
  CUmemAccessDesc rw{};
  rw.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  rw.location.id = static_cast<int>(context.device());
  rw.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const CUresult access = a.mem_set_access(addr, bytes, &rw, 1);
  if (access != CUDA_SUCCESS) {
    a.mem_unmap(addr, bytes);
    a.mem_release(h);
    a.check(access, "cuMemSetAccess", format_size(bytes) + " at " + hex(addr));
  }
  return h;
}

void Vmm::unback(CUdeviceptr addr, std::uint64_t bytes,
                 CUmemGenericAllocationHandle handle) noexcept {
  const DriverApi& a = api();
  const CUresult u = a.mem_unmap(addr, bytes);
  const CUresult r = a.mem_release(handle);
  if (u != CUDA_SUCCESS || r != CUDA_SUCCESS)
    std::fprintf(stderr, "lema: releasing %s of device memory at %s failed: %s\n",
                 format_size(bytes).c_str(), hex(addr).c_str(),
                 a.describe(u != CUDA_SUCCESS ? u : r).c_str());
}

void Vmm::release(CUdeviceptr addr, Block& block) noexcept {
  if (block.handle != 0) {
    unback(addr, block.bytes, block.handle);
    mapped -= block.bytes;
    block.handle = 0;
  }
  if (block.backup != nullptr) {
    api().mem_free_host(block.backup);
    block.backup = nullptr;
  }
  ranges.give_back(addr - base, block.bytes);
}

std::uint64_t Vmm::reclaim(std::uint64_t bytes, bool until_fits) {
  // Note [Stream-ordered frees]: a block freed on a stream may still be read or written by work
  // queued there before the free. It keeps its physical memory and its addresses until an event
  // recorded on that stream at the free has completed; only then are both released and can be
  // handed out again. Nothing ever waits for the whole device: completion is asked of each
  // event (cuEventQuery), and only an allocation the budget cannot otherwise hold waits, for
  // the oldest pending frees one at a time (cuEventSynchronize), as few as make it fit.
  const DriverApi& a = api();
  std::uint64_t released = 0;
  for (auto it = pending.begin(); it != pending.end();) {
    CUresult r = a.event_query(it->event);
    if (r == CUDA_ERROR_NOT_READY && until_fits && mapped + bytes > budget)
      r = a.event_synchronize(it->event);
    if (r == CUDA_ERROR_NOT_READY) {
      ++it;
      continue;
    }
    if (r != CUDA_SUCCESS) {
      // An event that cannot be asked: wait for it so the memory is never reused early.
      std::fprintf(stderr, "lema: cuEventQuery of a pending free failed (%s); waiting for it\n",
                   a.describe(r).c_str());
      a.event_synchronize(it->event);
    }
    pending_bytes -= it->block.bytes;
    released += it->block.bytes;
    release(it->addr, it->block);
    spare_events.push_back(it->event);
    it = pending.erase(it);
  }
  return released;
}

}  // namespace detail

DeviceVmmResource::DeviceVmmResource(const DeviceVmmOptions& options)
    : state_(std::make_unique<detail::Vmm>(detail::driver_for(options), options)) {}

DeviceVmmResource::~DeviceVmmResource() {
  detail::Vmm& s = *state_;
  if (runtime::cuda::process_is_exiting()) return;
  std::lock_guard lock(s.mu);
  s.context.enter();
  const auto& a = s.api();
  for (auto& p : s.pending) a.event_synchronize(p.event);
  s.reclaim();
  // Blocks still live are the caller's leak; their memory goes with the range all the same.
  for (auto& [addr, block] : s.live) s.release(addr, block);
  s.live.clear();
  for (CUevent e : s.spare_events) a.event_destroy(e);
  a.mem_address_free(s.base, s.reserve);
}

void* DeviceVmmResource::do_allocate(std::size_t bytes, std::size_t alignment) {
  detail::Vmm& s = *state_;
  const std::string tag(current_tag());
  const std::uint64_t size = detail::round_up(bytes, s.granularity);
  std::lock_guard lock(s.mu);
  s.context.enter();
  if (!tag.empty()) {
    auto t = s.tags.find(tag);
    LEMA_EXPECTS(t == s.tags.end() || !t->second.paused,
                 "allocation of " + format_size(bytes) + " under tag '" + tag +
                     "', which is paused; resume the tag before allocating under it");
  }
  if (!s.pending.empty()) s.reclaim(size, /*until_fits=*/true);
  if (s.mapped + size > s.budget) throw OutOfMemory(size, s.mapped, s.budget);
  const std::uint64_t align = std::max<std::uint64_t>(alignment, s.granularity);
  auto offset = s.ranges.take(size, align);
  if (!offset && !s.pending.empty()) {
    // Pending frees hold addresses too: wait for them all (the range, not the budget, is full).
    for (auto& p : s.pending) s.api().event_synchronize(p.event);
    s.reclaim();
    offset = s.ranges.take(size, align);
  }
  if (!offset) {
    throw lema::OutOfMemory(
        "allocation of " + format_size(size) + " finds no room in the reserved virtual range of " +
        format_size(s.reserve) + " (" + format_size(s.ranges.free_bytes()) + " free, largest " +
        format_size(s.ranges.largest_free()) + " in one piece; paused tags keep theirs); " +
        "reserve a larger range (reserve_bytes, LEMA_ALLOC_RESERVE)");
  }
  const CUdeviceptr addr = s.base + *offset;
  detail::Block block;
  block.bytes = size;
  block.requested = bytes;
  block.tag = tag;
  try {
    block.handle = s.back(addr, size);
    if (!tag.empty()) s.tags.try_emplace(tag);
    s.live.emplace(addr, std::move(block));
  } catch (...) {
    if (block.handle != 0) s.unback(addr, size, block.handle);
    s.ranges.give_back(*offset, size);
    throw;
  }
  s.mapped += size;
  return reinterpret_cast<void*>(addr);
}

void DeviceVmmResource::do_deallocate(void* p, std::size_t bytes, std::size_t) noexcept {
  detail::Vmm& s = *state_;
  const auto addr = reinterpret_cast<CUdeviceptr>(p);
  std::lock_guard lock(s.mu);
  auto it = s.live.find(addr);
  if (it == s.live.end()) {
    std::fprintf(stderr,
                 "lema: deallocate of %s (%zu bytes), which is not a live allocation of this "
                 "device memory resource (a double free?); ignored\n",
                 detail::hex(addr).c_str(), bytes);
    return;
  }
  try {
    s.context.enter();
  } catch (...) {
  }
  s.release(addr, it->second);
  s.live.erase(it);
}

ReleaseStatus DeviceVmmResource::deallocate_on_stream(void* p, std::size_t bytes,
                                                      void* stream) noexcept {
  if (p == nullptr) return ReleaseStatus::released;
  detail::Vmm& s = *state_;
  const auto addr = reinterpret_cast<CUdeviceptr>(p);
  std::lock_guard lock(s.mu);
  auto it = s.live.find(addr);
  if (it == s.live.end()) return ReleaseStatus::unknown_pointer;
  const bool mismatch = it->second.requested != bytes;
  const auto& a = s.api();
  try {
    s.context.enter();
  } catch (...) {
  }
  if (it->second.handle == 0) {
    // Paused: nothing physical is left to wait for.
    s.release(addr, it->second);
    s.live.erase(it);
    return mismatch ? ReleaseStatus::size_mismatch : ReleaseStatus::released;
  }
  CUevent event = nullptr;
  if (!s.spare_events.empty()) {
    event = s.spare_events.back();
    s.spare_events.pop_back();
  } else if (a.event_create(&event, CU_EVENT_DISABLE_TIMING) != CUDA_SUCCESS) {
    event = nullptr;
  }
  const CUstream st = static_cast<CUstream>(stream);
  if (event == nullptr || a.event_record(event, st) != CUDA_SUCCESS) {
    // No event to order the free after the stream's work: wait for that work instead.
    if (event != nullptr) s.spare_events.push_back(event);
    a.stream_synchronize(st);
    s.release(addr, it->second);
    s.live.erase(it);
    return mismatch ? ReleaseStatus::size_mismatch : ReleaseStatus::released;
  }
  detail::PendingFree pf;
  pf.addr = addr;
  pf.block = std::move(it->second);
  pf.event = event;
  s.live.erase(it);
  s.pending_bytes += pf.block.bytes;
  s.pending.push_back(std::move(pf));
  return mismatch ? ReleaseStatus::size_mismatch : ReleaseStatus::released;
}

std::uint64_t DeviceVmmResource::reclaim() {
  detail::Vmm& s = *state_;
  std::lock_guard lock(s.mu);
  if (s.pending.empty()) return 0;
  s.context.enter();
  return s.reclaim();
}

DeviceVmmUsage DeviceVmmResource::usage() const {
  const detail::Vmm& s = *state_;
  std::lock_guard lock(s.mu);
  DeviceVmmUsage u;
  u.budget_bytes = s.budget;
  u.reserve_bytes = s.reserve;
  u.granularity = s.granularity;
  u.mapped_bytes = s.mapped;
  u.pending_bytes = s.pending_bytes;
  u.live_allocations = s.live.size();
  for (const auto& [addr, block] : s.live)
    if (block.handle == 0) u.paused_bytes += block.bytes;
  return u;
}

std::uint64_t DeviceVmmResource::granularity() const noexcept {
  return state_->granularity;
}

int DeviceVmmResource::device() const noexcept {
  return static_cast<int>(state_->context.device());
}

}  // namespace lema::allocator::cuda
