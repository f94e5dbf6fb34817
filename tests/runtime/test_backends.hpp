// Backends for tests, built over the host backend:
//  - StagedBackend: its pool is not host-visible (window() == nullptr), so fills must take the
//    device path: staging buffer + copy_to_chunk + fence, as on a GPU;
//  - DelayedFenceBackend: fences complete only after a delay or when the test signals them,
//    and every unmap checks that no fence recorded for that page is still pending.
// Plus the backend factories the conformance suite is typed over.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lema/runtime/backend.hpp"
#include "lema/runtime/events.hpp"

#ifdef LEMA_FAKE_CUDA_DRIVER  // defined for the tests only where the CUDA toolkit was found
#include <dlfcn.h>

#include <cstdlib>

#include "lema/runtime/cuda_backend.hpp"
#endif

namespace lema::test {

using runtime::Access;
using runtime::Backend;
using runtime::Fence;
using runtime::PhysicalPool;
using runtime::Queue;
using runtime::Reservation;
using runtime::StagingBuffer;

/// Forwards every primitive to an inner backend.
class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  std::string_view name() const noexcept override { return inner_->name(); }
  std::uint64_t granularity() const noexcept override { return inner_->granularity(); }
  bool host_accessible() const noexcept override { return inner_->host_accessible(); }
  int unified_memory_device() const noexcept override { return inner_->unified_memory_device(); }
  Reservation reserve(std::uint64_t bytes) override { return inner_->reserve(bytes); }
  std::unique_ptr<PhysicalPool> create_pool(std::size_t chunks, std::uint64_t bytes) override {
    return inner_->create_pool(chunks, bytes);
  }
  void map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    inner_->map(pool, chunk, addr, access);
  }
  void map_pages(PhysicalPool& pool, std::span<const runtime::PageMapping> pages,
                 Access access) override {
    inner_->map_pages(pool, pages, access);
  }
  void unmap(std::byte* addr, std::uint64_t bytes) override { inner_->unmap(addr, bytes); }
  std::unique_ptr<StagingBuffer> allocate_staging(std::uint64_t bytes) override {
    return inner_->allocate_staging(bytes);
  }
  Fence copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                      std::span<const std::byte> src) override {
    return inner_->copy_to_chunk(pool, chunk, offset, src);
  }
  Fence record_fence(Queue q) override { return inner_->record_fence(q); }
  bool fence_complete(const Fence& f) override { return inner_->fence_complete(f); }
  void wait_fence(const Fence& f) override { inner_->wait_fence(f); }
  void queue_wait(Queue q, const Fence& f) override { inner_->queue_wait(q, f); }

 protected:
  // Reservations come from the inner backend and are released through it.
  void release(std::byte*, std::uint64_t) noexcept override {}
  Backend& inner() { return *inner_; }

 private:
  std::unique_ptr<Backend> inner_;
};

/// A pool whose memory the "host" cannot see directly.
class StagedBackend final : public ForwardingBackend {
 public:
  explicit StagedBackend(std::uint64_t granularity = std::uint64_t{2} << 20)
      : ForwardingBackend(runtime::make_host_backend(granularity)) {}
  std::string_view name() const noexcept override { return "staged"; }

  class Pool final : public PhysicalPool {
   public:
    explicit Pool(std::unique_ptr<PhysicalPool> inner) : inner_(std::move(inner)) {}
    std::size_t chunk_count() const noexcept override { return inner_->chunk_count(); }
    std::uint64_t chunk_bytes() const noexcept override { return inner_->chunk_bytes(); }
    std::byte* window(std::size_t) const noexcept override { return nullptr; }
    PhysicalPool& inner() { return *inner_; }

   private:
    std::unique_ptr<PhysicalPool> inner_;
  };

  std::unique_ptr<PhysicalPool> create_pool(std::size_t chunks, std::uint64_t bytes) override {
    return std::make_unique<Pool>(inner().create_pool(chunks, bytes));
  }
  void map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    inner().map(static_cast<Pool&>(pool).inner(), chunk, addr, access);
  }
  void map_pages(PhysicalPool& pool, std::span<const runtime::PageMapping> pages,
                 Access access) override {
    inner().map_pages(static_cast<Pool&>(pool).inner(), pages, access);
  }
  Fence copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                      std::span<const std::byte> src) override {
    copies.fetch_add(1);
    return inner().copy_to_chunk(static_cast<Pool&>(pool).inner(), chunk, offset, src);
  }
  std::atomic<std::uint64_t> copies{0};
};

/// Fences that complete late: at a deadline, or only when signalled.
class DelayedFenceBackend final : public ForwardingBackend {
 public:
  struct State final : runtime::FenceState {
    std::atomic<std::uint64_t> deadline_ns{std::numeric_limits<std::uint64_t>::max()};
    bool complete() const { return runtime::now_ns() >= deadline_ns.load(); }
  };

  DelayedFenceBackend() : ForwardingBackend(runtime::make_host_backend()) {}
  std::string_view name() const noexcept override { return "delayed-fence"; }

