// Filling chunks from the checkpoint files, the spill store or zeros (Note [Page source]), or
// from the host cache tier, and mapping them.
#include "fill_pipeline.hpp"

#include <cstring>
#include <optional>
#include <utility>

#include "lema/base/deliberate_leak.hpp"
#include "page_source.hpp"

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

// Note [Registered shared tier]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Over a device pool, a page ready in the shared host cache used to be copied out of the segment
// into pinned staging, then to the device: two copies, and staging held for each. When the
// backend registered the segment's pages (Backend::register_host: cuMemHostRegister, portable,
// done by the Pager once per mapping of the segment, undone after the last copy drained and
// before the segment is unmapped), the copy to the device reads the page where it is. The slot
// must then stay the page's until the copy completed, though another process may want to reuse
// it: the fill pins it (SharedHostCache::pin_ready, a bit per user process in the slot, which
// the clock skips while its process lives) and the pin goes with the copy's host memory, when
// retire_copies saw its fence complete. A pin never blocks a reader, only eviction; a process
// that dies with pins leaves bits that the next eviction sweep clears. Where registration
// failed (RLIMIT_MEMLOCK, a driver without it), the pager said so once and fills copy through
// staging as before: slower, never wrong. The private host cache tier is asked first (its
// pages are the process's own) and not filled from a registered shared hit: the shared tier
// already holds the page, pinned memory the GPU reads directly.

// Copies to the device allowed in flight at once: the pinned staging memory they hold is
// bounded by this many pages (beyond the host cache tier's own slots).
constexpr std::size_t kCopiesInFlight = 16;

}  // namespace

/// One claim's fill on its way: where its bytes come from and what host memory it holds.
struct FillPipeline::Fill {
  FillClaim* claim = nullptr;
  std::unique_ptr<StagingBuffer> staging;  // device pools without a host cache slot
  std::optional<std::size_t> slot;         // a host cache slot it reads into or copies from
  bool cached = false;                     // the slot already held the page: no read
  bool spilled = false;                    // read from the spill store, not the files
  bool shared_hit = false;                 // copied from the shared host cache: no read
  bool shared_wait = false;                // another process reads it: wait_shared() later
  std::optional<std::uint32_t> shared_slot;  // our claim in the shared cache: publish the read
  std::optional<std::uint32_t> shared_pin;   // a registered shared page copied in place
  const std::byte* shared_src = nullptr;     // its bytes in the segment
  std::byte* dest = nullptr;               // where the page's bytes go
  bool read_done = false;                  // every byte of the page was read
  io::ReadTicket ticket;                   // the reads still running
};

FillPipeline::FillPipeline(const Parts& parts)
    : space_(parts.space),
      layout_(parts.space.layout()),
      backend_(parts.backend),
      pool_(parts.pool),
      reader_(parts.reader),
      cache_(parts.cache),
      spill_(parts.spill),
      shared_(parts.shared),
      shared_registered_(parts.shared != nullptr && parts.shared_registered),
      counters_(parts.counters),
      device_errors_(parts.device_errors),
      access_(parts.access),
      page_size_(parts.space.page_size()),
      copies_to_device_(!parts.backend.capabilities().host_window) {}

FillPipeline::~FillPipeline() {
  // Host memory a copy may still read is not given back (Note [Device errors without a
  // caller]): the buffers are leaked instead of freed.
  for (CopyInFlight& c : in_flight_) {
    leak_deliberately(c.staging);
  }
}

void FillPipeline::fill_and_map(std::span<FillClaim> claims, FillOrigin origin) {
  std::vector<Fill> fills(claims.size());
  for (std::size_t i = 0; i < claims.size(); ++i) {
    fills[i].claim = &claims[i];
    start_read(fills[i], origin);
  }
  // Note [Shared fills without deadlock]: a page another process is reading is waited for only
  // after every page this batch reads itself was published, so two processes whose batches
  // claimed pages of each other's never wait on each other.
  for (Fill& f : fills)
    if (!f.shared_wait) finish_read(f);
  for (Fill& f : fills)
    if (f.shared_wait) {
      wait_shared(f, origin);
      finish_read(f);
    }
  map_batch(fills);
  give_back_host_memory(fills);
  if (copies_to_device_) retire_copies(kCopiesInFlight);
}

