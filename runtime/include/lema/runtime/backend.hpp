// The Backend: the one narrow table of memory primitives under the runtime, and the seam where
// tests plug in fakes.
//
//  - a virtual range is reserved once per address space (Reservation, move-only);
//  - a physical pool of N equal chunks is created once per Pager (PhysicalPool, move-only) and
//    reused; chunks are never created or released per eviction;
//  - a chunk is mapped at an address inside a reservation and unmapped again, the address staying
//    reserved (touching it afterwards is not a valid read: PROT_NONE on the host, a fatal fault
//    on a GPU); map_pages maps a batch at once, so that a device backend can set access once per
//    run of adjacent pages instead of once per page;
//  - a fill writes into a chunk either through its host-visible window (window() != nullptr: the
//    host backend) or, for device memory, from a staging buffer with copy_to_chunk() on the
//    backend's copy queue, which returns a fence;
//  - fences order the device's work: record() after the last use of a page on a compute queue,
//    complete()/wait() before its chunk is reused, queue_wait() to make a compute queue wait for
//    a fill.
//
// Host backend (make_host_backend): reserve = mmap(PROT_NONE, MAP_NORESERVE); the pool is one
// memfd of exactly chunks × chunk_bytes, also mapped once, whole, as the private pool window;
// map = mmap(MAP_FIXED|MAP_SHARED, memfd, chunk offset) for Access::read, MAP_PRIVATE for
// Access::read_write (a write copies the system page into private memory and leaves the chunk
// as filled; written_bytes() finds those copies in /proc/self/pagemap: Note [Dirty pages] in
// pager_evict.cpp); unmap = mmap(PROT_NONE, MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)
// over the page, or, once set_unmapped_pages() gave it a placeholder source, whatever that
// source places there (the guard-mode fault fallback puts userfaultfd-registered memory, so that
// a touch is served instead of killing the process: Note [Guard fault fallback] in
// guard_fallback.cpp). Fences are complete at once. With
// HostPages::huge the memfd comes from the hugetlb pool and the reservation is aligned to the
// huge page, so a 2 MiB page is one page-table entry to map, touch and unmap.
//
// Thread safety: every Backend member may be called from any thread concurrently, as long as
// callers do not map/unmap the same address concurrently (the Pager guarantees that).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "lema/base/error.hpp"

namespace lema::runtime {

class Backend;

/// Backend-defined state of a fence (a CUDA event, a test's timer). Subclassed by backends.
class FenceState {
 public:
  virtual ~FenceState() = default;
};

/// A point in a queue's work. Copyable handle; a default-constructed Fence is complete.
class Fence {
 public:
  Fence() = default;
  explicit Fence(std::shared_ptr<FenceState> state) : state_(std::move(state)) {}
  /// True for the always-complete fence (no backend state).
  bool trivially_complete() const noexcept { return state_ == nullptr; }
  FenceState* state() const noexcept { return state_.get(); }

 private:
  std::shared_ptr<FenceState> state_;
};

/// A backend's queue (a CUDA stream); native == nullptr is the default queue.
struct Queue {
  void* native = nullptr;
};

/// How a mapped page may be accessed. read: a write faults. read_write: writes are allowed and
/// land in the page at its model address only, never in the pool chunk (on the host a private
/// copy-on-write mapping), where Backend::written_bytes() can find them.
enum class Access : std::uint8_t { read, read_write };

/// Move-only owner of a reserved virtual range; released through its backend on destruction.
class Reservation {
 public:
  Reservation() = default;
  Reservation(Backend* backend, std::byte* base, std::uint64_t bytes) noexcept
      : backend_(backend), base_(base), bytes_(bytes) {}
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  Reservation(Reservation&& o) noexcept
      : backend_(std::exchange(o.backend_, nullptr)),
        base_(std::exchange(o.base_, nullptr)),
        bytes_(std::exchange(o.bytes_, 0)) {}
  Reservation& operator=(Reservation&& o) noexcept;
  ~Reservation() { reset(); }

  std::byte* base() const noexcept { return base_; }
  std::uint64_t bytes() const noexcept { return bytes_; }
  explicit operator bool() const noexcept { return base_ != nullptr; }
  void reset() noexcept;

