// What both CUDA backends share: the device's primary context, a copy stream, pinned staging
// buffers (slots of one pinned pool), and fences as CUDA events.
//
// Thread safety: every member may be called from any thread; each makes the primary context
// current on the calling thread before calling the driver.
#pragma once

#include <cuda.h>

#include <memory>
#include <mutex>
#include <string>

#include "cuda/driver_api.hpp"
#include "lema/allocator/slot_pool.hpp"
#include "lema/runtime/backend.hpp"

namespace lema::runtime::cuda {

/// Empty when `options.device` can be used with `api`; otherwise why not. `vmm`: the device
/// must support virtual memory management; `managed`: concurrent managed access.
std::string probe_device(const DriverApi& api, const CudaBackendOptions& options, bool vmm,
                         bool managed);

/// The driver table for `options`, or CudaUnavailable with the reason.
const DriverApi& require_driver(const CudaBackendOptions& options, bool vmm, bool managed);

/// A CUDA event; destroyed with the last Fence that holds it.
class EventFence final : public FenceState {
 public:
  EventFence(const DriverApi& api, CUevent event) noexcept : api_(&api), event_(event) {}
  EventFence(const EventFence&) = delete;
  EventFence& operator=(const EventFence&) = delete;
  ~EventFence() override;
  CUevent event() const noexcept { return event_; }

 private:
  const DriverApi* api_;
  CUevent event_;
};

/// Owns the retained primary context and the copy stream (released in reverse order).
class DeviceContext {
 public:
  DeviceContext(const DriverApi& api, int device);
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;
  ~DeviceContext();

  const DriverApi& api() const noexcept { return *api_; }
  CUdevice device() const noexcept { return device_; }
  CUstream copy_stream() const noexcept { return copy_stream_; }
  /// Makes the primary context current on the calling thread.
  void enter() const;

  /// A fence at the current end of `stream`'s work.
  Fence record(CUstream stream) const;
  bool complete(const Fence& fence) const;
  void wait(const Fence& fence) const;
  void queue_wait(CUstream stream, const Fence& fence) const;

 private:
  const DriverApi* api_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
  CUstream copy_stream_ = nullptr;
};

/// Fences and staging from a DeviceContext; the memory primitives are the subclass's.
/// Staging buffers are slots of one pinned pool (Note [One pinned staging pool]).
class DeviceBackend : public Backend {
 public:
  DeviceBackend(const DriverApi& api, int device) : context_(api, device) {}

 private:
  std::unique_ptr<StagingBuffer> do_allocate_staging(std::uint64_t bytes) override;
  bool do_register_host(std::byte* p, std::uint64_t bytes) noexcept override;
  void do_unregister_host(std::byte* p) noexcept override;
  Fence do_record_fence(Queue queue) override {
    return context_.record(static_cast<CUstream>(queue.native));
  }
  bool do_fence_complete(const Fence& fence) override { return context_.complete(fence); }
  void do_wait_fence(const Fence& fence) override { context_.wait(fence); }
  void do_queue_wait(Queue queue, const Fence& fence) override {
    context_.queue_wait(static_cast<CUstream>(queue.native), fence);
  }

 protected:
  const DeviceContext& context() const noexcept { return context_; }
  const DriverApi& api() const noexcept { return context_.api(); }

 private:
  DeviceContext context_;
  std::once_flag pool_once_;
  // Shared with every staging buffer it handed out, which gives its slot back on destruction.
  std::shared_ptr<allocator::SlotPool> staging_pool_;
};

}  // namespace lema::runtime::cuda
