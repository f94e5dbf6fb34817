// DeviceVmmResource: device memory from the CUDA driver's virtual memory management, under a
// byte budget, with stream-ordered frees and pause/resume of tagged allocations.
//
//  - One virtual range is reserved at construction (cuMemAddressReserve) and never moves; every
//    allocation takes addresses from it (AddressRanges) and is backed by its own physical
//    allocation (cuMemCreate of the size rounded up to the device's granularity, cuMemMap,
//    cuMemSetAccess read-write for the device). So each block costs at least one granule
//    (2 MiB on current GPUs): put a sub-allocator in front for small blocks (PyTorch's MemPool
//    does; docs/USER_GUIDE.md).
//  - The budget counts physical bytes mapped (granule-rounded), pending frees included; an
//    allocation that would exceed it, after waiting for pending frees, throws
//    allocator::OutOfMemory with the numbers. The driver running out first throws it too.
//  - deallocate(p, bytes, alignment) releases at once: the caller says no work on p is queued.
//    deallocate_on_stream(p, bytes, stream) records an event on `stream` and releases the block
//    (physical memory and addresses) only once that event has completed (Note [Stream-ordered
//    frees]). An allocation the budget or the range cannot otherwise hold waits for pending
//    frees; so does the destructor.
//  - Allocations carry the calling thread's current tag (ScopedTag). pause(tag) unmaps and
//    releases the physical memory of every live allocation of the tag, keeping its addresses
//    reserved; resume(tag) maps fresh physical memory at the same addresses. Contents are lost
//    unless pause was asked to keep them (a copy through pinned host memory). Using paused
//    memory is the caller's bug (on a GPU: an illegal address fault).
//
// The header keeps <cuda.h> out: streams are CUstream values passed as void*.
// Thread safety: fully thread-safe; one mutex guards the state, held across driver calls (and
// across a wait for a pending free when the budget is full).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "lema/allocator/memory_resource.hpp"

namespace lema::allocator::cuda {

namespace detail {
struct Vmm;
}

struct DeviceVmmOptions {
  int device = 0;
  /// The driver library; empty: $LEMA_CUDA_DRIVER, else "libcuda.so.1".
  std::string driver_library;
  /// Physical bytes this resource may hold mapped at once; 0: the device's total memory.
  std::uint64_t budget_bytes = 0;
  /// The virtual range reserved once; 0: four times the budget. Paused allocations keep their
  /// addresses, so it must hold them as well as what is mapped.
  std::uint64_t reserve_bytes = 0;
};

/// What a resource holds (usage()).
struct DeviceVmmUsage {
  std::uint64_t budget_bytes = 0;
  std::uint64_t reserve_bytes = 0;
  std::uint64_t granularity = 0;
  std::uint64_t mapped_bytes = 0;   // physical bytes held: live + pending frees
  std::uint64_t pending_bytes = 0;  // of which freed on a stream, waiting for its event
  std::uint64_t paused_bytes = 0;   // live allocations of paused tags (addresses only)
  std::uint64_t live_allocations = 0;
};

/// How deallocate_on_stream / release went (for callers at a C boundary, which must not throw).
enum class ReleaseStatus {
  released,         // freed, or queued behind the stream's event
  unknown_pointer,  // not a live allocation of this resource (a double free?); nothing done
  size_mismatch,    // live, but allocated with another size; freed anyway (by its address)
};

class DeviceVmmResource final : public MemoryResource {
 public:
  /// Throws runtime::CudaUnavailable when the driver or device cannot do virtual memory
  /// management, lema::InvalidArgument for a reserve smaller than the budget.
  explicit DeviceVmmResource(const DeviceVmmOptions& options);
  ~DeviceVmmResource() override;

  /// Frees `p` once the work queued on `stream` (a CUstream; nullptr: the legacy default
  /// stream) up to now has completed. Reports, rather than throws, what is wrong with `p`;
  /// nullptr is released. An event that cannot be recorded makes it wait for the stream.
  ReleaseStatus deallocate_on_stream(void* p, std::size_t bytes, void* stream) noexcept;

  /// Releases every pending free whose event has completed; the bytes released.
  std::uint64_t reclaim();

  /// Releases the physical memory of every live allocation tagged `tag`, keeping its addresses;
  /// with keep_contents, their bytes are first copied to pinned host memory (resume puts them
  /// back). The caller must have finished every use of that memory. Throws lema::InvalidArgument
  /// for an empty tag, a tag no allocation ever carried, or one already paused.
  void pause(std::string_view tag, bool keep_contents = false);
  /// Maps fresh physical memory at every address pause(tag) released. Throws
  /// lema::InvalidArgument when the tag is not paused, allocator::OutOfMemory when the budget
  /// cannot hold it again (nothing changes then).
  void resume(std::string_view tag);
  bool paused(std::string_view tag) const;

  DeviceVmmUsage usage() const;
  std::uint64_t granularity() const noexcept;
  int device() const noexcept;

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;

  std::unique_ptr<detail::Vmm> state_;
};

/// The calling thread's current tag ("" when none): what allocations made now carry.
std::string_view current_tag() noexcept;
/// Sets the calling thread's current tag ("" clears it).
void set_current_tag(std::string_view tag);

/// Sets the calling thread's current tag for a scope, restoring the previous one after.
class ScopedTag {
 public:
  explicit ScopedTag(std::string_view tag) : previous_(current_tag()) { set_current_tag(tag); }
  ScopedTag(const ScopedTag&) = delete;
  ScopedTag& operator=(const ScopedTag&) = delete;
  ~ScopedTag() { set_current_tag(previous_); }

 private:
  std::string previous_;
};

}  // namespace lema::allocator::cuda