 private:
  Backend* backend_ = nullptr;
  std::byte* base_ = nullptr;
  std::uint64_t bytes_ = 0;
};

/// The physical memory of a Pager: `chunk_count()` chunks of `chunk_bytes()` each, created once.
/// Owned by unique_ptr; the destructor releases the memory (all its mappings must be gone).
class PhysicalPool {
 public:
  virtual ~PhysicalPool() = default;
  virtual std::size_t chunk_count() const noexcept = 0;
  virtual std::uint64_t chunk_bytes() const noexcept = 0;
  /// Host pointer to the chunk through the private pool window, or nullptr when the memory is
  /// not host-visible (then fill with Backend::copy_to_chunk).
  virtual std::byte* window(std::size_t chunk) const noexcept = 0;
};

/// One page of a map_pages batch: `chunk` of the pool, mapped at `addr`.
struct PageMapping {
  std::size_t chunk = 0;
  std::byte* addr = nullptr;
};

/// What an unmapped page of a reservation becomes, when not the backend's own inaccessible
/// memory (Backend::set_unmapped_pages). place() must replace whatever is mapped at the range in
/// one step, so that no reader ever finds it readable with other bytes than the page's; it is
/// called under the pager's lock and must not call back into the pager.
class UnmappedPages {
 public:
  virtual ~UnmappedPages() = default;
  /// Puts the placeholder at [addr, addr + bytes) (inside a reservation). Throws SystemError.
  virtual void place(std::byte* addr, std::uint64_t bytes) = 0;
};

/// Host memory the backend can copy from efficiently (pinned on CUDA). Move-only owner.
class StagingBuffer {
 public:
  virtual ~StagingBuffer() = default;
  virtual std::span<std::byte> bytes() noexcept = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  /// "host", "cuda", ...
  virtual std::string_view name() const noexcept = 0;
  /// Smallest unit of reserve/map (2 MiB on the host, by convention; see layout.hpp).
  virtual std::uint64_t granularity() const noexcept = 0;
  /// True when mapped pages can be read by the CPU at their model address.
  virtual bool host_accessible() const noexcept = 0;
  /// The CUDA device whose unified memory (cuMemAllocManaged) holds this backend's
  /// reservations, or -1 when they are not unified memory (every backend but `managed`). A Pager
  /// over unified memory also counts the driver's GPU page faults and migrations in its range,
  /// where CUPTI's unified-memory counters are available (Note [UVM counters] in the runtime).
  virtual int unified_memory_device() const noexcept { return -1; }

  /// Reserves `bytes` (a multiple of granularity()) of address space with no memory behind it.
  /// Throws SystemError / OutOfMemory.
  virtual Reservation reserve(std::uint64_t bytes) = 0;
  /// Creates the pool once. Throws OutOfMemory / SystemError.
  virtual std::unique_ptr<PhysicalPool> create_pool(std::size_t chunks,
                                                    std::uint64_t chunk_bytes) = 0;

  /// Maps `chunk` at `addr` (chunk-aligned, inside a reservation, currently unmapped).
  virtual void map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) = 0;
  /// Maps every page of the batch, as map() does each: the addresses chunk-aligned, inside
  /// reservations, currently unmapped and distinct, in any order. All or nothing: on an error,
  /// the pages this call mapped are unmapped again before it throws, so none of the batch is
  /// left mapped. Afterwards each page is unmapped on its own, as one mapped by map(). The
  /// default calls map() for each page; the cuda backend sets access once per run of adjacent
  /// addresses.
  virtual void map_pages(PhysicalPool& pool, std::span<const PageMapping> pages, Access access);
  /// Unmaps [addr, addr + bytes); the range stays reserved and inaccessible, or holds what the
  /// UnmappedPages source given to set_unmapped_pages() places there.
  virtual void unmap(std::byte* addr, std::uint64_t bytes) = 0;
  /// From now on unmap() asks `pages` for what an unmapped page becomes; nullptr goes back to
  /// the backend's inaccessible memory. Only host-memory backends take a source (the others
  /// return false and keep theirs: a device page cannot be demand-filled by a host thread). No
  /// map/unmap may run concurrently with this call, and `pages` must outlive every unmap() that
  /// uses it.
  virtual bool set_unmapped_pages(UnmappedPages* pages) noexcept {
    (void)pages;
    return false;
  }

