// Pager construction and teardown, leases, release and the small queries.
#include "lema/runtime/pager.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <string>

#include "detail/pool_size.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "pager_state.hpp"

namespace lema::runtime {

// ---- Lease ----

Lease::Lease(Lease&& o) noexcept
    : pager_(std::exchange(o.pager_, nullptr)), pages_(std::move(o.pages_)), owner_(o.owner_) {
  o.pages_.clear();
}

Lease& Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    if (pager_ != nullptr) pager_->release_pins(*this, Fence{});
    pager_ = std::exchange(o.pager_, nullptr);
    pages_ = std::move(o.pages_);
    o.pages_.clear();
    owner_ = o.owner_;
  }
  return *this;
}

Lease::~Lease() {
  if (pager_ != nullptr) pager_->release_pins(*this, Fence{});
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
  auto s = std::make_unique<State>(options.event_capacity);
  s->space = &space;
  s->backend = &space.backend();
  s->layout = &space.layout();
  s->page_size = page_size;
  s->chunk_count = chunk_count;
  s->options = std::move(options);
  s->reader = reader ? std::move(reader) : open_reader(space, s->options);
  s->io_path = s->reader->path_name();
  s->pool = s->backend->create_pool(s->chunk_count, page_size);
  if (s->options.access == Access::read_write) {
    LEMA_EXPECTS(s->backend->tracks_writes(),
                 "weights on the " + std::string(s->backend->name()) +
                     " backend cannot be written yet (a written page could not be kept when "
                     "evicted); open them read-only");
    s->spill = std::make_unique<SpillStore>(space.page_count(), page_size);
  }
  if (s->options.host_cache_bytes != 0) {
    LEMA_EXPECTS(s->pool->window(0) == nullptr,
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
  s->pages.resize(space.page_count());
  s->chunk_owner.assign(s->chunk_count, kNoPage);
  s->free_chunks.reserve(s->chunk_count);
  // Handed out from the back: chunk 0 first.
  for (std::size_t c = s->chunk_count; c-- > 0;)
    s->free_chunks.push_back(static_cast<std::uint32_t>(c));
  s->policy = make_policy(s->options.policy, space.page_count());
  spdlog::debug("pager: {} pages of {}, pool of {} chunks ({}), policy {}, io {}",
                space.page_count(), format_size(page_size), s->chunk_count,
                format_size(s->chunk_count * page_size), s->policy->name(), s->io_path);
  subscribe_uvm(*s);  // before the publisher, which records whether GPU faults are counted
  s->profile = ProfilePublisher::open_if_enabled(
      ProfileSourceInfo{.kind = "pager",
                        .policy = std::string(s->policy->name()),
                        .io_path = s->io_path,
                        .uvm_counters = s->uvm_status,
                        .page_size = page_size,
                        .budget_bytes = s->options.budget_bytes,
                        .pool_pages = s->chunk_count,
                        .page_count = space.page_count(),
                        .tensors = profile_tensors(space.layout()),
                        .counters = {}});
  state_ = std::move(s);
  attach_uvm(*state_);
  if (state_->options.prefetch) {
    state_->prefetch_thread = std::thread([st = state_.get()] { run_prefetcher(*st); });
  }
}

Pager::~Pager() {
  State& s = *state_;
  {
    std::lock_guard lock(s.mutex);
    s.stopping = true;
  }
  s.prefetch_cv.notify_all();
  if (s.prefetch_thread.joinable()) s.prefetch_thread.join();
  retire_copies(s, 0);  // staging memory outlives the copies reading it
  // Unmap what is still mapped so the reservation holds no reference to the pool's memory.
  std::lock_guard lock(s.mutex);
  for (PageId p = 0; p < s.pages.size(); ++p) {
    PageEntry& e = s.pages[p];
    if (e.state != PageState::resident) continue;
    for (const Fence& f : e.fences) s.backend->wait_fence(f);
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

void Pager::release(Lease&& lease, Fence last_use) {
  LEMA_EXPECTS(lease.pager_ == nullptr || lease.pager_ == this,
               "release: the lease belongs to another pager");
  release_pins(lease, last_use);
}

void Pager::release_pins(Lease& lease, const Fence& last_use) noexcept {
  if (lease.pager_ == nullptr) return;
  State& s = *state_;
  bool wake = false;
  bool prefetch = false;
  {
    std::lock_guard lock(s.mutex);
    const bool pending = !last_use.trivially_complete() && !s.backend->fence_complete(last_use);
    auto mine = s.pins_by_thread.find(lease.owner_);
    for (PageId p : lease.pages_) {
      PageEntry& e = s.pages[p];
      if (e.pins > 0) --e.pins;
      if (pending) e.fences.push_back(last_use);
      if (mine != s.pins_by_thread.end()) {
        auto it = mine->second.find(p);
        if (it != mine->second.end() && --it->second == 0) mine->second.erase(it);
      }
    }
    if (mine != s.pins_by_thread.end() && mine->second.empty()) s.pins_by_thread.erase(mine);
    wake = s.waiters > 0;
    // A chunk may have become usable for a pending prediction.
    prefetch = prefetch_useful(s);
    if (prefetch) s.prefetch_wanted = true;
  }
  if (wake) s.changed.notify_all();
  if (prefetch) s.prefetch_cv.notify_one();
  lease.pager_ = nullptr;
  lease.pages_.clear();
}

void Pager::fault_in(PageId page) {
  LEMA_EXPECTS(page < state_->pages.size(),
               "fault_in: page " + std::to_string(page) + " is outside the address space");
  Lease lease = acquire_pages({page, 1});
  release(std::move(lease));
}

bool Pager::fault_in(PageId page, std::chrono::nanoseconds patience) {
  LEMA_EXPECTS(page < state_->pages.size(),
               "fault_in: page " + std::to_string(page) + " is outside the address space");
  state_->counters.add(state_->counters.fallback_faults);
  Lease lease = acquire_sorted({page}, nullptr, std::chrono::steady_clock::now() + patience);
  if (lease.empty()) return false;
  release(std::move(lease));
  return true;
}

void Pager::set_evict_hook(std::function<void(PageId)> hook) {
  std::lock_guard lock(state_->mutex);
  state_->evict_hook = std::move(hook);
}

void Pager::quiesce() {
  State& s = *state_;
  std::unique_lock lock(s.mutex);
  wait_changed(s, lock, [&] { return s.stopping || (!s.prefetch_wanted && !s.prefetch_busy); });
}

void Pager::mark_step() {
  if (state_->uvm) state_->uvm->flush();  // the step's GPU faults, before the next one starts
  std::lock_guard lock(state_->mutex);
  state_->policy->mark_step();
}

std::size_t Pager::evict(PageRange range) {
  std::lock_guard lock(state_->mutex);
  State& s = *state_;
  LEMA_EXPECTS(range.first + range.count <= s.pages.size(),
               "evict: pages beyond the end of the address space");
  std::size_t evicted = 0;
  for (PageId page = range.first; page < range.first + range.count; ++page) {
    if (!evictable(s, page)) continue;
    s.free_chunks.push_back(evict_page(s, page));
    ++evicted;
  }
  if (evicted != 0 && s.waiters != 0) s.changed.notify_all();
  return evicted;
}

bool Pager::is_resident(PageId page) const {
  std::lock_guard lock(state_->mutex);
  return page < state_->pages.size() && state_->pages[page].state == PageState::resident;
}

PagerStats Pager::stats() const {
  if (state_->uvm) state_->uvm->flush();
  PagerStats st = state_->counters.snapshot(state_->page_size, state_->options.budget_bytes,
                                            state_->io_path);
  if (state_->host_cache)
    st.host_cache_bytes = state_->host_cache->slot_count() * state_->page_size;
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
  return state_->chunk_count;
}
const char* Pager::policy_name() const noexcept {
  return state_->options.policy == PolicyKind::trace ? "trace" : "lru";
}

// ---- shared helpers ----

void publish_fills(Pager::State& s, std::span<const FillClaim> claims) {
  for (const FillClaim& c : claims) {
    PageEntry& e = s.pages[c.page];
    ++e.fills_done;
    e.fill_error = c.error;
    e.fill_failed = static_cast<bool>(c.error);
    if (c.error) {
      // The page stays unmapped and its chunk goes back to the free list; its waiters get the
      // error and a later acquire retries the read (Note [Failed fills]).
      e.state = PageState::absent;
      e.prefetched = false;
      s.chunk_owner[c.chunk] = kNoPage;
      s.free_chunks.push_back(c.chunk);
    } else {
      e.state = PageState::resident;
      e.ready = c.ready;
      // Not unmapped, nor its chunk reused, while the copy may still write it.
      if (!c.ready.trivially_complete()) e.fences.push_back(c.ready);
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