// Host-visible pools are filled in place through the pool window; device pools through host
// memory (a slot of the host cache tier, else a staging buffer) and a copy on the backend's copy
// queue. All pages' remaining reads are in flight together; they complete in any order.
void FillPipeline::start_read(Fill& f, FillOrigin origin) {
  FillClaim& c = *f.claim;
  try {
    std::byte* dest = pool_.window(c.chunk);
    // Note [Page source]. Only host-visible pools take written pages (Note [Dirty pages]), so the
    // spill store is asked only where there is a window to read it into.
    const PageSource source = page_source(layout_, dest != nullptr ? spill_ : nullptr, c.page);
    if (source == PageSource::spill) {
      spill_->read(c.page, dest);
      f.spilled = true;
      return;
    }
    // A zero page is not worth a host cache slot: it costs a memset to make again.
    if (dest == nullptr && cache_ != nullptr && source == PageSource::checkpoint) {
      f.slot = cache_->pin_cached(c.page);
      f.cached = f.slot.has_value();
      if (f.cached) return;
    }
    if (dest == nullptr && shared_registered_ && source == PageSource::checkpoint) {
      std::uint32_t slot = 0;
      if (const std::byte* ready = shared_->pin_ready(c.page, &slot); ready != nullptr) {
        f.shared_pin = slot;
        f.shared_src = ready;
        f.shared_hit = true;
        return;
      }
    }
    if (dest == nullptr && cache_ != nullptr && source == PageSource::checkpoint) {
      f.slot = cache_->claim_for(c.page);
      if (f.slot) dest = cache_->data(*f.slot);
    }
    if (dest == nullptr) {
      f.staging = take_staging();
      dest = f.staging->bytes().data();
    }
    f.dest = dest;
    if (source == PageSource::zero) {
      std::memset(dest, 0, page_size_);
      return;
    }
    if (shared_ != nullptr) {
      std::uint32_t slot = 0;
      switch (shared_->try_begin(c.page, dest, &slot)) {
        case SharedHostCache::Outcome::copied: f.shared_hit = true; return;
        case SharedHostCache::Outcome::busy: f.shared_wait = true; return;
        case SharedHostCache::Outcome::fill: f.shared_slot = slot; break;
        case SharedHostCache::Outcome::bypass: break;
      }
    }
    submit_read(f, origin);
  } catch (...) {
    c.error = std::current_exception();
  }
}

void FillPipeline::submit_read(Fill& f, FillOrigin origin) {
  const PageId page = f.claim->page;
  zero_gaps(layout_.extents(page), f.dest, page_size_);
  std::vector<io::ReadRequest> requests = requests_for(layout_, page, f.dest);
  // A demand fault's caller waits anyway: what the page cache holds is copied on its own
  // thread, without the two hand-offs to the reader's threads and back.
  if (origin == FillOrigin::demand) requests = reader_.read_cached(std::move(requests));
  if (!requests.empty()) f.ticket = reader_.submit(std::move(requests));
}

// The page was being read by another process at start_read: its bytes, or the read is ours.
void FillPipeline::wait_shared(Fill& f, FillOrigin origin) {
  FillClaim& c = *f.claim;
  try {
    std::uint32_t slot = 0;
    switch (shared_->wait_and_copy(c.page, f.dest, &slot)) {
      case SharedHostCache::Outcome::copied: f.shared_hit = true; return;
      case SharedHostCache::Outcome::fill: f.shared_slot = slot; break;
      case SharedHostCache::Outcome::busy:
      case SharedHostCache::Outcome::bypass: break;
    }
    submit_read(f, origin);
  } catch (...) {
    c.error = std::current_exception();
  }
}

void FillPipeline::abandon_shared(Fill& f) noexcept {
  if (f.shared_slot) shared_->abandon(*f.shared_slot);
  f.shared_slot.reset();
}

void FillPipeline::finish_read(Fill& f) {
  FillClaim& c = *f.claim;
  if (c.error) {
    abandon_shared(f);
    return;
  }
  try {
    if (f.ticket.valid()) f.ticket.wait();
    f.read_done = !f.cached;
    if (f.shared_slot) {  // other processes may be waiting for these bytes
      shared_->publish(*f.shared_slot, f.dest);
      f.shared_slot.reset();
    }
    const std::byte* source = f.shared_src ? f.shared_src
                              : f.staging  ? f.staging->bytes().data()
                              : f.slot     ? cache_->data(*f.slot)
                                           : nullptr;
    if (source == nullptr) return;
    // Note [Device fills]: the copy is left running on the backend's copy queue. The page is
    // mapped right after the batch's copies were issued (a host-side call), not once they
    // completed, but read only by work that waits for `ready`: the acquirer's consumer queue,
    // or the acquirer itself on the host. The host memory it copies from is given back once it
    // completed (retire_copies).
    c.ready =
        backend_.copy_to_chunk(pool_, c.chunk, 0, std::span<const std::byte>(source, page_size_));
    if (f.slot && !f.cached) cache_->commit(*f.slot);
    std::lock_guard lock(mutex_);
    in_flight_.push_back({c.ready, std::move(f.staging), f.slot, f.shared_pin});
    f.slot.reset();
    f.shared_pin.reset();
  } catch (const io::ReadError& e) {
    // A copy owned by this thread: the original is shared with the reader's thread, which may
    // free it after this function returns.
    c.error = std::make_exception_ptr(io::ReadError(e));
    abandon_shared(f);
  } catch (...) {
    c.error = std::current_exception();
    abandon_shared(f);
  }
}

