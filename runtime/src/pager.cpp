// Pager construction and teardown, leases, release and the small queries.
#include "lema/runtime/pager.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <string>

#include "detail/pool_size.hpp"
#include "lema/base/deliberate_leak.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "pager_state.hpp"

namespace lema::runtime {

// ---- Lease ----

Lease::Lease(Lease&& o) noexcept
    : pager_(std::exchange(o.pager_, nullptr)),
      pages_(std::move(o.pages_)),
      owner_(o.owner_),
      consumer_(std::exchange(o.consumer_, std::nullopt)) {
  o.pages_.clear();
}

Lease& Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    if (pager_ != nullptr) pager_->drop(*this);
    pager_ = std::exchange(o.pager_, nullptr);
    pages_ = std::move(o.pages_);
    o.pages_.clear();
    owner_ = o.owner_;
    consumer_ = std::exchange(o.consumer_, std::nullopt);
  }
  return *this;
}

Lease::~Lease() {
  if (pager_ != nullptr) pager_->drop(*this);
}

// ---- Pager ----

namespace {

std::unique_ptr<io::Reader> open_reader(const AddressSpace& space, const PagerOptions& options) {
  return io::Reader::open(space.layout().files(), options.reader);
}

}  // namespace

Pager::Pager(AddressSpace& space, PagerOptions options)
    : Pager(space, nullptr, std::move(options)) {}

Pager::Pager(AddressSpace& space, std::unique_ptr<io::Reader> reader, PagerOptions options) {
  const std::uint64_t page_size = space.page_size();
  // Checked before anything is created.
  const std::size_t chunk_count =
      detail::pool_pages(options.budget_bytes, page_size, space.page_count(),
                         space.backend().granularity(), options.setting_names);
  auto s = std::make_unique<State>(options.event_capacity, space.page_count(), chunk_count);
  s->space = &space;
  s->backend = &space.backend();
  s->layout = &space.layout();
  s->page_size = page_size;
  s->options = std::move(options);
  s->reader = reader ? std::move(reader) : open_reader(space, s->options);
  s->io_path = s->reader->path_name();
  s->pool = s->backend->create_pool(chunk_count, page_size);
  if (s->options.access == Access::read_write) {
    LEMA_EXPECTS(s->backend->capabilities().tracks_writes,
                 "weights on the " + std::string(s->backend->name()) +
                     " backend cannot be written yet (a written page could not be kept when "
                     "evicted); open them read-only");
    s->spill = std::make_unique<SpillStore>(space.page_count(), page_size);
  }
  if (s->options.host_cache_bytes != 0) {
    LEMA_EXPECTS(!s->backend->capabilities().host_window,
                 "a host cache tier serves device pools; the " +
                     std::string(s->backend->name()) +
                     " backend's pages are host memory and the kernel's page cache keeps what "
                     "was read: leave the host cache at 0");
    const std::uint64_t slots = s->options.host_cache_bytes / page_size;
    LEMA_EXPECTS(slots > 0, "the host cache of " + format_size(s->options.host_cache_bytes) +
                                " holds no page of " + format_size(page_size) +
                                "; give at least one page, or 0 for none");
    // More slots than pages would never be used.
    s->host_cache = std::make_unique<HostPageCache>(
        *s->backend, page_size, static_cast<std::size_t>(std::min<std::uint64_t>(
                                    slots, space.page_count())));
  }
  if (s->options.shared_host_cache_bytes != 0)
    s->shared_cache = std::make_unique<SharedHostCache>(shared_cache_key(*s->layout), page_size,
                                                        space.page_count(),
                                                        s->options.shared_host_cache_bytes);
  // Note [Registered shared tier]: a device pool copies shared pages in place once registered.
  if (s->shared_cache && !s->backend->capabilities().host_window &&
      s->backend->register_host(s->shared_cache->data(), s->shared_cache->bytes())) {
    s->shared_registration.backend = s->backend;
    s->shared_registration.base = s->shared_cache->data();
  }
  s->fills = std::make_unique<FillPipeline>(FillPipeline::Parts{.space = space,
                                                                 .backend = *s->backend,
                                                                 .pool = *s->pool,
                                                                 .reader = *s->reader,
                                                                 .cache = s->host_cache.get(),
                                                                 .spill = s->spill.get(),
                                                                 .shared = s->shared_cache.get(),
                                                                 .shared_registered =
                                                                     s->shared_registration
                                                                         .backend != nullptr,
                                                                 .counters = s->counters,
                                                                 .device_errors = s->device_errors,
                                                                 .access = s->options.access});
  s->policy = make_policy(s->options.policy, space.page_count());
  spdlog::debug("pager: {} pages of {}, pool of {} chunks ({}), policy {}, io {}",
                space.page_count(), format_size(page_size), chunk_count,
                format_size(chunk_count * page_size), s->policy->name(), s->io_path);
  subscribe_uvm(*s);  // before the publisher, which records whether GPU faults are counted
  s->profile = ProfilePublisher::open_if_enabled(
      ProfileSourceInfo{.kind = "pager",
                        .policy = std::string(s->policy->name()),
                        .io_path = s->io_path,
                        .uvm_counters = s->uvm_status,
                        .page_size = page_size,
                        .budget_bytes = s->options.budget_bytes,
                        .pool_pages = chunk_count,
                        .page_count = space.page_count(),
                        .tensors = profile_tensors(space.layout()),
                        .counters = {}});
  state_ = std::move(s);
  attach_uvm(*state_);
  if (state_->options.prefetch) {
    state_->prefetch_thread = std::thread([st = state_.get()] { run_prefetcher(*st); });
  }
}

