#include "pointer_table.hpp"

#include <sched.h>
#include <sys/mman.h>

namespace lema::preload {

bool PointerTable::init(std::uint64_t entries) noexcept {
  void* p = ::mmap(nullptr, entries * sizeof(Slot), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  slots_ = static_cast<Slot*>(p);  // zero-filled: every slot empty
  mask_ = entries - 1;
  max_used_ = entries / 4 * 3;
  return true;
}

void PointerTable::lock() noexcept {
  for (unsigned spins = 0; lock_.exchange(true, std::memory_order_acquire);) {
    while (lock_.load(std::memory_order_relaxed)) {
      if (++spins > 64) sched_yield();
    }
  }
}

void PointerTable::unlock() noexcept {
  lock_.store(false, std::memory_order_release);
}

std::size_t PointerTable::home(std::uintptr_t key) const noexcept {
  // Allocations are aligned to at least 256 bytes: Fibonacci hashing spreads the high bits.
  return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
}

PointerTable::Reserve PointerTable::reserve(std::uint64_t bytes, std::uint64_t budget) noexcept {
  lock();
  Reserve r = Reserve::ok;
  if (budget && (bytes > budget || counters_.in_use > budget - bytes)) {
    ++counters_.refused;
    r = Reserve::over_budget;
  } else if (used_ >= max_used_) {
    ++counters_.table_full;
    r = Reserve::full;
  } else {
    ++used_;
    counters_.in_use += bytes;
    if (counters_.in_use > counters_.peak) counters_.peak = counters_.in_use;
  }
  unlock();
  return r;
}

void PointerTable::cancel(std::uint64_t bytes) noexcept {
  lock();
  --used_;
  counters_.in_use -= bytes;
  unlock();
}

void PointerTable::insert(std::uintptr_t ptr, std::uint64_t bytes) noexcept {
  lock();
  std::size_t i = home(ptr);
  while (slots_[i].key != 0 && slots_[i].key != ptr) i = (i + 1) & mask_;
  if (slots_[i].key == ptr) {
    // The runtime handed out an address the table still holds: an earlier allocation was freed
    // behind the hook's back. Its bytes leave the count with it; the slot reserved is unused.
    counters_.in_use -= slots_[i].bytes;
    --used_;
  }
  slots_[i] = {ptr, bytes};
  ++counters_.managed_allocs;
  counters_.managed_bytes += bytes;
  for (std::uintptr_t& r : recent_)
    if (r == ptr) r = 0;
  unlock();
}

bool PointerTable::remove(std::uintptr_t ptr, std::uint64_t* bytes) noexcept {
  if (ptr == 0) return false;
  lock();
  std::size_t i = home(ptr);
  while (slots_[i].key != 0 && slots_[i].key != ptr) i = (i + 1) & mask_;
  if (slots_[i].key == 0) {
    unlock();
    return false;
  }
  *bytes = slots_[i].bytes;
  counters_.in_use -= slots_[i].bytes;
  ++counters_.frees;
  --used_;
  // Backward-shift deletion: move later entries of the probe run into the hole when their home
  // does not lie cyclically in (hole, their position].
  std::size_t hole = i;
  for (std::size_t j = (i + 1) & mask_; slots_[j].key != 0; j = (j + 1) & mask_) {
    const std::size_t h = home(slots_[j].key);
    const bool stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
    if (stays) continue;
    slots_[hole] = slots_[j];
    hole = j;
  }
  slots_[hole] = {0, 0};
  recent_[recent_next_] = ptr;
  recent_next_ = (recent_next_ + 1) % kRecent;
  unlock();
  return true;
}

bool PointerTable::recently_freed(std::uintptr_t ptr) noexcept {
  lock();
  bool found = false;
  for (std::uintptr_t r : recent_) found |= ptr != 0 && r == ptr;
  unlock();
  return found;
}

TableCounters PointerTable::counters() noexcept {
  lock();
  TableCounters c = counters_;
  unlock();
  return c;
}

std::uint64_t PointerTable::in_use() noexcept {
  lock();
  const std::uint64_t v = counters_.in_use;
  unlock();
  return v;
}

}  // namespace lema::preload
