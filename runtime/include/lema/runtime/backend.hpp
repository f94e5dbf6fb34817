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
//  - a fill writes into a chunk either through its host-visible window
//    (capabilities().host_window: host, managed) or, for device memory, from a staging buffer with copy_to_chunk() on the
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
// What each backend is, and how the public entry points check preconditions once for all of
// them: BackendCapabilities and Note [Backend contract] below.
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
  /// True between Backend::release_pool_memory() and restore_pool_memory().
  bool memory_released() const noexcept { return memory_released_; }

 private:
  friend class Backend;
  bool memory_released_ = false;
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

/// What a backend is, stated once (Note [Backend contract]); the pager and the tests ask this
/// instead of probing (a pool's window, a device number).
struct BackendCapabilities {
  /// How map/unmap act on a page's address.
  enum class Residency : std::uint8_t {
    /// map makes the chunk's bytes appear at the address; unmap takes them away again, the
    /// address staying reserved and inaccessible (host, cuda).
    mapped,
    /// Unified memory (managed): every reserved address always has memory behind it, which
    /// cannot be moved to another address. map copies the chunk's bytes to the address and
    /// makes the page resident on the device; unmap moves its residency back to the host and
    /// the bytes stay readable there. The pool only counts the budget.
    unified,
  };
  Residency residency = Residency::mapped;
  /// Pool chunks have a host pointer (PhysicalPool::window() != nullptr), where fills write;
  /// otherwise fills go through staging and copy_to_chunk.
  bool host_window = false;
  /// Mapped pages can be read by the CPU at their model address.
  bool host_accessible = false;
  /// Pages are the process's own host mappings (mmap): the kernel's tools see them
  /// (/proc/self/maps, userfaultfd, fork), and set_unmapped_pages() takes a placeholder source.
  bool host_pages = false;
  /// written_bytes() works: pages mapped Access::read_write keep their writes apart from the
  /// chunk and the backend can tell which were written.
  bool tracks_writes = false;
  /// The CUDA device whose unified memory holds the reservations (Residency::unified), else -1.
  /// A Pager over unified memory also counts the driver's GPU page faults and migrations in its
  /// range (Note [UVM counters] in the runtime).
  int unified_memory_device = -1;
};

// Note [Backend contract]
// ~~~~~~~~~~~~~~~~~~~~~~~
// Every operation is a public, non-virtual member that checks the caller's preconditions once
// (sizes are positive multiples of the granularity, chunks inside the pool, addresses aligned,
// copies inside their chunk, written_bytes only where tracked) and then calls the backend's
// private virtual do_*(), as rmm's device_memory_resource does: a backend implements only the
// primitive, never re-checks, and a caller's mistake gets the same InvalidArgument from every
// backend. The queries (name, granularity, capabilities) are virtual and have no
// preconditions. What a backend is (host pages or device memory, a host window, unified
// memory) is its BackendCapabilities, not something callers infer; create_pool checks that the
// pool agrees with them. Unified memory (managed) is a Backend with Residency::unified rather
// than a tier of its own: the pager's fill, budget, policy and fences apply to it unchanged,
// and only what unmap leaves behind differs, which the capability states. The one conformance
// suite (tests/runtime/backend_conformance_test.cpp) holds every backend to this, with the
// cases that need a capability gated on it.
class Backend {
 public:
  virtual ~Backend() = default;
  /// "host", "cuda", ...
  virtual std::string_view name() const noexcept = 0;
  /// Smallest unit of reserve/map (2 MiB on the host, by convention; see layout.hpp).
  virtual std::uint64_t granularity() const noexcept = 0;
  /// What this backend is (Note [Backend contract]).
  virtual BackendCapabilities capabilities() const noexcept = 0;

  // Shorthands for capabilities().
  bool host_accessible() const noexcept { return capabilities().host_accessible; }
  int unified_memory_device() const noexcept { return capabilities().unified_memory_device; }
  bool tracks_writes() const noexcept { return capabilities().tracks_writes; }

  /// Reserves `bytes` (a positive multiple of granularity()) of address space with no memory
  /// behind it (Residency::unified: with memory, see above). Throws SystemError / OutOfMemory.
  Reservation reserve(std::uint64_t bytes);
  /// Creates the pool once: `chunks` > 0 chunks of `chunk_bytes`, a positive multiple of the
  /// granularity. Throws OutOfMemory / SystemError.
  std::unique_ptr<PhysicalPool> create_pool(std::size_t chunks, std::uint64_t chunk_bytes);

  /// Note [Released pool memory]: gives the memory of every chunk of `pool` back (to the OS on
  /// the host, to the device on cuda) and keeps the pool object, its chunk count and size; the
  /// chunks' bytes are lost. No chunk may be mapped (the caller's precondition: the Pager unmaps
  /// every page first). Until restore_pool_memory(), map, map_pages and copy_to_chunk on the
  /// pool throw InvalidArgument. Throws InvalidArgument when already released, and
  /// InvalidArgument naming the backend where it cannot release (managed: unified memory is
  /// behind every reserved address, not in the pool, so there is nothing the pool could give
  /// back without giving up the addresses).
  void release_pool_memory(PhysicalPool& pool);
  /// Makes the pool's memory again after release_pool_memory(); the chunks' bytes are
  /// undefined until filled. Throws InvalidArgument when not released, OutOfMemory when the
  /// memory is gone meanwhile (the pool then stays released and may be restored again).
  void restore_pool_memory(PhysicalPool& pool);