// Note [Device errors without a caller]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Some paths cannot throw: a Lease's destructor, release (unpinning must happen whatever the
// device says), the retirement of copies, ~Pager. A sticky CUDA error (a kernel's illegal
// address, say) makes every later driver call fail, so these paths meet it too; letting it
// escape would end the process in std::terminate. Instead each such error is logged (the first
// as an error, later ones at debug level: DeviceErrors) and the pager keeps whatever the device
// may still read rather than reuse or free it, since a kernel reading another page's bytes, or
// freed memory, would be silently wrong numbers:
//  - a last-use fence whose query fails is kept with its pages as if still running: the next
//    eviction check asks again, and an acquirer that needs the chunk gets the error;
//  - a copy whose completion cannot be confirmed keeps its host memory for good (leaked);
//  - a lease dropped for a queue whose last use cannot be recorded there keeps its pins for good,
//    and the pager is broken: it can no longer tell what the device reads, so every acquire from
//    then on throws PagerBroken (a clear error instead of a wait for chunks that never free);
//  - at teardown a page whose last use cannot be confirmed complete, or pinned by a lost lease,
//    stays mapped, and then the pool (and the host cache, when a copy was not confirmed) is
//    leaked rather than released under it. Memory is lost until the process ends; the process
//    is not.

Pager::~Pager() {
  State& s = *state_;
  {
    std::lock_guard lock(s.table.mutex());
    s.stopping = true;
  }
  s.prefetch_cv.notify_all();
  if (s.prefetch_thread.joinable()) s.prefetch_thread.join();
  // Staging memory outlives the copies reading it.
  const bool copies_done = s.fills->drain();
  bool pages_kept = false;
  {
    // Unmap what is still mapped so the reservation holds no reference to the pool's memory.
    std::lock_guard lock(s.table.mutex());
    const bool broken = s.device_errors.broken();
    for (PageId p = 0; p < s.table.page_count(); ++p) {
      PageEntry& e = s.table.entry(p);
      if (e.state != PageState::resident) continue;
      if (broken && e.pins != 0) {  // a lost lease's pages
        pages_kept = true;
        continue;
      }
      bool used = false;
      for (const Fence& f : e.fences) {
        try {
          s.backend->wait_fence(f);
        } catch (...) {
          s.device_errors.report_current("waiting for the last use of a page at teardown");
          used = true;
          break;
        }
      }
      if (used) {
        pages_kept = true;
        continue;
      }
      try {
        s.backend->unmap(s.space->page_address(p), s.page_size);
      } catch (const std::exception& ex) {
        spdlog::warn("pager: unmapping page {} at teardown failed: {}", p, ex.what());
      }
      s.counters.page_unmapped();
      e.state = PageState::absent;
    }
    // The last records of the range reach the counters; consumers take no lock, so the pager's
    // lock may be held (Note [UVM counters]).
    s.uvm.reset();
    if (s.profile) s.profile->update(s.counters, s.page_size);
  }
  if (pages_kept) {
    spdlog::error("pager: pages the device may still read stay mapped; their pool of {} is "
                  "leaked, not freed",
                  format_size(s.table.chunk_count() * s.page_size));
    leak_deliberately(s.pool);
  }
  if (!copies_done) {
    leak_deliberately(s.host_cache);
    // A copy may still read the shared tier's pages in place: they stay registered and mapped.
    s.shared_registration.backend = nullptr;
    leak_deliberately(s.shared_cache);
  }
}

