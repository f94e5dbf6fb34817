// Tells ThreadSanitizer about hand-overs of page contents that the kernel orders.
//
// Note [Orderings ThreadSanitizer cannot see]
// Two of the pager's hand-overs between threads go through system calls that TSan does not
// model:
// - A written page is saved to the spill store by a thread other than its writers, after the
//   page was write-protected or unmapped from the model range (UFFDIO_WRITEPROTECT, mprotect).
//   Every store made before that completed; a store made after it faults and waits. TSan sees
//   the saving read of 2 MiB race with each earlier store, one report per 8-byte word.
// - The guard's fault fallback serves a fault on its worker thread: the kernel queues the fault
//   (so what the faulting thread did before it happens before the serving), and the worker maps
//   the page and wakes the faulting thread (so the mapping happens before its read goes on).
//   TSan counts the mapping as a write by the worker, and every first read of a word by the
//   woken thread as a race with it; and the worker's reads of what the faulting thread wrote
//   (a logger it installed, say) as races too.
// Suppressing those reports by stack hid them but kept their cost: each report is still found
// and matched, about a second per page, so the tests of written pages took minutes under TSan.
// Instead both are made in a `KernelOrderedAccess` scope, where TSan checks none of the thread's
// accesses, and a mapping made in it resets the range's history instead of counting as a write.
// That hides no more than the suppressions did: they matched every report on these paths.
// Without TSan the scope compiles to nothing.
#pragma once

#if defined(__SANITIZE_THREAD__)
extern "C" {
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}
#endif

namespace lema::runtime::detail {

/// While alive, this thread's memory accesses (system calls' included) are not checked by TSan.
/// Only for a hand-over of page contents that the kernel orders (see the Note).
class KernelOrderedAccess {
 public:
#if defined(__SANITIZE_THREAD__)
  KernelOrderedAccess() noexcept { __tsan_ignore_thread_begin(); }
  ~KernelOrderedAccess() { __tsan_ignore_thread_end(); }
#else
  KernelOrderedAccess() noexcept {}  // user-provided: a scope guard, not an unused variable
#endif
  KernelOrderedAccess(const KernelOrderedAccess&) = delete;
  KernelOrderedAccess& operator=(const KernelOrderedAccess&) = delete;
};

}  // namespace lema::runtime::detail
