#include "page_table.hpp"

#include <algorithm>
#include <string>
#include <utility>

#include "lema/base/error.hpp"

namespace lema::runtime {

PageTable::PageTable(std::size_t pages, std::size_t chunks)
    : pages_(pages), owner_(chunks, kNoPage) {
  free_.reserve(chunks);
  // Handed out from the back: chunk 0 first.
  for (std::size_t c = chunks; c-- > 0;) free_.push_back(static_cast<std::uint32_t>(c));
}

std::size_t PageTable::absent_count(std::span<const PageId> pages) const {
  std::size_t n = 0;
  for (PageId p : pages) n += pages_[p].state == PageState::absent ? 1 : 0;
  return n;
}

std::uint32_t PageTable::take_free_chunk() {
  LEMA_ASSERT(!free_.empty(), "a chunk was taken from an empty free list");
  const std::uint32_t chunk = free_.back();
  free_.pop_back();
  return chunk;
}

void PageTable::claim(PageId page, std::uint32_t chunk, bool prefetched) {
  PageEntry& e = pages_[page];
  LEMA_ASSERT(e.state == PageState::absent && owner_[chunk] == kNoPage,
              "page " + std::to_string(page) + " claimed chunk " + std::to_string(chunk) +
                  " while not absent, or the chunk has an owner");
  e.state = PageState::filling;
  e.chunk = chunk;
  e.prefetched = prefetched;
  owner_[chunk] = page;
}

void PageTable::fill_succeeded(PageId page, const Fence& ready) {
  PageEntry& e = pages_[page];
  LEMA_ASSERT(e.state == PageState::filling, "a fill of page " + std::to_string(page) +
                                                 " was published while the page is not filling");
  ++e.fills_done;
  e.fill_error = nullptr;
  e.fill_failed = false;
  e.state = PageState::resident;
  e.ready = ready;
  // Not unmapped, nor its chunk reused, while the copy may still write it.
  if (!ready.trivially_complete()) e.fences.push_back(ready);
}

void PageTable::fill_failed(PageId page, std::exception_ptr error) {
  PageEntry& e = pages_[page];
  LEMA_ASSERT(e.state == PageState::filling, "a fill of page " + std::to_string(page) +
                                                 " was published while the page is not filling");
  ++e.fills_done;
  e.fill_error = std::move(error);
  e.fill_failed = true;
  // The page stays unmapped and its chunk goes back to the free list; its waiters get the error
  // and a later acquire retries the read (Note [Failed fills]).
  e.state = PageState::absent;
  e.prefetched = false;
  owner_[e.chunk] = kNoPage;
  free_.push_back(e.chunk);
}

std::uint32_t PageTable::evicted(PageId page) {
  PageEntry& e = pages_[page];
  LEMA_ASSERT(e.state == PageState::resident && e.pins == 0,
              "page " + std::to_string(page) + " was evicted while not resident or pinned");
  const std::uint32_t chunk = e.chunk;
  e.state = PageState::absent;
  e.prefetched = false;
  e.fences.clear();
  e.ready = Fence{};
  owner_[chunk] = kNoPage;
  return chunk;
}

void PageTable::free_chunk(std::uint32_t chunk) {
  LEMA_ASSERT(owner_[chunk] == kNoPage,
              "chunk " + std::to_string(chunk) + " was freed while a page owns it");
  free_.push_back(chunk);
}

void PageTable::pin(PageId page, std::thread::id owner) {
  ++pages_[page].pins;
  ++pins_by_thread_[owner][page];
}

void PageTable::unpin(std::span<const PageId> pages, std::thread::id owner, const Fence* last_use) {
  auto mine = pins_by_thread_.find(owner);
  for (PageId p : pages) {
    PageEntry& e = pages_[p];
    if (e.pins > 0) --e.pins;
    if (last_use != nullptr) e.fences.push_back(*last_use);
    if (mine != pins_by_thread_.end()) {
      auto it = mine->second.find(p);
      if (it != mine->second.end() && --it->second == 0) mine->second.erase(it);
    }
  }
  if (mine != pins_by_thread_.end() && mine->second.empty()) pins_by_thread_.erase(mine);
}

void PageTable::forget_owner(std::span<const PageId> pages, std::thread::id owner) {
  auto mine = pins_by_thread_.find(owner);
  if (mine == pins_by_thread_.end()) return;
  for (PageId p : pages) {
    auto it = mine->second.find(p);
    if (it != mine->second.end() && --it->second == 0) mine->second.erase(it);
  }
  if (mine->second.empty()) pins_by_thread_.erase(mine);
}

std::size_t PageTable::pins_outside(std::thread::id owner, std::span<const PageId> request) const {
  auto it = pins_by_thread_.find(owner);
  if (it == pins_by_thread_.end()) return 0;
  std::size_t n = 0;
  for (const auto& [page, count] : it->second)
    if (count > 0 && !std::binary_search(request.begin(), request.end(), page)) ++n;
  return n;
}

}  // namespace lema::runtime
