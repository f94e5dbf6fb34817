// Fault mode: the checkpoint's pages live in a userfaultfd region; the handler thread fills a
// missing page from the files through the Reader, under the budget, evicting as the policy says.
//
// Differences from guard mode, by nature of demand paging: the runtime sees only misses, not
// hits (a resident page is read without the kernel or us knowing), so `hits` stays 0 and the
// policy's history is the sequence of faults; there is no prefetcher.
//
// Writes (Note [Written pages] in uffd_region.cpp): by default a written page is saved in the
// spill store when evicted and every later fill of it reads it back from there; opened
// read_only, the first write to a page is refused (the writer gets SIGSEGV, the error names
// the page's tensors), except where the kernel lacks userfaultfd write protection: no write
// can be seen there, so it is kept as in a writable checkpoint.
//
// Note [Reads that can fail]: a thread whose fault cannot be filled (a file truncated or
// rewritten while in use, EIO) cannot be handed an error and gets SIGSEGV at the page (Note
// [Fill errors] in uffd_region.cpp). read_tensor_range() therefore makes each page of the range
// resident through UffdRegion::prefetch(), which throws the fill's io::ReadError, before it
// visits that page, so its callers (lema verify) get the same named read error as in guard
// mode. Code that reads the tensors' addresses directly still gets the signal; the error naming
// the file is logged first. One race remains: another thread's fault may evict a page between
// its prefetch and the visit, and the visit's own fault may then fail like a direct read.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "detail/pool_size.hpp"
#include "detail/uffd_region.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/reader.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/events.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/profile.hpp"
#include "mapped_checkpoint_fault.hpp"
#include "page_source.hpp"
#include "spill_store.hpp"

namespace lema::runtime::detail {

std::string fault_mode_unavailable_reason() {
  auto reason = UffdRegion::unavailable_reason();
  return reason ? *reason : std::string();
}

namespace {

class FaultCheckpoint final : public MappedCheckpoint {
 public:
  FaultCheckpoint(io::Checkpoint checkpoint, const MappedCheckpointOptions& options)
      : checkpoint_(std::move(checkpoint)),
        layout_(plan_layout(checkpoint_, options, make_host_backend()->granularity())),
        reader_(open_reader(options, layout_)),
        policy_(make_policy(options.policy, layout_.page_count())),
        budget_pages_(pool_pages(options.budget_bytes, layout_.page_size(), layout_.page_count(),
                                 make_host_backend()->granularity(), options.setting_names)),
        read_only_(options.read_only),
        spill_(std::make_unique<SpillStore>(std::max<std::size_t>(layout_.page_count(), 1),
                                            layout_.page_size())),
        profile_(ProfilePublisher::open_if_enabled(
            ProfileSourceInfo{.kind = "fault",
                              .policy = std::string(policy_->name()),
                              .io_path = reader_->path_name(),
                              .page_size = layout_.page_size(),
                              .budget_bytes = budget_pages_ * layout_.page_size(),
                              .pool_pages = budget_pages_,
                              .page_count = layout_.page_count(),
                              .tensors = profile_tensors(layout_),
                              .counters = {}})),
        region_(UffdRegion::Options{
            .page_count = std::max<std::size_t>(layout_.page_count(), 1),
            .page_size = layout_.page_size(),
            .budget_pages = budget_pages_,
            .fill = [this](PageId page, std::byte* staging) { fill(page, staging); },
            .choose_victim =
                [this](std::span<const PageId> resident) {
                  std::lock_guard lock(policy_mutex_);
                  const PageId victim = policy_->choose_victim(resident);
                  policy_->on_evicted(victim);
                  if (profile_) {
                    profile_->publish(
                        Event{now_ns(), EventKind::evict, victim, 1, layout_.page_size(), 0});
                    profile_->add(ProfileCounter::evictions);
                  }
                  return victim;
                },
            // Read-only too: where the kernel lacks write protection a write cannot be refused,
            // and is then kept rather than lost.
            .save = [this](PageId page, const std::byte* bytes) { spill_->write(page, bytes); },
            .refuse_write = read_only_
                                ? UffdRegion::RefuseWrite([this](PageId page) {
                                    return refused_write_message(page);
                                  })
                                : UffdRegion::RefuseWrite(),
            .write_protect = options.uffd_write_protect}) {}

