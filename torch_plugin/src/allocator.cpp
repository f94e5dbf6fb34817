// The c10::Allocator over a VmmResource and its installation as torch's CPU allocator.
#include "lema/torch/allocator.hpp"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <utility>

#include "lema/base/deliberate_leak.hpp"
#include "lema/base/error.hpp"
#include "lema/torch/virtual_checkpoint.hpp"

namespace lema::torch {
namespace {

// torch's CPU alignment (c10::gAlignment): vectorized kernels expect it.
constexpr std::size_t kAlignment = 64;

// Note [Allocator lifetime]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// A storage keeps a pointer to the allocator that made it and asks it again to grow
// (resize_), long after any scope may have ended, and torch never frees an allocator it was
// given. So the c10::Allocator object is never freed: when its scope ends it is detached from
// the resource and passes later requests to the allocator it replaced, while each block's
// context holds the resource until the block is freed. What stays behind is a few bytes per
// scope, not the budget's memory.
class VmmAllocator final : public c10::Allocator {
 public:
  VmmAllocator(std::shared_ptr<allocator::VmmResource> resource, c10::Allocator* previous)
      : resource_(std::move(resource)), previous_(previous) {}

  c10::DataPtr allocate(std::size_t n) override {
    std::shared_ptr<allocator::VmmResource> mr;
    {
      std::lock_guard lock(mutex_);
      mr = resource_;
    }
    if (!mr) return previous_->allocate(n);  // detached (Note [Allocator lifetime])
    if (n == 0) return {nullptr, nullptr, &free_block, c10::Device(c10::kCPU)};
    void* p = nullptr;
    try {
      p = mr->allocate(n, kAlignment);
    } catch (const lema::Error& e) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "lema: ", e.what());
    }
    auto* block = new Block{std::move(mr), p, n};
    return {p, block, &free_block, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void detach() noexcept {
    std::lock_guard lock(mutex_);
    resource_.reset();
  }

 private:
  struct Block {
    std::shared_ptr<allocator::VmmResource> mr;
    void* p;
    std::size_t bytes;
  };
  static void free_block(void* context) {
    auto* block = static_cast<Block*>(context);
    if (block == nullptr) return;
    block->mr->deallocate(block->p, block->bytes, kAlignment);
    delete block;
  }

  std::mutex mutex_;
  std::shared_ptr<allocator::VmmResource> resource_;
  c10::Allocator* previous_;
};

// Installed above any allocator registered at start-up (which use priority 0 and up).
constexpr std::uint8_t kPriority = std::numeric_limits<std::uint8_t>::max();

}  // namespace

struct AllocatorScope::Installed {
  std::shared_ptr<allocator::VmmResource> resource;
  std::unique_ptr<VmmAllocator> allocator;  // never freed (Note [Allocator lifetime])
  c10::Allocator* previous = nullptr;
  bool active = true;
  ~Installed() { leak_deliberately(allocator); }
};

AllocatorScope::AllocatorScope(std::unique_ptr<Installed> installed) noexcept
    : installed_(std::move(installed)) {}

AllocatorScope::AllocatorScope(AllocatorScope&& other) noexcept = default;

AllocatorScope::~AllocatorScope() { restore(); }

void AllocatorScope::restore() noexcept {
  if (!installed_ || !installed_->active) return;
  installed_->active = false;
  c10::SetCPUAllocator(installed_->previous, kPriority);
  installed_->allocator->detach();
}

allocator::VmmResource& AllocatorScope::resource() const noexcept {
  return *installed_->resource;
}

runtime::PagerStats AllocatorScope::stats() const { return installed_->resource->stats(); }

AllocatorScope use_allocator(const allocator::VmmOptions& options) {
  return use_allocator(std::make_shared<allocator::VmmResource>(options));
}

AllocatorScope use_allocator(const VirtualCheckpoint& weights) {
  // The resource holds a copy of the checkpoint (its shared state) for as long as it lives.
  auto* resource = new allocator::VmmResource(weights.mapped());
  return use_allocator(std::shared_ptr<allocator::VmmResource>(
      resource, [keep = weights](allocator::VmmResource* r) { delete r; }));
}

AllocatorScope use_allocator(std::shared_ptr<allocator::VmmResource> resource) {
  LEMA_EXPECTS(resource != nullptr, "use_allocator: no resource given");
  auto installed = std::make_unique<AllocatorScope::Installed>();
  installed->resource = resource;
  installed->previous = c10::GetCPUAllocator();
  installed->allocator = std::make_unique<VmmAllocator>(std::move(resource), installed->previous);
  c10::SetCPUAllocator(installed->allocator.get(), kPriority);
  return AllocatorScope(std::move(installed));
}

}  // namespace lema::torch
