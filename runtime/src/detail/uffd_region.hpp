// A range of anonymous memory whose pages are filled on first touch by a userfaultfd handler
// thread, under a budget of resident pages: the host's `fault` residency mode.
//
// The range is page_count pages of page_size bytes (a multiple of the system page). A thread
// touching a missing page blocks in the kernel; the handler thread asks `fill(page, staging)` for
// the page's bytes, evicts a resident page first when the budget is full (the `choose_victim`
// callback picks it; by default the page filled longest ago), then installs the bytes with
// UFFDIO_COPY and wakes the waiting threads. Code that touches the range needs no hook at all.
//
// Thread safety: any thread may read or write the range and call evict(), prefetch() and stats()
// concurrently. Callbacks run with the region's lock held (fill and choose_victim on the handler
// thread, or on the thread calling prefetch()): they must not call back into the region or touch
// the range (the handler would wait for itself). The region must outlive every access. A
// faulting thread is ordered after the callbacks only by the kernel's wake, which ThreadSanitizer
// does not see: state the callbacks share with readers belongs under a lock.
//
// Note [Eviction under a reader]: a page may be evicted (MADV_DONTNEED) while another thread is
// reading it. That thread's next load of the page faults again and is served like any missing
// page, so it only ever sees the page's bytes: a page is either absent or holds exactly what fill
// produced (each system page is installed complete by UFFDIO_COPY; waiters are woken after the
// whole page is in). Correct by construction; it only costs another fill.
//
// Kernel accesses: the descriptor is created without UFFD_USER_MODE_ONLY when the process may do
// so, so that a syscall reading the range (write(2) from it) also waits for the fill. When only
// user-mode faults are permitted, such a syscall on a missing page fails with EFAULT;
// handles_kernel_faults() says which mode is in use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "lema/runtime/policy.hpp"

namespace lema::runtime::detail {

class UffdRegion {
 public:
  /// Writes the bytes of `page` into `staging` (page_size bytes).
  using Fill = std::function<void(PageId page, std::byte* staging)>;
  /// Picks the page to evict among `resident` (oldest fill first, never empty).
  using ChooseVictim = std::function<PageId(std::span<const PageId> resident)>;
  /// Keeps the bytes of a written page (page_size of them, at its address) before it is evicted.
  using Save = std::function<void(PageId page, const std::byte* bytes)>;
  /// Refuses the first write to a page: returns the error to record (the writer then gets
  /// SIGSEGV at the page, as for a failed fill), or an empty string to let the write through
  /// (a page written like any other: anonymous memory after read-only weights).
  using RefuseWrite = std::function<std::string(PageId page)>;

  struct Options {
    std::size_t page_count = 0;
    std::size_t page_size = std::size_t{2} << 20;
    std::size_t budget_pages = 0;  // at most this many pages resident at any time (>= 1)
    Fill fill;
    ChooseVictim choose_victim;  // empty: evict the page filled longest ago
    // Note [Written pages] in uffd_region.cpp. With `save`, a written page is saved before its
    // eviction (every resident page, where the kernel lacks write protection); with
    // `refuse_write`, writes are refused instead. Neither: writes are dropped at eviction.
    Save save;
    RefuseWrite refuse_write;
    bool write_protect = true;  // false: act as if the kernel had no write protection (tests)
  };

  struct Stats {
    std::uint64_t faults = 0;         // fault messages served by a fill
    std::uint64_t shared_faults = 0;  // fault messages for a page already filled (just a wake)
    std::uint64_t prefetches = 0;
    std::uint64_t evictions = 0;
    std::uint64_t fill_errors = 0;
    std::uint64_t write_faults = 0;     // first writes to a write-protected page
    std::uint64_t dirty_evictions = 0;  // evictions that saved the page first
    std::size_t resident_pages = 0;
    std::size_t peak_resident_pages = 0;
  };

  /// nullopt when userfaultfd can be used here; otherwise why not (EPERM, ENOSYS, a seccomp
  /// filter) and what to do, for a message before falling back to guard mode.
  static std::optional<std::string> unavailable_reason();

  /// Maps the range, registers it and starts the handler thread. Throws InvalidArgument for bad
  /// options, SystemError when userfaultfd or the mapping is refused.
  explicit UffdRegion(Options options);
  UffdRegion(UffdRegion&&) noexcept;
  UffdRegion& operator=(UffdRegion&&) noexcept;
  UffdRegion(const UffdRegion&) = delete;
  UffdRegion& operator=(const UffdRegion&) = delete;
  /// Stops the handler thread and unmaps the range. No thread may be using the range.
  ~UffdRegion();

  std::byte* data() const noexcept;
  std::size_t page_size() const noexcept;
  std::size_t page_count() const noexcept;
  std::size_t budget_pages() const noexcept;
  bool handles_kernel_faults() const noexcept;
  /// Whether pages are installed write-protected, so that the first write to each is seen.
  bool tracks_writes() const noexcept;

  /// Drops `page` (MADV_DONTNEED) so that its next touch faults again. No-op when not resident.
  void evict(PageId page);
  /// Drops `page` without saving it, whatever was written (its bytes are no longer wanted).
  /// Returns whether it was resident.
  bool discard(PageId page);
  /// Fills `page` now on the calling thread (evicting first when the budget is full) so that its
  /// first touch does not fault. Returns false when it was already resident. A fill error is
  /// thrown here and leaves the page absent (not poisoned); a page an earlier fault poisoned is
  /// accessible again once this succeeds.
  bool prefetch(PageId page);
  bool is_resident(PageId page) const;
  Stats stats() const;
  /// The first error a fill callback threw for a fault, empty if none. The faulting thread of a
  /// failed fill gets SIGSEGV at the page, after the error was logged (Note [Fill errors] in
  /// uffd_region.cpp).
  std::string first_error() const;

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace lema::runtime::detail