  ~FaultCheckpoint() override {
    if (profile_) profile_->update(stats());
  }

  const io::Checkpoint& checkpoint() const noexcept override { return checkpoint_; }
  const Layout& layout() const noexcept override { return layout_; }
  ResidencyMode mode() const noexcept override { return ResidencyMode::fault; }
  const std::string& fallback_reason() const noexcept override { return no_reason_; }
  bool writable() const noexcept override { return !read_only_; }
  Pager* pager() noexcept override { return nullptr; }
  void discard_anonymous(const std::byte* ptr, std::uint64_t bytes) override {
    const std::uint64_t page = layout_.page_size();
    const auto begin = static_cast<std::uint64_t>(ptr - region_.data());
    LEMA_EXPECTS(ptr >= region_.data() && begin >= layout_.anonymous_offset() &&
                     bytes <= layout_.virtual_bytes() - begin,
                 "discard of bytes outside the anonymous memory");
    // Whole pages only: a page shared with live bytes keeps them.
    for (std::uint64_t p = (begin + page - 1) / page; (p + 1) * page <= begin + bytes; ++p) {
      const auto id = static_cast<PageId>(p);
      if (region_.discard(id)) {
        std::lock_guard lock(policy_mutex_);
        policy_->on_evicted(id);
      }
      spill_->forget(id);
    }
  }
  TensorAddress anonymous() const noexcept override {
    if (layout_.anonymous_bytes() == 0) return {};
    return {region_.data() + layout_.anonymous_offset(), layout_.anonymous_bytes()};
  }

  TensorAddress tensor(std::string_view name) const override {
    const TensorPlacement* t = layout_.find(name);
    if (t == nullptr)
      throw InvalidArgument("no tensor named '" + std::string(name) + "' in " +
                            checkpoint_.source().string());
    return {region_.data() + t->offset, t->nbytes};
  }

  void read_tensor_range(
      std::string_view name, std::uint64_t offset, std::uint64_t bytes,
      const std::function<void(const std::byte*, std::uint64_t)>& visit) override {
    const TensorAddress t = checked_range(name, offset, bytes);
    // Page by page (Note [Reads that can fail]): one page is always within the budget.
    const std::uint64_t page = layout_.page_size();
    std::uint64_t done = 0;
    while (done < bytes) {
      const std::byte* at = t.data + offset + done;
      const auto pos = static_cast<std::uint64_t>(at - region_.data());
      const std::uint64_t n = std::min(bytes - done, page - pos % page);
      make_resident(static_cast<PageId>(pos / page));
      visit(at, n);
      done += n;
    }
    if (auto err = region_.first_error(); !err.empty()) throw Error(err);
  }

  void mark_step() override {
    std::lock_guard lock(policy_mutex_);
    policy_->mark_step();
  }

  PagerStats stats() const override {
    const UffdRegion::Stats r = region_.stats();
    PagerStats s;
    // Pages read_tensor_range() made resident ahead of its visit are faults it served.
    s.faults = r.faults + r.prefetches;
    s.evictions = r.evictions;
    s.bytes_read = bytes_read_.load(std::memory_order_relaxed);
    s.stall_ns = stall_ns_.load(std::memory_order_relaxed);
    s.resident_bytes = r.resident_pages * layout_.page_size();
    s.peak_resident_bytes = r.peak_resident_pages * layout_.page_size();
    s.budget_bytes = budget_pages_ * layout_.page_size();
    s.page_size = layout_.page_size();
    s.io_path = reader_->path_name();
    s.dirty_evictions = r.dirty_evictions;
    s.spilled_bytes = spill_->bytes_written();
    s.spilled_pages = spill_->spilled_pages();
    s.spill_fills = spill_->reads();
    return s;
  }