  /// Whether written_bytes() works: pages mapped Access::read_write keep their writes apart
  /// from the chunk and the backend can tell which were written. The host backend can; device
  /// backends cannot (their pages are mapped read-only).
  virtual bool tracks_writes() const noexcept { return false; }
  /// Bytes of [addr, addr + bytes) (mapped read_write, currently mapped) written since the map,
  /// in whole system pages; 0 when nothing was. Throws InvalidArgument where !tracks_writes().
  virtual std::uint64_t written_bytes(const std::byte* addr, std::uint64_t bytes);

  /// A staging buffer of at least `bytes` for copy_to_chunk().
  virtual std::unique_ptr<StagingBuffer> allocate_staging(std::uint64_t bytes) = 0;
  /// Copies `src` (inside a staging buffer) to `offset` in `chunk` on the copy queue. The
  /// returned fence completes when the copy did; `src` must stay untouched until then.
  virtual Fence copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                              std::span<const std::byte> src) = 0;

  /// Records a fence at the current end of `queue`'s work.
  virtual Fence record_fence(Queue queue) = 0;
  /// Non-blocking: has the work before `fence` completed?
  virtual bool fence_complete(const Fence& fence) = 0;
  /// Blocks until `fence` completed.
  virtual void wait_fence(const Fence& fence) = 0;
  /// Makes `queue` wait for `fence` without blocking the host.
  virtual void queue_wait(Queue queue, const Fence& fence) = 0;

 protected:
  friend class Reservation;
  /// Gives back a range obtained from reserve(). Must not throw.
  virtual void release(std::byte* base, std::uint64_t bytes) noexcept = 0;
};

inline Reservation& Reservation::operator=(Reservation&& o) noexcept {
  if (this != &o) {
    reset();
    backend_ = std::exchange(o.backend_, nullptr);
    base_ = std::exchange(o.base_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

inline void Backend::map_pages(PhysicalPool& pool, std::span<const PageMapping> pages,
                               Access access) {
  std::size_t mapped = 0;
  try {
    for (; mapped < pages.size(); ++mapped)
      map(pool, pages[mapped].chunk, pages[mapped].addr, access);
  } catch (...) {
    // The map's error is the one reported; an unmap failing as well is not its cause.
    while (mapped-- > 0) {
      try {
        unmap(pages[mapped].addr, pool.chunk_bytes());
      } catch (...) {
      }
    }
    throw;
  }
}

inline std::uint64_t Backend::written_bytes(const std::byte*, std::uint64_t) {
  throw InvalidArgument("the " + std::string(name()) +
                        " backend cannot tell which weight pages were written");
}

inline void Reservation::reset() noexcept {
  if (base_ != nullptr && backend_ != nullptr) backend_->release(base_, bytes_);
  backend_ = nullptr;
  base_ = nullptr;
  bytes_ = 0;
}

/// Where the host backend's pool memory comes from.
enum class HostPages {
  base,  ///< ordinary shared memory: 4 KiB page-table entries, 512 to map and unmap per 2 MiB
  huge,  ///< the kernel's hugetlb pool (MFD_HUGETLB): one entry per huge page; the system must
         ///< have enough free huge pages for the whole pool (vm.nr_hugepages)
};

/// The host backend (mmap + memfd). `granularity` defaults to 2 MiB (see host_backend.cpp); any
/// power-of-two multiple of the OS page size is accepted (tests use 4 KiB pages for speed), with
/// HostPages::huge any multiple of the system's huge page size. Throws InvalidArgument for
/// another value.
std::unique_ptr<Backend> make_host_backend(std::uint64_t granularity = std::uint64_t{2} << 20,
                                           HostPages pages = HostPages::base);

/// The system's default huge page size and how many of them a new mapping can still take (free
/// and not yet promised to a mapping, plus the overcommit headroom), from /sys/kernel/mm/hugepages;
/// both zero where the kernel has no hugetlb pool.
struct HugePagePool {
  std::uint64_t page_bytes = 0;
  std::uint64_t available = 0;
};
HugePagePool huge_page_pool();

}  // namespace lema::runtime
