// Filling chunks from the checkpoint files and mapping them. Runs without the pager's lock: a
// page in the `filling` state belongs to the one thread that claimed it, and so do its chunk and
// its (unmapped) model address.
#include <spdlog/spdlog.h>

#include <cstring>
#include <optional>

#include "pager_state.hpp"

namespace lema::runtime {
namespace {

// Zeroes the parts of the page no extent covers (gaps between tensors, the tail): a reused
// chunk still holds its previous page's bytes.
void zero_gaps(std::span<const FillExtent> extents, std::byte* page, std::uint64_t page_size) {
  std::uint64_t cursor = 0;
  for (const FillExtent& e : extents) {
    if (e.page_offset > cursor) std::memset(page + cursor, 0, e.page_offset - cursor);
    cursor = e.page_offset + e.length;
  }
  if (cursor < page_size) std::memset(page + cursor, 0, page_size - cursor);
}

std::vector<io::ReadRequest> requests_for(const Layout& layout, PageId page, std::byte* dest) {
  std::vector<io::ReadRequest> batch;
  for (const FillExtent& e : layout.extents(page))
    batch.push_back({e.file, e.file_offset, e.length, dest + e.page_offset});
  return batch;
}

// Copies to the device allowed in flight at once: the pinned staging memory they hold is
// bounded by this many pages (beyond the host cache tier's own slots).
constexpr std::size_t kCopiesInFlight = 16;

std::unique_ptr<StagingBuffer> take_staging(Pager::State& s) {
  retire_copies(s, kCopiesInFlight);
  {
    std::lock_guard lock(s.staging_mutex);
    if (!s.staging_free.empty()) {
      auto b = std::move(s.staging_free.back());
      s.staging_free.pop_back();
      return b;
    }
  }
  return s.backend->allocate_staging(s.page_size);
}

void give_back_staging(Pager::State& s, std::unique_ptr<StagingBuffer> b) {
  std::lock_guard lock(s.staging_mutex);
  s.staging_free.push_back(std::move(b));
}

}  // namespace

void fill_and_map(Pager::State& s, std::span<FillClaim> claims, FillOrigin origin) {
  const Layout& layout = *s.layout;
  HostPageCache* cache = s.host_cache.get();
  // Host-visible pools are filled in place through the pool window; device pools through host
  // memory (a slot of the host cache tier, else a staging buffer) and a copy on the backend's
  // copy queue.
  std::vector<std::unique_ptr<StagingBuffer>> staging(claims.size());
  std::vector<std::optional<std::size_t>> slot(claims.size());
  std::vector<bool> cached(claims.size(), false);  // the slot already holds the page: no read
  std::vector<bool> read_done(claims.size(), false);  // every byte of the page was read
  std::vector<io::ReadTicket> tickets(claims.size());
  std::vector<bool> spilled(claims.size(), false);  // read from the spill store, not the files
  for (std::size_t i = 0; i < claims.size(); ++i) {
    FillClaim& c = claims[i];
    try {
      std::byte* dest = s.pool->window(c.chunk);
      // Note [Dirty pages]: a page once written and evicted comes back from the spill store.
      if (s.spill && dest != nullptr && s.spill->holds(c.page)) {
        s.spill->read(c.page, dest);
        spilled[i] = true;
        continue;
      }
      if (dest == nullptr && cache != nullptr) {
        slot[i] = cache->pin_cached(c.page);
        cached[i] = slot[i].has_value();
        if (cached[i]) continue;
        slot[i] = cache->claim_for(c.page);
        if (slot[i]) dest = cache->data(*slot[i]);
      }
      if (dest == nullptr) {
        staging[i] = take_staging(s);
        dest = staging[i]->bytes().data();
      }
      zero_gaps(layout.extents(c.page), dest, s.page_size);
      std::vector<io::ReadRequest> requests = requests_for(layout, c.page, dest);
      // A demand fault's caller waits anyway: what the page cache holds is copied on its own
      // thread, without the two hand-offs to the reader's threads and back.
      if (origin == FillOrigin::demand) requests = s.reader->read_cached(std::move(requests));
      // All pages' remaining reads are in flight together; they complete in any order.
      if (!requests.empty()) tickets[i] = s.reader->submit(std::move(requests));
    } catch (...) {
      c.error = std::current_exception();
    }
  }
  std::vector<std::size_t> to_map;  // claims whose page is in its chunk (or on its way there)
  to_map.reserve(claims.size());
  for (std::size_t i = 0; i < claims.size(); ++i) {
    FillClaim& c = claims[i];
    if (c.error) continue;
    try {
      if (tickets[i].valid()) tickets[i].wait();
      read_done[i] = !cached[i];
      const std::byte* source = staging[i]   ? staging[i]->bytes().data()
                                : slot[i] ? cache->data(*slot[i])
                                          : nullptr;
      if (source != nullptr) {
        // Note [Device fills]: the copy is left running on the backend's copy queue. The page
        // is mapped right after the batch's copies were issued (a host-side call), not once
        // they completed, but read only by work that waits for `ready`: the acquirer's
        // consumer queue, or the acquirer itself on the host. The host memory it copies from
        // is given back once it completed (retire_copies).
        c.ready = s.backend->copy_to_chunk(*s.pool, c.chunk, 0,
                                           std::span<const std::byte>(source, s.page_size));
        if (slot[i] && !cached[i]) cache->commit(*slot[i]);
        std::lock_guard lock(s.staging_mutex);
        s.copies_in_flight.push_back({c.ready, std::move(staging[i]), slot[i]});
        slot[i].reset();
      }
      to_map.push_back(i);
    } catch (const io::ReadError& e) {
      // A copy owned by this thread: the original is shared with the reader's thread, which
      // may free it after this function returns.
      c.error = std::make_exception_ptr(io::ReadError(e));
    } catch (...) {
      c.error = std::current_exception();
    }
  }
  // Note [Map after fill]: on a host-visible pool a page appears at its model address only once
  // every byte of it is in its chunk, so no reader of the model address can ever see a partial
  // page. The pages of the batch are mapped together, after all their reads (and copy issues),
  // in one map_pages call, which lets a device backend set access once per run of adjacent
  // pages (Note [Access per run] in the cuda backend). The first page is thus mapped only when
  // the last read is done; nothing waits for it earlier: a demand fault's caller waits for
  // every claim, and both callers publish the batch only after this function returns.
  if (!to_map.empty()) {
    std::vector<PageMapping> batch;
    batch.reserve(to_map.size());
    for (std::size_t i : to_map)
      batch.push_back({claims[i].chunk, s.space->page_address(claims[i].page)});
    // Counted before the map so the peak can never miss a mapped page.
    for (std::size_t n = 0; n < to_map.size(); ++n) s.counters.page_mapped();
    try {
      s.backend->map_pages(*s.pool, batch, s.options.access);
      for (std::size_t i : to_map) {
        if (cached[i])
          s.counters.add(s.counters.host_cache_hits);
        else if (spilled[i])
          s.counters.add(s.counters.spill_fills);
        else
          s.counters.add(s.counters.bytes_read, layout.page_fill_bytes(claims[i].page));
      }
    } catch (...) {
      // All or nothing (Backend::map_pages): no page of the batch is mapped, each claim fails
      // and publish_fills gives its chunk back, once its copy completed (Note [Device fills]:
      // a chunk is not reused before its fill's copy did; an error path, so waiting is fine).
      // The backend's rollback may have unmapped pages whose copies still ran: those write
      // through the pool window, not the model address, and no consumer saw these pages.
      const std::exception_ptr error = std::current_exception();
      for (std::size_t i : to_map) {
        s.counters.page_unmapped();
        claims[i].error = error;
        try {
          s.backend->wait_fence(claims[i].ready);
        } catch (const std::exception& e) {
          spdlog::error("pager: waiting for a copy to the device failed: {}", e.what());
        }
      }
    }
  }
  // Slots and buffers whose copy was never issued (a read or copy error).
  for (std::size_t i = 0; i < claims.size(); ++i) {
    if (!slot[i]) continue;
    if (cached[i]) {
      cache->unpin(*slot[i]);
    } else if (read_done[i]) {  // the bytes are the file's even though the copy failed
      cache->commit(*slot[i]);
      cache->unpin(*slot[i]);
    } else {
      cache->abandon(*slot[i]);
    }
  }
  for (auto& b : staging)
    if (b) give_back_staging(s, std::move(b));
  if (copies_to_device(s)) retire_copies(s, kCopiesInFlight);
}

void retire_copies(Pager::State& s, std::size_t keep) noexcept {
  for (;;) {
    CopyInFlight done;
    {
      std::lock_guard lock(s.staging_mutex);
      auto& q = s.copies_in_flight;
      if (q.empty()) return;
      const bool over = q.size() > keep;
      // One copy queue runs them in order: the oldest completes first.
      if (!over && !s.backend->fence_complete(q.front().copied)) return;
      done = std::move(q.front());
      q.pop_front();
    }
    try {
      s.backend->wait_fence(done.copied);  // returns at once unless over the limit
    } catch (const std::exception& e) {
      spdlog::error("pager: waiting for a copy to the device failed: {}", e.what());
    }
    if (done.cache_slot) s.host_cache->unpin(*done.cache_slot);
    if (done.staging) give_back_staging(s, std::move(done.staging));
  }
}

}  // namespace lema::runtime