 private:
  std::string refused_write_message(PageId page) const {
    const std::uint64_t lo = page * layout_.page_size(), hi = lo + layout_.page_size();
    // Anonymous memory after read-only weights is written like any memory (Note [One budget]).
    if (lo >= layout_.anonymous_offset()) return {};
    std::string names;
    for (const TensorPlacement& t : layout_.tensors()) {
      if (t.offset >= hi || t.offset + t.nbytes <= lo) continue;
      names += (names.empty() ? "'" : ", '") + t.name + "'";
    }
    return "a write into " + (names.empty() ? std::string("padding") : "tensor " + names) +
           " (page " + std::to_string(page) + ") of " + checkpoint_.source().string() +
           ", opened read-only, was refused (the writer gets SIGSEGV); open it writable to "
           "keep writes";
  }

  // Runs on the handler thread under the region's lock.
  // Throws the fill's error instead of letting the visit's fault poison the page.
  void make_resident(PageId page) {
    try {
      region_.prefetch(page);
    } catch (const io::ReadError& e) {
      throw io::ReadError(e);  // a copy this thread owns: the reader's threads hold the original
    }
  }

  // Runs under the region's lock, on the handler thread or in make_resident().
  void fill(PageId page, std::byte* staging) {
    const std::uint64_t start = now_ns();
    {
      std::lock_guard lock(policy_mutex_);
      policy_->on_access(page);
      policy_->on_resident(page);
    }
    // Note [Page source]: a written page comes back from the store, an anonymous one as zeros.
    const PageSource source = page_source(layout_, spill_.get(), page);
    if (source != PageSource::checkpoint) {
      if (source == PageSource::spill)
        spill_->read(page, staging);
      else
        std::memset(staging, 0, layout_.page_size());
      const std::uint64_t took = now_ns() - start;
      stall_ns_.fetch_add(took, std::memory_order_relaxed);
      if (profile_) profile_->publish(Event{start, EventKind::fault, page, 1, 0, took});
      return;
    }
    std::vector<io::ReadRequest> batch;
    std::uint64_t covered = 0, bytes = 0;
    for (const FillExtent& e : layout_.extents(page)) {
      if (e.page_offset > covered) std::memset(staging + covered, 0, e.page_offset - covered);
      batch.push_back({e.file, e.file_offset, e.length, staging + e.page_offset});
      covered = e.page_offset + e.length;
      bytes += e.length;
    }
    if (covered < layout_.page_size())
      std::memset(staging + covered, 0, layout_.page_size() - covered);
    reader_->read(std::move(batch));
    bytes_read_.fetch_add(bytes, std::memory_order_relaxed);
    const std::uint64_t took = now_ns() - start;
    stall_ns_.fetch_add(took, std::memory_order_relaxed);
    if (profile_) {
      profile_->publish(Event{start, EventKind::fault, page, 1, bytes, took});
      profile_->add(ProfileCounter::faults);
      profile_->add(ProfileCounter::bytes_read, bytes);
      profile_->add(ProfileCounter::stall_ns, took);
    }
  }

  io::Checkpoint checkpoint_;
  Layout layout_;
  std::unique_ptr<io::Reader> reader_;
  std::mutex policy_mutex_;
  std::unique_ptr<EvictionPolicy> policy_;
  std::size_t budget_pages_;
  bool read_only_;
  std::unique_ptr<SpillStore> spill_;  // Note [Written pages]
  std::atomic<std::uint64_t> bytes_read_{0};
  std::atomic<std::uint64_t> stall_ns_{0};
  std::string no_reason_;
  std::unique_ptr<ProfilePublisher> profile_;  // before region_: its handler thread publishes
  UffdRegion region_;  // last: its handler thread uses the members above
};

}  // namespace

std::unique_ptr<MappedCheckpoint> open_fault_mode(io::Checkpoint checkpoint,
                                                  const MappedCheckpointOptions& options) {
  return std::make_unique<FaultCheckpoint>(std::move(checkpoint), options);
}

}  // namespace lema::runtime::detail
