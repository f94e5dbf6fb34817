#include "lema/allocator/vmm_resource.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "range_allocator.hpp"

namespace lema::allocator {
namespace {

std::unique_ptr<runtime::MappedCheckpoint> open_memory(const VmmOptions& options) {
  runtime::MappedCheckpointOptions o;
  o.budget_bytes = options.budget_bytes;
  o.page_size = options.page_size;
  o.mode = options.mode;
  o.policy = options.policy;
  // Nothing to predict in anonymous memory's accesses the way a training step's weights are.
  o.prefetch = false;
  o.setting_names = options.setting_names;
  o.anonymous_bytes = options.capacity_bytes != 0
                          ? options.capacity_bytes
                          : std::max<std::uint64_t>(64 * options.budget_bytes, 1_GiB);
  return runtime::MappedCheckpoint::open_anonymous(std::move(o));
}

runtime::TensorAddress anonymous_range(runtime::MappedCheckpoint& memory) {
  const runtime::TensorAddress range = memory.anonymous();
  LEMA_EXPECTS(range.nbytes != 0,
               "the checkpoint has no anonymous memory to allocate from: open it with "
               "MappedCheckpointOptions::anonymous_bytes set");
  return range;
}

}  // namespace

VmmResource::VmmResource(VmmOptions options)
    : owned_(open_memory(options)),
      memory_(owned_.get()),
      range_(anonymous_range(*memory_)),
      ranges_(std::make_unique<RangeAllocator>(reinterpret_cast<std::uintptr_t>(range_.data),
                                               range_.nbytes)) {}

VmmResource::VmmResource(runtime::MappedCheckpoint& shared)
    : memory_(&shared),
      range_(anonymous_range(shared)),
      ranges_(std::make_unique<RangeAllocator>(reinterpret_cast<std::uintptr_t>(range_.data),
                                               range_.nbytes)) {}

VmmResource::~VmmResource() = default;

std::uint64_t VmmResource::capacity() const noexcept { return range_.nbytes; }

std::uint64_t VmmResource::bytes_in_use() const { return ranges_->bytes_in_use(); }

bool VmmResource::contains(const void* p) const noexcept {
  const auto* b = static_cast<const std::byte*>(p);
  return b >= range_.data && b < range_.data + range_.nbytes;
}

void* VmmResource::do_allocate(std::size_t bytes, std::size_t alignment) {
  if (auto addr = ranges_->allocate(bytes, alignment))
    return reinterpret_cast<void*>(*addr);
  throw OutOfMemory("VmmResource: " + format_size(bytes) + " (alignment " +
                    std::to_string(alignment) + ") do not fit in its " +
                    format_size(range_.nbytes) + " of virtual memory (" +
                    format_size(ranges_->bytes_in_use()) + " allocated, largest free block " +
                    format_size(ranges_->largest_free()) +
                    "); raise the capacity (VmmOptions::capacity_bytes, or the anonymous bytes "
                    "of the checkpoint it shares)");
}

// Note [Freed pages]: under pressure, a page wholly inside free memory is dropped at once,
// unsaved (fault mode: MappedCheckpoint::discard_anonymous), so freed tensors cost neither
// budget nor spill writes; its next use reads zeros. Only pages the freed block touches are
// considered (clipped to the coalesced free block, so a page shared with a live block keeps
// its bytes), and it runs under the allocator's lock, before another allocation can take the
// bytes. Without pressure (the pool less than 7/8 full) freed pages stay mapped: a training
// step frees and allocates the same activations again, and dropping them made every one of its
// pages fault in anew through userfaultfd, each step (1.5-1.9x the step time of torch's own
// allocator, PERFORMANCE.md). A page kept so and evicted later is saved like any other: a
// spill write of bytes no one reads, the price of keeping the common case fault-free.
bool VmmResource::under_pressure() const {
  const runtime::PagerStats s = memory_->stats();
  return s.resident_bytes >= s.budget_bytes - s.budget_bytes / 8;
}

void VmmResource::do_deallocate(void* p, std::size_t /*bytes*/, std::size_t /*alignment*/) noexcept {
  const std::uint64_t page = memory_->layout().page_size();
  const auto discard = [&](const RangeAllocator::Freed& f) {
    const std::uintptr_t lo = std::max(f.free, f.block / page * page);
    const std::uintptr_t hi =
        std::min(f.free + f.free_bytes, (f.block + f.block_bytes + page - 1) / page * page);
    if ((lo + page - 1) / page * page + page > hi) return;  // no whole page to drop
    try {
      // Asked only here: most frees leave no whole page, and the pager's stats take its lock.
      if (under_pressure())
        memory_->discard_anonymous(reinterpret_cast<const std::byte*>(lo), hi - lo);
    } catch (const std::exception& e) {
      spdlog::warn("VmmResource: freed pages were kept ({})", e.what());
    }
  };
  if (!ranges_->deallocate(reinterpret_cast<std::uintptr_t>(p), discard))
    spdlog::error("VmmResource: deallocate of {} that it did not allocate (or freed twice); "
                  "ignored",
                  p);
}

}  // namespace lema::allocator