void Pager::release(Lease&& lease, Fence last_use) {
  LEMA_EXPECTS(lease.pager_ == nullptr || lease.pager_ == this,
               "release: the lease belongs to another pager");
  release_pins(lease, last_use);
}

// Note [Dropped leases]: a lease acquired for a queue was used by work on that queue, which may
// still run when the lease is dropped without release. Its pages are released with a fence
// recorded on that queue, so their chunks are reused only once that work completed, as if the
// caller had released it so. (A lease for the host is released with a complete fence: its
// holder's reads are over when it is dropped.)
void Pager::drop(Lease& lease) noexcept {
  if (lease.pager_ == nullptr) return;
  State& s = *state_;
  Fence last_use;
  if (lease.consumer_) {
    try {
      last_use = s.backend->record_fence(*lease.consumer_);
    } catch (...) {
      // Note [Device errors without a caller]: the pages stay pinned for good.
      s.device_errors.report_current("recording the last use of a dropped lease on its queue",
                                     DeviceErrors::Then::break_pager);
      bool wake = false;
      {
        std::lock_guard lock(s.table.mutex());
        s.table.forget_owner(lease.pages_, lease.owner_);
        wake = s.table.has_waiters();
      }
      if (wake) s.table.notify();  // waiting acquires see the pager broken
      lease.pager_ = nullptr;
      lease.pages_.clear();
      lease.consumer_.reset();
      return;
    }
  }
  release_pins(lease, last_use);
}

void Pager::release_pins(Lease& lease, const Fence& last_use) noexcept {
  if (lease.pager_ == nullptr) return;
  State& s = *state_;
  // Asked before the lock: the fence is the caller's, nothing else sees it yet.
  bool pending = false;
  if (!last_use.trivially_complete()) {
    try {
      pending = !s.backend->fence_complete(last_use);
    } catch (...) {
      // Note [Device errors without a caller]: kept as if still running.
      s.device_errors.report_current("asking whether the last use of released pages completed");
      pending = true;
    }
  }
  bool wake = false;
  bool prefetch = false;
  {
    std::lock_guard lock(s.table.mutex());
    s.table.unpin(lease.pages_, lease.owner_, pending ? &last_use : nullptr);
    wake = s.table.has_waiters();
    // A chunk may have become usable for a pending prediction.
    prefetch = prefetch_useful(s);
    if (prefetch) s.prefetch_wanted = true;
  }
  if (wake) s.table.notify();
  if (prefetch) s.prefetch_cv.notify_one();
  lease.pager_ = nullptr;
  lease.pages_.clear();
  lease.consumer_.reset();
}

