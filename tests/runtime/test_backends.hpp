// Backends for tests, built over the host backend:
//  - StagedBackend: its pool is not host-visible (window() == nullptr), so fills must take the
//    device path: staging buffer + copy_to_chunk + fence, as on a GPU;
//  - DelayedFenceBackend: fences complete only after a delay or when the test signals them,
//    and every unmap checks that no fence recorded for that page is still pending.
// Plus the CUDA backends over the fake driver, and reading device memory back.
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

#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "lema/runtime/cuda_backend.hpp"
#ifdef LEMA_FAKE_CUDA_DRIVER
#include "fake_cuda_control.hpp"
#endif

namespace lema::test {

using runtime::Access;
using runtime::Backend;
using runtime::Fence;
using runtime::PhysicalPool;
using runtime::Queue;
using runtime::Reservation;
using runtime::StagingBuffer;

/// Forwards every primitive to an inner backend (through its public, checked entry points).
class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  std::string_view name() const noexcept override { return inner_->name(); }
  std::uint64_t granularity() const noexcept override { return inner_->granularity(); }
  runtime::BackendCapabilities capabilities() const noexcept override {
    return inner_->capabilities();
  }

 protected:
  Reservation do_reserve(std::uint64_t bytes) override { return inner_->reserve(bytes); }
  std::unique_ptr<PhysicalPool> do_create_pool(std::size_t chunks, std::uint64_t bytes) override {
    return inner_->create_pool(chunks, bytes);
  }
  void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    inner_->map(pool, chunk, addr, access);
  }
  void do_map_pages(PhysicalPool& pool, std::span<const runtime::PageMapping> pages,
                    Access access) override {
    inner_->map_pages(pool, pages, access);
  }
  void do_unmap(std::byte* addr, std::uint64_t bytes) override { inner_->unmap(addr, bytes); }
  // The pool is the inner backend's, which keeps its own released flag in step.
  void do_release_pool_memory(PhysicalPool& pool) override { inner_->release_pool_memory(pool); }
  void do_restore_pool_memory(PhysicalPool& pool) override { inner_->restore_pool_memory(pool); }
  bool do_set_unmapped_pages(runtime::UnmappedPages* pages) noexcept override {
    return inner_->set_unmapped_pages(pages);
  }
  std::uint64_t do_written_bytes(const std::byte* addr, std::uint64_t bytes) override {
    return inner_->written_bytes(addr, bytes);
  }
  std::unique_ptr<StagingBuffer> do_allocate_staging(std::uint64_t bytes) override {
    return inner_->allocate_staging(bytes);
  }
  Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                         std::span<const std::byte> src) override {
    return inner_->copy_to_chunk(pool, chunk, offset, src);
  }
  Fence do_record_fence(Queue q) override { return inner_->record_fence(q); }
  bool do_fence_complete(const Fence& f) override { return inner_->fence_complete(f); }
  void do_wait_fence(const Fence& f) override { inner_->wait_fence(f); }
  void do_queue_wait(Queue q, const Fence& f) override { inner_->queue_wait(q, f); }

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
  runtime::BackendCapabilities capabilities() const noexcept override {
    runtime::BackendCapabilities c = ForwardingBackend::capabilities();
    c.host_window = false;
    return c;
  }

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

  std::atomic<std::uint64_t> copies{0};

 private:
  std::unique_ptr<PhysicalPool> do_create_pool(std::size_t chunks, std::uint64_t bytes) override {
    return std::make_unique<Pool>(inner().create_pool(chunks, bytes));
  }
  void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    inner().map(static_cast<Pool&>(pool).inner(), chunk, addr, access);
  }
  void do_map_pages(PhysicalPool& pool, std::span<const runtime::PageMapping> pages,
                    Access access) override {
    inner().map_pages(static_cast<Pool&>(pool).inner(), pages, access);
  }
  void do_release_pool_memory(PhysicalPool& pool) override {
    inner().release_pool_memory(static_cast<Pool&>(pool).inner());
  }
  void do_restore_pool_memory(PhysicalPool& pool) override {
    inner().restore_pool_memory(static_cast<Pool&>(pool).inner());
  }
  Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                         std::span<const std::byte> src) override {
    copies.fetch_add(1);
    return inner().copy_to_chunk(static_cast<Pool&>(pool).inner(), chunk, offset, src);
  }
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

  std::atomic<std::uint64_t> violations{0};  // unmaps of a page whose last use was pending
  std::atomic<std::uint64_t> fence_queries{0};
  std::atomic<std::uint64_t> fence_waits{0};

 private:
  Fence do_record_fence(Queue) override { return record_fence_for({}, 1'000'000); }
  bool do_fence_complete(const Fence& f) override {
    fence_queries.fetch_add(1);
    return f.trivially_complete() || static_cast<State*>(f.state())->complete();
  }
  void do_wait_fence(const Fence& f) override {
    fence_waits.fetch_add(1);
    while (!do_fence_complete(f)) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  void do_unmap(std::byte* addr, std::uint64_t bytes) override {
    {
      std::lock_guard lock(mutex_);
      auto it = pending_.find(addr);
      if (it != pending_.end()) {
        for (const auto& st : it->second)
          if (!st->complete()) violations.fetch_add(1);
        pending_.erase(it);
      }
    }
    ForwardingBackend::do_unmap(addr, bytes);
  }

  std::mutex mutex_;
  std::map<const std::byte*, std::vector<std::shared_ptr<State>>> pending_;
};