  /// A fence over the last use of the pages at `addrs`, completing after `delay_ns`, or never
  /// until signal() when delay_ns is max().
  Fence record_fence_for(std::vector<const std::byte*> addrs, std::uint64_t delay_ns) {
    auto st = std::make_shared<State>();
    if (delay_ns != std::numeric_limits<std::uint64_t>::max())
      st->deadline_ns = runtime::now_ns() + delay_ns;
    std::lock_guard lock(mutex_);
    for (const std::byte* a : addrs) pending_[a].push_back(st);
    return Fence(st);
  }
  static void signal(const Fence& f) { static_cast<State*>(f.state())->deadline_ns = 0; }

  Fence record_fence(Queue) override { return record_fence_for({}, 1'000'000); }
  bool fence_complete(const Fence& f) override {
    fence_queries.fetch_add(1);
    return f.trivially_complete() || static_cast<State*>(f.state())->complete();
  }
  void wait_fence(const Fence& f) override {
    fence_waits.fetch_add(1);
    while (!fence_complete(f)) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  void unmap(std::byte* addr, std::uint64_t bytes) override {
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(addr);
      if (it != pending_.end()) {
        for (const auto& st : it->second)
          if (!st->complete()) violations.fetch_add(1);
        pending_.erase(it);
      }
    }
    ForwardingBackend::unmap(addr, bytes);
  }

  std::atomic<std::uint64_t> violations{0};  // unmaps of a page whose last use was pending
  std::atomic<std::uint64_t> fence_queries{0};
  std::atomic<std::uint64_t> fence_waits{0};

 private:
  std::mutex mutex_;
  std::map<const std::byte*, std::vector<std::shared_ptr<State>>> pending_;
};

// ---- factories for typed suites ----

struct HostBackendFactory {
  static constexpr const char* kName = "host";
  static std::unique_ptr<Backend> make() { return runtime::make_host_backend(); }
};
/// The host backend over huge pages, or nullptr (the suite skips) where the system has too few
/// free for the suite's pools.
struct HugeHostBackendFactory {
  static constexpr const char* kName = "host-huge";
  static std::unique_ptr<Backend> make() {
    const runtime::HugePagePool pool = runtime::huge_page_pool();
    if (pool.available < 4 || pool.page_bytes != (std::uint64_t{2} << 20)) return nullptr;
    return runtime::make_host_backend(pool.page_bytes, runtime::HostPages::huge);
  }
};
struct StagedBackendFactory {
  static constexpr const char* kName = "staged";
  static std::unique_ptr<Backend> make() { return std::make_unique<StagedBackend>(); }
};
struct DelayedFenceBackendFactory {
  static constexpr const char* kName = "delayed-fence";
  static std::unique_ptr<Backend> make() { return std::make_unique<DelayedFenceBackend>(); }
};

#ifdef LEMA_FAKE_CUDA_DRIVER
/// The fake CUDA driver the tests load: $LEMA_CUDA_DRIVER (ctest sets it), else the one built
/// beside the tests.
inline std::string fake_cuda_driver_path() {
  const char* env = std::getenv("LEMA_CUDA_DRIVER");
  return env != nullptr && *env != '\0' ? env : LEMA_FAKE_CUDA_DRIVER;
}

/// The cuda backend over the fake driver, with the fake's misuse detectors armed (a misuse
/// aborts with the fake's message). The fake's device memory is host memory mapped at the device
/// addresses, so the CPU may read mapped pages and the suite checks their bytes and protections
/// as for the host backend.
class FakeCudaBackend final : public ForwardingBackend {
 public:
  explicit FakeCudaBackend(std::uint64_t granularity = 0)
      : ForwardingBackend(runtime::make_cuda_backend(
            {.device = 0, .driver_library = fake_cuda_driver_path(), .granularity = granularity})) {
    if (void* lib = ::dlopen(fake_cuda_driver_path().c_str(), RTLD_NOW | RTLD_NOLOAD)) {
      using Configure = long long (*)(const char*, long long);
      if (auto configure = reinterpret_cast<Configure>(::dlsym(lib, "fake_cuda_configure")))
        configure("strict", 1);
      ::dlclose(lib);
    }
  }
  bool host_accessible() const noexcept override { return true; }
};

struct FakeCudaBackendFactory {
  static constexpr const char* kName = "fake-cuda";
  static std::unique_ptr<Backend> make() { return std::make_unique<FakeCudaBackend>(); }
};
#endif

/// Protection of the mapping holding `addr` in /proc/self/maps ("r--s", "---p"), or "" when
/// the address is not mapped at all.
inline std::string mapping_perms(const void* addr) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  while (std::getline(maps, line)) {
    std::istringstream ls(line);
    std::string range, perms;
    ls >> range >> perms;
    const auto dash = range.find('-');
    const std::uintptr_t lo = std::stoull(range.substr(0, dash), nullptr, 16);
    const std::uintptr_t hi = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (a >= lo && a < hi) return perms;
  }
  return "";
}

}  // namespace lema::test