void Pager::fault_in(PageId page) {
  LEMA_EXPECTS(page < state_->table.page_count(),
               "fault_in: page " + std::to_string(page) + " is outside the address space");
  Lease lease = acquire_pages({page, 1});
  release(std::move(lease));
}

bool Pager::fault_in(PageId page, std::chrono::nanoseconds patience) {
  LEMA_EXPECTS(page < state_->table.page_count(),
               "fault_in: page " + std::to_string(page) + " is outside the address space");
  state_->counters.add(state_->counters.fallback_faults);
  Lease lease = acquire_sorted({page}, nullptr, std::chrono::steady_clock::now() + patience);
  if (lease.empty()) return false;
  release(std::move(lease));
  return true;
}

void Pager::set_evict_hook(std::function<void(PageId)> hook) {
  std::lock_guard lock(state_->table.mutex());
  state_->evict_hook = std::move(hook);
}

void Pager::quiesce() {
  State& s = *state_;
  std::unique_lock lock(s.table.mutex());
  s.table.wait(lock, [&] { return s.stopping || (!s.prefetch_wanted && !s.prefetch_busy); });
}

void Pager::mark_step() {
  if (state_->uvm) state_->uvm->flush();  // the step's GPU faults, before the next one starts
  std::lock_guard lock(state_->table.mutex());
  state_->policy->mark_step();
}

std::size_t Pager::evict(PageRange range) {
  State& s = *state_;
  std::lock_guard lock(s.table.mutex());
  LEMA_EXPECTS(range.first + range.count <= s.table.page_count(),
               "evict: pages beyond the end of the address space");
  std::size_t evicted = 0;
  for (PageId page = range.first; page < range.first + range.count; ++page) {
    if (!evictable(s, page)) continue;
    s.table.free_chunk(evict_page(s, page));
    ++evicted;
  }
  if (evicted != 0 && s.table.has_waiters()) s.table.notify();
  return evicted;
}

bool Pager::is_resident(PageId page) const {
  std::lock_guard lock(state_->table.mutex());
  return page < state_->table.page_count() &&
         state_->table.entry(page).state == PageState::resident;
}

PagerStats Pager::stats() const {
  if (state_->uvm) state_->uvm->flush();
  PagerStats st = state_->counters.snapshot(state_->page_size, state_->options.budget_bytes,
                                            state_->io_path);
  if (state_->host_cache)
    st.host_cache_bytes = state_->host_cache->slot_count() * state_->page_size;
  if (state_->shared_cache) st.shared_host_cache_bytes = state_->shared_cache->bytes();
  st.uvm_counters = state_->uvm_status;
  if (state_->spill) {
    st.spilled_bytes = state_->spill->bytes_written();
    st.spilled_pages = state_->spill->spilled_pages();
  }
  return st;
}

const EventRing& Pager::events() const noexcept {
  return state_->events;
}
const AddressSpace& Pager::space() const noexcept {
  return *state_->space;
}
std::size_t Pager::chunk_count() const noexcept {
  return state_->table.chunk_count();
}
const char* Pager::policy_name() const noexcept {
  return state_->options.policy == PolicyKind::trace ? "trace" : "lru";
}

// ---- shared helpers ----

void publish_fills(Pager::State& s, std::span<const FillClaim> claims) {
  for (const FillClaim& c : claims) {
    if (c.error) {
      s.table.fill_failed(c.page, c.error);
    } else {
      s.table.fill_succeeded(c.page, c.ready);
      s.policy->on_resident(c.page);
    }
  }
}

void rethrow_fill_error(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const io::ReadError& e) {
    throw io::ReadError(e);
  }
}

void record_event(Pager::State& s, EventKind kind, PageId first, std::uint32_t count,
                  std::uint64_t bytes, std::uint64_t start_ns, std::uint64_t duration_ns) {
  const Event e{start_ns, kind, first, count, bytes, duration_ns};
  s.events.record(e);
  if (s.profile) {
    s.profile->publish(e);
    s.profile->update(s.counters, s.page_size);
  }
}

}  // namespace lema::runtime