  /// Maps `chunk` at `addr` (granularity-aligned, inside a reservation, currently unmapped).
  void map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access);
  /// Maps every page of the batch, as map() does each: the addresses granularity-aligned, inside
  /// reservations, currently unmapped and distinct, in any order. All or nothing: on an error,
  /// the pages this call mapped are unmapped again before it throws, so none of the batch is
  /// left mapped. Afterwards each page is unmapped on its own, as one mapped by map(). The
  /// default calls map() for each page; the cuda backend sets access once per run of adjacent
  /// addresses.
  void map_pages(PhysicalPool& pool, std::span<const PageMapping> pages, Access access);
  /// Unmaps [addr, addr + bytes) (granularity-aligned); the range stays reserved and
  /// inaccessible, or holds what the UnmappedPages source given to set_unmapped_pages() places
  /// there. Residency::unified: the bytes stay readable at their address (on the host).
  void unmap(std::byte* addr, std::uint64_t bytes);
  /// From now on unmap() asks `pages` for what an unmapped page becomes; nullptr goes back to
  /// the backend's inaccessible memory. Only backends with host_pages take a source (the others
  /// return false and keep theirs: a device page cannot be demand-filled by a host thread). No
  /// map/unmap may run concurrently with this call, and `pages` must outlive every unmap() that
  /// uses it.
  bool set_unmapped_pages(UnmappedPages* pages) noexcept;

  /// Bytes of [addr, addr + bytes) (mapped read_write, currently mapped) written since the map,
  /// in whole system pages; 0 when nothing was. Throws InvalidArgument where !tracks_writes.
  std::uint64_t written_bytes(const std::byte* addr, std::uint64_t bytes);

  /// A staging buffer of at least `bytes` (> 0) for copy_to_chunk().
  std::unique_ptr<StagingBuffer> allocate_staging(std::uint64_t bytes);
  /// Makes [p, p + bytes) (memory the caller mapped, page-aligned) a valid source of
  /// copy_to_chunk() straight from where it is (the cuda backends pin it, Note [Registered shared
  /// tier] in fill_pipeline.cpp). False where the backend does not or cannot (said in one
  /// warning line): copy through staging instead. Never throws.
  bool register_host(std::byte* p, std::uint64_t bytes) noexcept {
    return do_register_host(p, bytes);
  }
  /// Undoes register_host(p, ...) once no copy reads it; before the memory is unmapped.
  void unregister_host(std::byte* p) noexcept { do_unregister_host(p); }
  /// Copies `src` (inside a staging buffer) to `offset` in `chunk` on the copy queue; the copy
  /// must lie inside the chunk. The returned fence completes when the copy did; `src` must
  /// stay untouched until then.
  Fence copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                      std::span<const std::byte> src);

  /// Records a fence at the current end of `queue`'s work.
  Fence record_fence(Queue queue) { return do_record_fence(queue); }
  /// Non-blocking: has the work before `fence` completed?
  bool fence_complete(const Fence& fence) { return do_fence_complete(fence); }
  /// Blocks until `fence` completed.
  void wait_fence(const Fence& fence) { do_wait_fence(fence); }
  /// Makes `queue` wait for `fence` without blocking the host.
  void queue_wait(Queue queue, const Fence& fence) { do_queue_wait(queue, fence); }

 protected:
  /// Default: do_map() for each page, unmapping the ones mapped when one fails. Protected so
  /// that a backend wrapping another may call it.
  virtual void do_map_pages(PhysicalPool& pool, std::span<const PageMapping> pages,
                            Access access);

 private:
  friend class Reservation;
  // The primitives, called with the preconditions above already checked.
  virtual Reservation do_reserve(std::uint64_t bytes) = 0;
  virtual std::unique_ptr<PhysicalPool> do_create_pool(std::size_t chunks,
                                                       std::uint64_t chunk_bytes) = 0;
  virtual void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) = 0;
  virtual void do_unmap(std::byte* addr, std::uint64_t bytes) = 0;
  /// Called only where capabilities().host_pages.
  virtual bool do_set_unmapped_pages(UnmappedPages* pages) noexcept {
    (void)pages;
    return false;
  }
  /// Called only where capabilities().tracks_writes.
  virtual std::uint64_t do_written_bytes(const std::byte* addr, std::uint64_t bytes) {
    (void)addr;
    (void)bytes;
    return 0;
  }
  /// Default: the backend cannot release its pool's memory (InvalidArgument naming it).
  virtual void do_release_pool_memory(PhysicalPool& pool);
  virtual void do_restore_pool_memory(PhysicalPool& pool);
  virtual std::unique_ptr<StagingBuffer> do_allocate_staging(std::uint64_t bytes) = 0;
  virtual bool do_register_host(std::byte*, std::uint64_t) noexcept { return false; }
  virtual void do_unregister_host(std::byte*) noexcept {}
  virtual Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                                 std::span<const std::byte> src) = 0;
  virtual Fence do_record_fence(Queue queue) = 0;
  virtual bool do_fence_complete(const Fence& fence) = 0;
  virtual void do_wait_fence(const Fence& fence) = 0;
  virtual void do_queue_wait(Queue queue, const Fence& fence) = 0;
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
