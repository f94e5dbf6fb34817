// The guard-mode fault fallback: a read of a weight's address outside any acquire (numpy,
// torch.save, a compiled kernel, a write(2) from the range) is served by demand paging through
// the Pager instead of killing the process (Note [Guard fault fallback] in guard_fallback.cpp).
//
// Host backend only. arm() registers the whole reservation with a userfaultfd and becomes the
// backend's UnmappedPages source, so that every unmapped page is registered placeholder memory;
// a touch of one blocks in the kernel until the handler has made the page resident through
// Pager::fault_in (filled through the pool window, mapped over the placeholder, not pinned) and
// woken it.
//
// Lifetime: arm after the Pager is built and before its first acquire; call stop_serving()
// before the Pager is destroyed and destroy the fallback after it (the Pager's teardown unmaps
// pages through place(), which needs the event reader). No thread may touch the range once
// stop_serving() was called.
//
// Thread safety: place() from any threads (the pager calls it under its lock); the rest from
// the owner.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "lema/runtime/backend.hpp"
#include "lema/runtime/pager.hpp"

namespace lema::runtime::detail {

class GuardFallback final : public UnmappedPages {
 public:
  struct Options {
    // How long the handler waits for a chunk while every chunk of the budget is pinned (by the
    // faulting thread itself, typically) before giving up on the access.
    std::chrono::nanoseconds patience = std::chrono::seconds(10);
    // Names the file and tensor of a page in the one line logged when an access fails.
    std::string source;
  };

  /// Arms the fallback over `pager`'s address space. Returns nullptr and sets `reason` when
  /// userfaultfd (with UFFD_FEATURE_EVENT_REMAP) is not available here or the backend keeps no
  /// host placeholder; the range then stays PROT_NONE when unmapped, as without the fallback.
  static std::unique_ptr<GuardFallback> arm(Pager& pager, Options options, std::string& reason);

  GuardFallback(const GuardFallback&) = delete;
  GuardFallback& operator=(const GuardFallback&) = delete;
  /// Gives the backend back its own placeholder, makes the range's placeholders PROT_NONE,
  /// stops the threads and closes the userfaultfd.
  ~GuardFallback() override;

  /// Joins the fault worker; faults arriving later get SIGSEGV. Idempotent.
  void stop_serving() noexcept;
  /// True when faults of system calls (write(2) from the range) are served too, false when the
  /// process may only handle user-mode faults (such a call fails with EFAULT on a missing page).
  bool handles_kernel_faults() const noexcept;

  void place(std::byte* addr, std::uint64_t bytes) override;

  struct State;

 private:
  explicit GuardFallback(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace lema::runtime::detail