/// Reads `n` bytes of device memory at `addr` with the cuMemcpyDtoH of the driver `library`
/// (loaded the way the backends load theirs; the calling thread must have the device's context
/// current, as it has after any call of a CUDA backend). Fails the test where it cannot.
inline std::vector<std::byte> read_device(const std::string& library, const void* addr,
                                          std::size_t n) {
  using DtoH = int (*)(void*, unsigned long long, std::size_t);
  static std::mutex mutex;
  static std::map<std::string, DtoH> found;
  DtoH copy = nullptr;
  {
    std::lock_guard lock(mutex);
    auto it = found.find(library);
    if (it == found.end()) {
      DtoH fn = nullptr;
      if (void* lib = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL)) {
        using Get = int (*)(const char*, void**, int, unsigned long long, int*);
        void* sym = nullptr;
        int status = 0;
        if (auto get = reinterpret_cast<Get>(::dlsym(lib, "cuGetProcAddress_v2"));
            get != nullptr && get("cuMemcpyDtoH", &sym, 13000, 0, &status) == 0)
          fn = reinterpret_cast<DtoH>(sym);
      }
      it = found.emplace(library, fn).first;
    }
    copy = it->second;
  }
  std::vector<std::byte> out(n);
  EXPECT_NE(copy, nullptr) << "no cuMemcpyDtoH in " << library;
  if (copy != nullptr) {
    EXPECT_EQ(copy(out.data(), reinterpret_cast<unsigned long long>(addr), n), 0);
  }
  return out;
}

#ifdef LEMA_FAKE_CUDA_DRIVER
/// The fake CUDA driver the tests load: $LEMA_CUDA_DRIVER (ctest sets it), else the one built
/// beside the tests.
inline std::string fake_cuda_driver_path() {
  const char* env = std::getenv("LEMA_CUDA_DRIVER");
  return env != nullptr && *env != '\0' ? env : LEMA_FAKE_CUDA_DRIVER;
}

/// The fake driver's controls, over the library the backends load (one per process).
inline FakeCudaControl& fake() {
  static FakeCudaControl* control = new FakeCudaControl(fake_cuda_driver_path());
  return *control;
}

/// Backend options naming the fake driver.
inline runtime::CudaBackendOptions fake_options() {
  runtime::CudaBackendOptions o;
  o.driver_library = fake_cuda_driver_path();
  return o;
}

/// Sets a fake-driver setting for the scope of a test.
class FakeSetting {
 public:
  FakeSetting(const char* key, long long value) : key_(key), old_(fake().configure(key, value)) {}
  FakeSetting(const FakeSetting&) = delete;
  FakeSetting& operator=(const FakeSetting&) = delete;
  ~FakeSetting() { fake().configure(key_, old_); }

 private:
  const char* key_;
  long long old_;
};

/// Arms the fake driver's misuse detectors: a misuse aborts with the fake's message.
inline void make_fake_cuda_strict() { fake().configure("strict", 1); }

/// A test over the fake driver that must not misuse it: TearDown fails the test, naming the
/// last misuse, when the fake counted one during the test.
class FakeDriverTest : public ::testing::Test {
 protected:
  void SetUp() override { misuses_ = fake().misuse_count(); }
  void TearDown() override {
    EXPECT_EQ(fake().misuse_count(), misuses_) << fake().last_misuse();
  }

 private:
  std::uint64_t misuses_ = 0;
};

/// The cuda backend over the fake driver, misuse detectors armed. It is the backend as it
/// ships: not host-accessible (the fake's device memory happens to be host memory, but the
/// suite reads it back with cuMemcpyDtoH, as on a GPU).
inline std::unique_ptr<Backend> make_fake_cuda_backend(std::uint64_t granularity = 0) {
  auto b = runtime::make_cuda_backend(
      {.device = 0, .driver_library = fake_cuda_driver_path(), .granularity = granularity});
  make_fake_cuda_strict();
  return b;
}

/// The managed backend over the fake driver, misuse detectors armed.
inline std::unique_ptr<Backend> make_fake_managed_backend(std::uint64_t granularity = 0,
                                                          bool prefetch = true) {
  auto b = runtime::make_managed_backend({.device = 0,
                                          .driver_library = fake_cuda_driver_path(),
                                          .granularity = granularity,
                                          .managed_prefetch = prefetch});
  make_fake_cuda_strict();
  return b;
}
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
