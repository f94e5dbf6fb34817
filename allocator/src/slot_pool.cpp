#include "lema/allocator/slot_pool.hpp"

#include <algorithm>
#include <limits>
#include <string>

#include "lema/allocator/limit_adaptor.hpp"
#include "lema/base/error.hpp"

namespace lema::allocator {
namespace {

constexpr std::size_t kMaxSlotAlignment = 4096;

std::size_t alignment_of(std::size_t slot_bytes) {
  const std::size_t lowest_bit = slot_bytes & (~slot_bytes + 1);
  return lowest_bit < kMaxSlotAlignment ? lowest_bit : kMaxSlotAlignment;
}

std::size_t checked_chunk_bytes(const SlotPoolOptions& o) {
  LEMA_EXPECTS(o.slot_bytes > 0, "SlotPool slot_bytes is 0; give the size of one slot");
  LEMA_EXPECTS(o.slots_per_chunk > 0,
               "SlotPool slots_per_chunk is 0; give how many slots to take at once");
  LEMA_EXPECTS(o.slots_per_chunk <= std::numeric_limits<std::size_t>::max() / o.slot_bytes,
               "SlotPool chunk of " + std::to_string(o.slots_per_chunk) + " slots of " +
                   std::to_string(o.slot_bytes) +
                   " bytes overflows; lower slot_bytes or slots_per_chunk");
  return o.slot_bytes * o.slots_per_chunk;
}

}  // namespace

SlotPool::SlotPool(std::unique_ptr<MemoryResource> upstream, SlotPoolOptions options)
    : upstream_(std::move(upstream)),
      options_(options),
      slot_alignment_(options.slot_bytes > 0 ? alignment_of(options.slot_bytes) : 1),
      chunk_bytes_(checked_chunk_bytes(options)) {
  LEMA_EXPECTS(upstream_ != nullptr, "SlotPool needs an upstream resource, got null");
}

// Note [A slot still out keeps its chunk]: a slot that was never given back may still be read
// by a device (the pager leaks a staging buffer whose copy it could not see finish, rather than
// free memory a DMA engine may still read). Freeing its chunk would free that slot with it, so
// only chunks whose every slot is back are given to the upstream; the others are leaked whole.
SlotPool::~SlotPool() {
  std::sort(free_.begin(), free_.end(), std::less<>());
  for (void* chunk : chunks_) {
    auto* first = static_cast<unsigned char*>(chunk);
    const auto lo = std::lower_bound(free_.begin(), free_.end(), first, std::less<>());
    const auto hi = std::lower_bound(lo, free_.end(), first + chunk_bytes_, std::less<>());
    if (static_cast<std::size_t>(hi - lo) == options_.slots_per_chunk) {
      upstream_->deallocate(chunk, chunk_bytes_, slot_alignment_);
    }
  }
}

std::size_t SlotPool::chunk_count() const {
  std::lock_guard lock(mutex_);
  return chunks_.size();
}

std::size_t SlotPool::free_slots() const {
  std::lock_guard lock(mutex_);
  return free_.size();
}

// Note [Grow under the lock]: a chunk is taken from the upstream with the pool's mutex held.
// Growing is rare (once per slots_per_chunk slots) and holding the lock makes threads that find
// the pool empty at once wait for one new chunk rather than each take one; the upstream's own
// locks are leaves below this one.
void* SlotPool::do_allocate(std::size_t bytes, std::size_t alignment) {
  if (!fits_slot(bytes, alignment)) return upstream_->allocate(bytes, alignment);
  std::lock_guard lock(mutex_);
  if (free_.empty()) {
    if (options_.max_chunks != 0 && chunks_.size() >= options_.max_chunks) {
      // Every slot is out: the pool's whole size is in use.
      throw OutOfMemory(bytes, chunks_.size() * chunk_bytes_, options_.max_chunks * chunk_bytes_);
    }
    chunks_.reserve(chunks_.size() + 1);  // before taking the chunk: nothing to undo after
    // Room for every slot the pool will have, so deallocate never reallocates (it cannot throw).
    free_.reserve((chunks_.size() + 1) * options_.slots_per_chunk);
    auto* chunk = static_cast<unsigned char*>(upstream_->allocate(chunk_bytes_, slot_alignment_));
    chunks_.push_back(chunk);
    // Pushed in reverse so the chunk's first slot is handed out first.
    for (std::size_t i = options_.slots_per_chunk; i-- > 0;) {
      free_.push_back(chunk + i * options_.slot_bytes);
    }
  }
  void* p = free_.back();
  free_.pop_back();
  return p;
}

void SlotPool::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept {
  if (!fits_slot(bytes, alignment)) {
    upstream_->deallocate(p, bytes, alignment);
    return;
  }
  std::lock_guard lock(mutex_);
  free_.push_back(p);  // capacity for every slot reserved when its chunk came in
}

}  // namespace lema::allocator
