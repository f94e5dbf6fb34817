// The fork guard: host reservations become PROT_NONE in a forked child.
//
// Note [Fork]
// ~~~~~~~~~~~
// A child of fork() inherits the parent's mappings but none of what keeps them right: no
// userfaultfd registration (without UFFD_FEATURE_EVENT_FORK, which would make the parent's
// handler serve the child too), no pager. Its copy of a reservation would show wrong bytes: the
// guard fault fallback's placeholder memory reads as zeros once unregistered, and a mapped page
// still shares its pool chunk with the parent, which refills that chunk with another page
// whenever it evicts. So a pthread_atfork child handler makes every host reservation PROT_NONE
// in the child: a read there gets SIGSEGV, never wrong bytes. (MADV_DONTFORK on the reservation
// and on every mapping placed in it would do the same, at the cost of an madvise per map and a
// hole the child's own mmap could reuse.) The handler runs in the child before fork() returns,
// single-threaded, so it uses only mprotect and a lock-free table. A child that needs the
// weights opens the checkpoint itself.
#include "detail/fork_guard.hpp"

#include <pthread.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <array>
#include <atomic>
#include <mutex>

namespace lema::runtime {
namespace {

struct Slot {
  std::atomic<std::uintptr_t> base{0};
  std::atomic<std::uint64_t> bytes{0};
};

// More reservations than this at once is not a use case (one per open checkpoint and device);
// beyond it a warning says children may see the range.
constexpr std::size_t kSlots = 256;
std::array<Slot, kSlots> g_slots;

void protect_all_in_child() noexcept {
  for (Slot& s : g_slots) {
    const std::uintptr_t base = s.base.load(std::memory_order_acquire);
    const std::uint64_t bytes = s.bytes.load(std::memory_order_acquire);
    if (base != 0 && bytes != 0) ::mprotect(reinterpret_cast<void*>(base), bytes, PROT_NONE);
  }
}

}  // namespace

// Writers take this lock; the child handler only loads (a slot's size is stored before its
// base, and its base cleared first, so the child sees a complete slot or an empty one).
std::mutex g_writers;

void protect_in_children(std::byte* base, std::uint64_t bytes) noexcept {
  static std::once_flag once;
  std::call_once(once, [] { ::pthread_atfork(nullptr, nullptr, &protect_all_in_child); });
  std::lock_guard lock(g_writers);
  for (Slot& s : g_slots) {
    if (s.base.load(std::memory_order_relaxed) != 0) continue;
    s.bytes.store(bytes, std::memory_order_release);
    s.base.store(reinterpret_cast<std::uintptr_t>(base), std::memory_order_release);
    return;
  }
  spdlog::warn("more than {} host reservations at once: a process forked from here may read "
               "the one at {} and see stale bytes",
               kSlots, static_cast<void*>(base));
}

void forget_in_children(std::byte* base) noexcept {
  std::lock_guard lock(g_writers);
  for (Slot& s : g_slots) {
    if (s.base.load(std::memory_order_relaxed) != reinterpret_cast<std::uintptr_t>(base)) continue;
    s.base.store(0, std::memory_order_release);
    return;
  }
}

}  // namespace lema::runtime
