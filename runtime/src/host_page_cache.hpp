// The staged host cache tier of a device pool: pages read from the files once stay in host
// staging memory (pinned on CUDA), so a later fill of the page copies from there instead of
// reading the files again. Slots are the backend's staging buffers, allocated on first use;
// least recently used unpinned slots are reused first.
//
// Thread safety: every member may be called from any thread. A slot handed out by pin_cached()
// or claim_for() is pinned until unpin() or abandon(): nobody else writes or reuses it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "lema/runtime/backend.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {

class HostPageCache {
 public:
  HostPageCache(Backend& backend, std::uint64_t page_size, std::size_t slots);

  std::size_t slot_count() const noexcept { return slots_.size(); }
  /// The slot holding `page`, pinned; nullopt when the page is not cached.
  std::optional<std::size_t> pin_cached(PageId page);
  /// A slot to read `page` into, pinned (the least recently used unpinned one, its old page
  /// forgotten); nullopt when every slot is pinned. The page must not be cached (ask
  /// pin_cached() first): InternalError otherwise.
  std::optional<std::size_t> claim_for(PageId page);
  /// The slot's bytes, page_size of them (allocates the staging buffer on first use).
  std::byte* data(std::size_t slot);
  /// The read into a claimed slot succeeded: it holds its page from now on. The slot stays
  /// pinned until unpin() (its copy to the device may still be running).
  void commit(std::size_t slot);
  /// Done with a slot from pin_cached(), or with a committed one: nothing copies from it now.
  void unpin(std::size_t slot);
  /// The read into a claimed slot failed: it holds no page. Unpins.
  void abandon(std::size_t slot);

 private:
  struct Slot {
    std::unique_ptr<StagingBuffer> buffer;
    PageId page = 0;
    bool holds_page = false;
    std::uint32_t pins = 0;
    std::list<std::size_t>::iterator lru;  // position in lru_ (front: most recently used)
  };
  void touch(Slot& slot);  // mutex_ held

  Backend& backend_;
  const std::uint64_t page_size_;
  std::mutex mutex_;
  std::vector<Slot> slots_;
  std::list<std::size_t> lru_;
  std::unordered_map<PageId, std::size_t> by_page_;
};

}  // namespace lema::runtime
