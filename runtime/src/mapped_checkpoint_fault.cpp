// Fault mode: the checkpoint's pages live in a userfaultfd region; the handler thread fills a
// missing page from the files through the Reader, under the budget, evicting as the policy says.
//
// Differences from guard mode, by nature of demand paging: the runtime sees only misses, not
// hits (a resident page is read without the kernel or us knowing), so `hits` stays 0 and the
// policy's history is the sequence of faults; there is no prefetcher.
#include <spdlog/spdlog.h>

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
        layout_(Layout::plan(
            checkpoint_, resolve_page_size(options.page_size, make_host_backend()->granularity(),
                                       options.setting_names.page_size))),
        reader_(io::Reader::open(layout_.files(), options.reader)),
        policy_(make_policy(options.policy, layout_.page_count())),
        budget_pages_(pool_pages(options.budget_bytes, layout_.page_size(), layout_.page_count(),
                                 make_host_backend()->granularity(), options.setting_names)),
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
                }}) {}

  ~FaultCheckpoint() override {
    if (profile_) profile_->update(stats());
  }

  const io::Checkpoint& checkpoint() const noexcept override { return checkpoint_; }
  const Layout& layout() const noexcept override { return layout_; }
  ResidencyMode mode() const noexcept override { return ResidencyMode::fault; }
  const std::string& fallback_reason() const noexcept override { return no_reason_; }
  Pager* pager() noexcept override { return nullptr; }

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
    visit(t.data + offset, bytes);
    if (auto err = region_.first_error(); !err.empty()) throw Error(err);
  }

  void mark_step() override {
    std::lock_guard lock(policy_mutex_);
    policy_->mark_step();
  }

  PagerStats stats() const override {
    const UffdRegion::Stats r = region_.stats();
    PagerStats s;
    s.faults = r.faults;
    s.evictions = r.evictions;
    s.bytes_read = bytes_read_.load(std::memory_order_relaxed);
    s.stall_ns = stall_ns_.load(std::memory_order_relaxed);
    s.resident_bytes = r.resident_pages * layout_.page_size();
    s.peak_resident_bytes = r.peak_resident_pages * layout_.page_size();
    s.budget_bytes = budget_pages_ * layout_.page_size();
    s.page_size = layout_.page_size();
    s.io_path = reader_->path_name();
    return s;
  }

 private:
  // Runs on the handler thread under the region's lock.
  void fill(PageId page, std::byte* staging) {
    const std::uint64_t start = now_ns();
    {
      std::lock_guard lock(policy_mutex_);
      policy_->on_access(page);
      policy_->on_resident(page);
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
