#include "host_page_cache.hpp"

#include "lema/base/error.hpp"

namespace lema::runtime {

HostPageCache::HostPageCache(Backend& backend, std::uint64_t page_size, std::size_t slots)
    : backend_(backend), page_size_(page_size), slots_(slots) {
  for (std::size_t i = 0; i < slots; ++i) slots_[i].lru = lru_.insert(lru_.end(), i);
}

void HostPageCache::touch(Slot& slot) {
  lru_.splice(lru_.begin(), lru_, slot.lru);
}

std::optional<std::size_t> HostPageCache::pin_cached(PageId page) {
  std::lock_guard lock(mutex_);
  const auto it = by_page_.find(page);
  if (it == by_page_.end()) return std::nullopt;
  Slot& slot = slots_[it->second];
  ++slot.pins;
  touch(slot);
  return it->second;
}

std::optional<std::size_t> HostPageCache::claim_for(PageId page) {
  std::lock_guard lock(mutex_);
  LEMA_ASSERT(by_page_.count(page) == 0, "host cache: page already cached; pin it instead");
  // From the least recently used end; pinned slots are few (the fills in flight).
  for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
    Slot& slot = slots_[*it];
    if (slot.pins != 0) continue;
    if (slot.holds_page) by_page_.erase(slot.page);
    slot.holds_page = false;
    slot.page = page;
    slot.pins = 1;
    const std::size_t index = *it;
    touch(slot);
    return index;
  }
  return std::nullopt;
}

std::byte* HostPageCache::data(std::size_t index) {
  Slot& slot = slots_.at(index);
  // Only the pinning thread reaches here for this slot, so the allocation needs no lock.
  if (!slot.buffer) slot.buffer = backend_.allocate_staging(page_size_);
  return slot.buffer->bytes().data();
}

void HostPageCache::commit(std::size_t index) {
  std::lock_guard lock(mutex_);
  Slot& slot = slots_.at(index);
  slot.holds_page = true;
  by_page_[slot.page] = index;
}

void HostPageCache::unpin(std::size_t index) {
  std::lock_guard lock(mutex_);
  --slots_.at(index).pins;
}

void HostPageCache::abandon(std::size_t index) {
  std::lock_guard lock(mutex_);
  Slot& slot = slots_.at(index);
  slot.holds_page = false;
  --slot.pins;
  lru_.splice(lru_.end(), lru_, slot.lru);  // reused first
}

}  // namespace lema::runtime
