// VmmResource: anonymous memory in a reserved virtual range whose pages the runtime pages under
// a budget, so that what is allocated may exceed the memory it takes.
//
// A page gets physical memory on first touch, zero-filled; when the budget is full the pager
// evicts a cold page, keeping its bytes in the spill store (a private temporary file, or a
// memfd), and reads it back on the next touch (Note [Page source] in the runtime). Plain loads
// and stores from any code work: in fault mode a userfaultfd handler serves them, in guard mode
// the guard fault fallback does. Allocations are placed best-fit in the range, 256-byte
// granules, freed ranges coalesced and reused.
//
// Note [One budget]
// ~~~~~~~~~~~~~~~~~
// Weights and anonymous memory share a budget by sharing one pager: a MappedCheckpoint opened
// with MappedCheckpointOptions::anonymous_bytes lays the anonymous pages out after the weights
// in the same address space (Layout::append_anonymous), so one pool of budget / page_size
// chunks, one eviction policy and one spill store serve both, and the resident bytes of the two
// together never exceed the budget. A VmmResource over that checkpoint hands out its anonymous
// range. A budget object shared between two pagers was the alternative; it would need a second
// pool, a second policy and an arbitration between them for every eviction, where one pager
// already picks the coldest page among all of them. A VmmResource of its own opens anonymous
// memory with no checkpoint (MappedCheckpoint::open_anonymous).
//
// Writes from threads the pager does not know of: fault mode write-protects a dirty page before
// saving it, so a concurrent write waits and is never lost (Note [Written pages] in the
// runtime); it is the default. Guard mode (where userfaultfd write protection is missing, or a
// checkpoint opened in guard mode) saves a written page and then unmaps it: a write from
// another thread between the two is lost, so in guard mode a page must not be written by one
// thread while another thread's fault may evict it (single-threaded writers, or a budget that
// holds what runs at once).
//
// Thread safety: allocate and deallocate may be called from any threads (one mutex over the
// free list); the memory itself from any thread, as above.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "lema/allocator/memory_resource.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/runtime/stats.hpp"

namespace lema::allocator {

class RangeAllocator;

struct VmmOptions {
  /// Physical memory for the pages; at least one page.
  std::uint64_t budget_bytes = 0;
  /// Virtual bytes to hand out; 0: 64 × the budget, at least 1 GiB.
  std::uint64_t capacity_bytes = 0;
  /// nullopt: the host backend's granularity (2 MiB).
  std::optional<std::uint64_t> page_size;
  /// fault (userfaultfd, falling back to guard where refused) or guard; see the header.
  runtime::ResidencyMode mode = runtime::ResidencyMode::fault;
  runtime::PolicyKind policy = runtime::PolicyKind::lru;
  /// How errors name the budget and page size to the user.
  runtime::SettingNames setting_names;
};

class VmmResource final : public MemoryResource {
 public:
  /// Anonymous memory of its own. Throws BudgetError (budget under one page), InvalidArgument
  /// (settings), SystemError.
  explicit VmmResource(VmmOptions options);
  /// The anonymous range of `shared` (opened with anonymous_bytes), under its budget (Note
  /// [One budget]). `shared` must outlive this resource. Throws InvalidArgument when it has no
  /// anonymous range.
  explicit VmmResource(runtime::MappedCheckpoint& shared);
  ~VmmResource() override;

  /// The memory the pages live in (its stats(): resident bytes, spills, the budget).
  runtime::MappedCheckpoint& memory() noexcept { return *memory_; }
  const runtime::MappedCheckpoint& memory() const noexcept { return *memory_; }
  runtime::PagerStats stats() const { return memory_->stats(); }
  /// Virtual bytes this resource hands out, and how many of them are allocated now.
  std::uint64_t capacity() const noexcept;
  std::uint64_t bytes_in_use() const;
  /// Whether `p` lies in the range this resource hands out.
  bool contains(const void* p) const noexcept;

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;
  bool under_pressure() const;  // Note [Freed pages]

  std::unique_ptr<runtime::MappedCheckpoint> owned_;
  runtime::MappedCheckpoint* memory_;
  runtime::TensorAddress range_;
  std::unique_ptr<RangeAllocator> ranges_;
};

}  // namespace lema::allocator
