// What the hook gave out: pointer → size of every allocation it placed in managed memory (and
// of the program's own large managed allocations), with the bytes in use against the budget.
//
// Note [Pointer table]: a fixed-size open-addressing table (linear probing, deletion by
// backward shift, so no tombstones pile up), mapped once with mmap when the library loads:
// nothing on any hook's path allocates, and a full table is a reported pass-through, not a
// failure. One spin lock guards the table and the counters; it is held for a few dozen
// instructions and never across a call into the CUDA runtime. pthread_atfork handlers take it
// before a fork and release it on both sides, so a child forked while another thread was
// inside the table starts with a consistent table and a free lock. (A signal handler that
// allocated through the hook while its own thread held the lock would spin; the CUDA runtime is
// no more async-signal-safe than that.)
//
// A short ring remembers the last frees, so that a second free of one of them can be reported
// as a double free rather than as a pointer never seen.
//
// Thread safety: every method from any thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace lema::preload {

struct TableCounters {
  std::uint64_t in_use = 0;          // bytes given out and not freed (reservations included)
  std::uint64_t peak = 0;            // highest in_use
  std::uint64_t managed_allocs = 0;  // allocations placed in managed memory
  std::uint64_t managed_bytes = 0;   // their bytes, summed
  std::uint64_t frees = 0;           // of those, freed
  std::uint64_t refused = 0;         // refused: over the budget
  std::uint64_t table_full = 0;      // passed through: no room in the table
};

class PointerTable {
 public:
  /// Maps room for `entries` (a power of two). False when the mapping fails.
  bool init(std::uint64_t entries) noexcept;
  bool ready() const noexcept { return slots_ != nullptr; }

  enum class Reserve { ok, over_budget, full };
  /// Reserves `bytes` under `budget` (0: none) and a slot; undo with cancel() or complete with
  /// insert().
  Reserve reserve(std::uint64_t bytes, std::uint64_t budget) noexcept;
  void cancel(std::uint64_t bytes) noexcept;
  void insert(std::uintptr_t ptr, std::uint64_t bytes) noexcept;
  /// Removes `ptr`; its size in `*bytes`. False when it is not in the table.
  bool remove(std::uintptr_t ptr, std::uint64_t* bytes) noexcept;
  /// Whether `ptr` is one of the last frees of the table's pointers.
  bool recently_freed(std::uintptr_t ptr) noexcept;

  TableCounters counters() noexcept;
  std::uint64_t in_use() noexcept;

  void lock() noexcept;
  void unlock() noexcept;
  /// In a forked child: the lock was taken by the parent's fork handler; release it.
  void reset_after_fork() noexcept { lock_.store(false, std::memory_order_release); }

 private:
  struct Slot {
    std::uintptr_t key;  // 0: empty
    std::uint64_t bytes;
  };
  std::size_t home(std::uintptr_t key) const noexcept;

  Slot* slots_ = nullptr;
  std::uint64_t mask_ = 0;
  std::uint64_t used_ = 0;      // slots holding a key, plus reservations
  std::uint64_t max_used_ = 0;  // three quarters of the table: probes stay short
  TableCounters counters_{};
  static constexpr std::size_t kRecent = 64;
  std::uintptr_t recent_[kRecent] = {};
  std::size_t recent_next_ = 0;
  std::atomic<bool> lock_{false};
};

}  // namespace lema::preload