// Note [Map after fill]: on a host-visible pool a page appears at its model address only once
// every byte of it is in its chunk, so no reader of the model address can ever see a partial
// page. The pages of the batch are mapped together, after all their reads (and copy issues), in
// one map_pages call, which lets a device backend set access once per run of adjacent pages
// (Note [Access per run] in the cuda backend). The first page is thus mapped only when the last
// read is done; nothing waits for it earlier: a demand fault's caller waits for every claim, and
// both callers publish the batch only after fill_and_map returns.
void FillPipeline::map_batch(std::span<Fill> fills) {
  std::vector<PageMapping> batch;
  std::vector<Fill*> mapped;  // the fills whose page is in its chunk (or on its way there)
  batch.reserve(fills.size());
  mapped.reserve(fills.size());
  for (Fill& f : fills) {
    if (f.claim->error) continue;
    batch.push_back({f.claim->chunk, space_.page_address(f.claim->page)});
    mapped.push_back(&f);
  }
  if (batch.empty()) return;
  // Counted before the map so the peak can never miss a mapped page.
  for (std::size_t n = 0; n < batch.size(); ++n) counters_.page_mapped();
  try {
    backend_.map_pages(pool_, batch, access_);
    for (const Fill* f : mapped) {
      if (f->cached)
        counters_.add(counters_.host_cache_hits);
      else if (f->shared_hit)
        counters_.add(counters_.shared_cache_hits);
      else if (f->spilled)
        counters_.add(counters_.spill_fills);
      else
        counters_.add(counters_.bytes_read, layout_.page_fill_bytes(f->claim->page));
    }
  } catch (...) {
    // All or nothing (Backend::map_pages): no page of the batch is mapped, each claim fails and
    // its chunk is given back when the fill is published, once its copy completed (Note [Device
    // fills]: a chunk is not reused before its fill's copy did; an error path, so waiting is
    // fine). The backend's rollback may have unmapped pages whose copies still ran: those write
    // through the pool window, not the model address, and no consumer saw these pages.
    const std::exception_ptr error = std::current_exception();
    for (Fill* f : mapped) {
      counters_.page_unmapped();
      f->claim->error = error;
      try {
        backend_.wait_fence(f->claim->ready);
      } catch (...) {
        device_errors_.report_current("waiting for a copy to the device after a failed map");
      }
    }
  }
}

// Slots and buffers whose copy was never issued (a read or copy error).
void FillPipeline::give_back_host_memory(std::span<Fill> fills) {
  for (Fill& f : fills) {
    abandon_shared(f);
    if (f.shared_pin) shared_->unpin(*f.shared_pin);
    if (f.slot) {
      if (f.cached) {
        cache_->unpin(*f.slot);
      } else if (f.read_done) {  // the bytes are the file's even though the copy failed
        cache_->commit(*f.slot);
        cache_->unpin(*f.slot);
      } else {
        cache_->abandon(*f.slot);
      }
    }
    if (f.staging) give_back_staging(std::move(f.staging));
  }
}

std::unique_ptr<StagingBuffer> FillPipeline::take_staging() {
  retire_copies(kCopiesInFlight);
  {
    std::lock_guard lock(mutex_);
    if (!staging_free_.empty()) {
      auto b = std::move(staging_free_.back());
      staging_free_.pop_back();
      return b;
    }
  }
  return backend_.allocate_staging(page_size_);
}

void FillPipeline::give_back_staging(std::unique_ptr<StagingBuffer> b) {
  std::lock_guard lock(mutex_);
  staging_free_.push_back(std::move(b));
}

void FillPipeline::retire_copies(std::size_t keep) noexcept {
  for (;;) {
    CopyInFlight done;
    bool complete = false;
    {
      std::lock_guard lock(mutex_);
      if (in_flight_.empty()) return;
      const bool over = in_flight_.size() > keep;
      // One copy queue runs them in order: the oldest completes first.
      try {
        complete = backend_.fence_complete(in_flight_.front().copied);
      } catch (...) {
        device_errors_.report_current("asking whether a copy to the device completed");
      }
      if (!over && !complete) return;
      done = std::move(in_flight_.front());
      in_flight_.pop_front();
    }
    if (!complete) {
      try {
        backend_.wait_fence(done.copied);
        complete = true;
      } catch (...) {
        device_errors_.report_current("waiting for a copy to the device");
      }
    }
    if (!complete) {
      // The copy may still read its host memory: leaked, never reused or freed. A slot of the
      // host cache stays pinned, so no other fill writes it.
      leak_deliberately(done.staging);
      std::lock_guard lock(mutex_);
      leaked_ = true;
      continue;
    }
    if (done.cache_slot) cache_->unpin(*done.cache_slot);
    if (done.shared_pin) shared_->unpin(*done.shared_pin);
    if (done.staging) give_back_staging(std::move(done.staging));
  }
}

bool FillPipeline::drain() noexcept {
  retire_copies(0);
  std::lock_guard lock(mutex_);
  return !leaked_;
}

}  // namespace lema::runtime
