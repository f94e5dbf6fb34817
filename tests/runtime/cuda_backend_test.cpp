// The CUDA backends over the fake driver: why they are unavailable, out-of-memory rollback,
// handles released, the fake's misuse detectors, and a Pager filling and evicting through them.
#include "lema/runtime/cuda_backend.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "fake_cuda_control.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/pinned_host_pool.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::CudaBackendOptions;
using runtime::CudaUnavailable;
using runtime::Fence;
using runtime::Lease;
using runtime::PageMapping;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PolicyKind;
using runtime::Queue;

// CUresults, as the fake returns them (the tests do not include cuda.h).
constexpr int kInvalidValue = 1;  // CUDA_ERROR_INVALID_VALUE
constexpr int kOutOfMemory = 2;   // CUDA_ERROR_OUT_OF_MEMORY

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx",
                static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(p)));
  return buf;
}

std::span<const std::byte> first(StagingBuffer& s, std::size_t n) {
  return {s.bytes().data(), n};
}

// ---- unavailable ----

TEST(CudaBackend, MissingDriverLibraryIsNamedInTheReason) {
  CudaBackendOptions o;
  o.driver_library = "/nonexistent/libcuda.so.1";
  const std::string reason = runtime::cuda_backend_unavailable_reason(o);
  EXPECT_NE(reason.find("/nonexistent/libcuda.so.1"), std::string::npos) << reason;
  EXPECT_NE(reason.find("LEMA_CUDA_DRIVER"), std::string::npos) << reason;
  EXPECT_NE(runtime::managed_backend_unavailable_reason(o), "");
  try {
    (void)runtime::make_cuda_backend(o);
    FAIL() << "no CudaUnavailable";
  } catch (const CudaUnavailable& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent"), std::string::npos);
  }
  std::string why;
  EXPECT_EQ(runtime::try_make_cuda_backend(o, &why), nullptr);
  EXPECT_EQ(why, reason);
}

TEST(CudaBackend, DriverNamedByTheEnvironmentIsLoaded) {
  const std::string saved = fake_cuda_driver_path();
  ::setenv("LEMA_CUDA_DRIVER", "/nonexistent/fake-driver.so", 1);
  const std::string reason = runtime::cuda_backend_unavailable_reason();
  ::setenv("LEMA_CUDA_DRIVER", saved.c_str(), 1);
  EXPECT_NE(reason.find("/nonexistent/fake-driver.so"), std::string::npos) << reason;
  EXPECT_EQ(runtime::cuda_backend_unavailable_reason(), "");
}

TEST(CudaBackend, DeviceWithoutVirtualMemoryManagementIsRefusedWithTheReason) {
  FakeSetting no_vmm("vmm", 0);
  const std::string reason = runtime::cuda_backend_unavailable_reason(fake_options());
  EXPECT_NE(reason.find("virtual memory management"), std::string::npos) << reason;
  EXPECT_THROW((void)runtime::make_cuda_backend(fake_options()), CudaUnavailable);
  EXPECT_EQ(runtime::managed_backend_unavailable_reason(fake_options()), "");
}

TEST(CudaBackend, NoDeviceIsRefusedWithTheReason) {
  FakeSetting none("devices", 0);
  const std::string reason = runtime::cuda_backend_unavailable_reason(fake_options());
  EXPECT_NE(reason.find("CUDA_ERROR_NO_DEVICE"), std::string::npos) << reason;
  CudaBackendOptions o = fake_options();
  EXPECT_THROW((void)runtime::make_cuda_backend(o), CudaUnavailable);
}

TEST(CudaBackend, MissingDeviceOrdinalIsRefusedWithTheCount) {
  CudaBackendOptions o = fake_options();
  o.device = 3;
  const std::string reason = runtime::cuda_backend_unavailable_reason(o);
  EXPECT_NE(reason.find("device 3"), std::string::npos) << reason;
  EXPECT_NE(reason.find("1 device(s)"), std::string::npos) << reason;
}

// ---- resources ----

TEST(CudaBackend, OutOfMemoryAtPoolCreationNamesTheSizesAndRollsBack) {
  const std::uint64_t before = fake().live_handles();
  {
    FakeSetting small("memory", static_cast<long long>(10_MiB));
    auto b = runtime::make_cuda_backend(fake_options());
    const std::uint64_t with_backend = fake().live_handles();
    try {
      (void)b->create_pool(8, 2_MiB);
      FAIL() << "no OutOfMemory";
    } catch (const OutOfMemory& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("8 chunks of 2 MiB = 16 MiB"), std::string::npos) << m;
      EXPECT_NE(m.find("chunk 5"), std::string::npos) << m;
      EXPECT_NE(m.find("10 MiB free of 10 MiB"), std::string::npos) << m;
    }
    EXPECT_EQ(fake().live_handles(), with_backend);  // nothing created survives the failure
    auto pool = b->create_pool(5, 2_MiB);            // and all of it can be created again
    EXPECT_EQ(pool->chunk_count(), 5u);
  }
  EXPECT_EQ(fake().live_handles(), before);
}

using CudaBackendUse = FakeDriverTest;

TEST_F(CudaBackendUse, EveryHandleIsReleasedWithItsOwner) {
  const std::uint64_t before = fake().live_handles();
  {
    auto b = runtime::make_cuda_backend(fake_options());
    const auto g = b->granularity();
    Reservation r = b->reserve(4 * g);
    auto pool = b->create_pool(2, g);
    auto staging = b->allocate_staging(4096);
    runtime::Fence f = b->copy_to_chunk(*pool, 1, 0, first(*staging, 4096));
    b->wait_fence(f);
    b->map(*pool, 1, r.base() + g, Access::read);
    EXPECT_EQ(fake().query_mapped(r.base() + g), FakeMapping::read);
    EXPECT_EQ(fake().query_mapped(r.base()), FakeMapping::reserved);
    b->unmap(r.base(), 4 * g);
    EXPECT_EQ(fake().query_mapped(r.base() + g), FakeMapping::reserved);
    EXPECT_GT(fake().live_handles(), before);
  }
  EXPECT_EQ(fake().live_handles(), before);
}

TEST(CudaBackend, QueueWaitOrdersAStreamAfterAFenceWithoutBlockingTheHost) {
  auto b = runtime::make_cuda_backend(fake_options());
  void* producer = fake().test_stream(nullptr, 1);
  void* consumer = fake().test_stream(nullptr, 1);
  fake().hold(producer, true);
  fake().touch(producer, nullptr, 0);  // some work on the producer
  const runtime::Fence produced = b->record_fence(Queue{producer});
  b->queue_wait(Queue{consumer}, produced);
  const runtime::Fence consumed = b->record_fence(Queue{consumer});
  EXPECT_FALSE(b->fence_complete(produced));
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(b->fence_complete(consumed));  // still waiting for the producer
  fake().hold(producer, false);
  b->wait_fence(consumed);
  EXPECT_TRUE(b->fence_complete(produced));
  fake().test_stream(consumer, 0);
  fake().test_stream(producer, 0);
}

// ---- the fake's misuse detectors ----

class FakeMisuse : public ::testing::Test {
 protected:
  void SetUp() override {
    strict_ = fake().configure("strict", 0);
    misuses_ = fake().misuse_count();
  }
  void TearDown() override { fake().configure("strict", strict_); }
  std::uint64_t new_misuses() { return fake().misuse_count() - misuses_; }

  std::unique_ptr<Backend> backend = runtime::make_cuda_backend(fake_options());

 private:
  long long strict_ = 0;
  std::uint64_t misuses_ = 0;
};

TEST_F(FakeMisuse, UnmapWhileACopyIntoTheChunkIsPending) {
  Backend& b = *backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(g);
  auto pool = b.create_pool(1, g);
  auto staging = b.allocate_staging(g);
  b.map(*pool, 0, r.base(), Access::read);
  runtime::Fence copied;
  {
    FakeSetting hold("hold", 1);
    copied = b.copy_to_chunk(*pool, 0, 0, first(*staging, g));
    EXPECT_FALSE(b.fence_complete(copied));
    b.unmap(r.base(), g);
  }
  EXPECT_EQ(new_misuses(), 1u);
  EXPECT_NE(fake().last_misuse().find("not complete"), std::string::npos) << fake().last_misuse();
  b.wait_fence(copied);
}

TEST_F(FakeMisuse, UnmapWhileAKernelReadingThePageIsPending) {
  Backend& b = *backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(g);
  auto pool = b.create_pool(1, g);
  b.map(*pool, 0, r.base(), Access::read);
  void* compute = fake().test_stream(nullptr, 1);
  fake().hold(compute, true);
  ASSERT_EQ(fake().touch(compute, r.base(), g), 0);
  const runtime::Fence last_use = b.record_fence(Queue{compute});
  EXPECT_FALSE(b.fence_complete(last_use));
  b.unmap(r.base(), g);  // the bug the pager must never commit
  EXPECT_EQ(new_misuses(), 1u);
  fake().hold(compute, false);
  b.wait_fence(last_use);
  fake().test_stream(compute, 0);
}

TEST_F(FakeMisuse, KernelTouchingAnUnmappedPage) {
  Backend& b = *backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(2 * g);
  auto pool = b.create_pool(1, g);
  b.map(*pool, 0, r.base(), Access::read);
  void* compute = fake().test_stream(nullptr, 1);
  EXPECT_EQ(fake().touch(compute, r.base(), g), 0);
  EXPECT_EQ(new_misuses(), 0u);
  EXPECT_EQ(fake().query_mapped(r.base() + g), FakeMapping::reserved);
  EXPECT_EQ(fake().touch(compute, r.base(), 2 * g), -1);
  EXPECT_EQ(new_misuses(), 1u);
  EXPECT_NE(fake().last_misuse().find("not mapped"), std::string::npos);
  b.unmap(r.base(), g);
  fake().test_stream(compute, 0);
}

// The raw driver calls the backends never make wrongly, made wrongly on purpose.
class RawDriver {
 public:
  RawDriver() {
    handle_ = ::dlopen(fake_cuda_driver_path().c_str(), RTLD_NOW | RTLD_LOCAL);
    using Get = int (*)(const char*, void**, int, unsigned long long, int*);
    auto get = reinterpret_cast<Get>(::dlsym(handle_, "cuGetProcAddress_v2"));
    auto find = [&](const char* name, auto& fn) {
      void* p = nullptr;
      int status = 0;
      get(name, &p, 13000, 0, &status);
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    find("cuMemRelease", release);
    find("cuMemFreeHost", free_host);
    find("cuMemHostAlloc", host_alloc);
    find("cuMemSetAccess", set_access);
  }
  ~RawDriver() { ::dlclose(handle_); }
  int (*release)(unsigned long long) = nullptr;
  int (*free_host)(void*) = nullptr;
  int (*host_alloc)(void**, std::size_t, unsigned) = nullptr;
  // CUmemAccessDesc: {location {type, id}, flags}, as three ints.
  struct AccessDesc {
    int location_type = 1;  // CU_MEM_LOCATION_TYPE_DEVICE
    int location_id = 0;
    int flags = 1;  // CU_MEM_ACCESS_FLAGS_PROT_READ
  };
  int (*set_access)(std::uintptr_t, std::size_t, const AccessDesc*, std::size_t) = nullptr;

 private:
  void* handle_;
};

TEST_F(FakeMisuse, DoubleReleaseAndDoubleFree) {
  RawDriver raw;
  void* p = nullptr;
  ASSERT_EQ(raw.host_alloc(&p, 4096, 0), 0);
  EXPECT_EQ(raw.free_host(p), 0);
  EXPECT_NE(raw.free_host(p), 0);
  EXPECT_EQ(new_misuses(), 1u);
  EXPECT_NE(raw.release(987654), 0);
  EXPECT_EQ(new_misuses(), 2u);
  EXPECT_NE(fake().last_misuse().find("double release"), std::string::npos);
}

TEST_F(FakeMisuse, MapOutsideAReservationOrOverAMapping) {
  Backend& b = *backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(g);
  auto pool = b.create_pool(2, g);
  EXPECT_THROW(b.map(*pool, 0, r.base() + g, Access::read), runtime::CudaError);
  EXPECT_EQ(new_misuses(), 1u);
  EXPECT_NE(fake().last_misuse().find("outside any reservation"), std::string::npos);
  b.map(*pool, 0, r.base(), Access::read);
  EXPECT_THROW(b.map(*pool, 1, r.base(), Access::read), runtime::CudaError);
  EXPECT_EQ(new_misuses(), 2u);
  EXPECT_NE(fake().last_misuse().find("existing mapping"), std::string::npos);
  b.unmap(r.base(), g);
}

// What the driver refuses and a wrong coalescing of runs would do: cuMemSetAccess over a range
// with an unmapped page in it.
TEST_F(FakeMisuse, SetAccessOverARangeWithAHole) {
  Backend& b = *backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(3 * g);
  auto pool = b.create_pool(2, g);
  b.map(*pool, 0, r.base(), Access::read);
  b.map(*pool, 1, r.base() + 2 * g, Access::read);
  RawDriver raw;
  const RawDriver::AccessDesc read;
  EXPECT_EQ(raw.set_access(reinterpret_cast<std::uintptr_t>(r.base()), 3 * g, &read, 1),
            kInvalidValue);
  EXPECT_EQ(new_misuses(), 1u);
  EXPECT_NE(fake().last_misuse().find("not entirely mapped"), std::string::npos)
      << fake().last_misuse();
  EXPECT_EQ(fake().query_mapped(r.base() + g), FakeMapping::reserved);
  b.unmap(r.base(), 3 * g);
}

TEST_F(FakeMisuse, LeakedHandleIsCounted) {
  RawDriver raw;
  const std::uint64_t before = fake().live_handles();
  void* p = nullptr;
  ASSERT_EQ(raw.host_alloc(&p, 4096, 0), 0);
  EXPECT_EQ(fake().live_handles(), before + 1);  // what the exit report would name
  EXPECT_EQ(raw.free_host(p), 0);
  EXPECT_EQ(fake().live_handles(), before);
  EXPECT_EQ(new_misuses(), 0u);
}

// ---- batched maps: access set once per run of adjacent pages (Note [Access per run]) ----

class MapPages : public FakeDriverTest {
 protected:
  static std::byte pattern(std::size_t chunk, std::uint64_t offset) {
    return std::byte(static_cast<unsigned char>(chunk * 37 + offset * 13 + offset / 4096));
  }
  // Gives every chunk its own bytes, through staging and a copy.
  void fill(PhysicalPool& pool) {
    auto staging = backend->allocate_staging(kPage);
    for (std::size_t c = 0; c < pool.chunk_count(); ++c) {
      for (std::uint64_t i = 0; i < kPage; ++i) staging->bytes()[i] = pattern(c, i);
      backend->wait_fence(backend->copy_to_chunk(pool, c, 0, first(*staging, kPage)));
    }
  }
  // The page at `addr` is mapped read-only and shows the bytes of `chunk`.
  static void expect_chunk_at(const std::byte* addr, std::size_t chunk) {
    ASSERT_EQ(fake().query_mapped(addr), FakeMapping::read) << hex(addr);
    std::vector<std::byte> want(kPage);
    for (std::uint64_t i = 0; i < kPage; ++i) want[i] = pattern(chunk, i);
    EXPECT_EQ(std::memcmp(addr, want.data(), kPage), 0) << "chunk " << chunk << " at " << hex(addr);
  }

  FakeSetting granularity_{"granularity", static_cast<long long>(kPage)};
  std::unique_ptr<Backend> backend = runtime::make_cuda_backend(fake_options());
  Reservation range = backend->reserve(10 * kPage);
  std::unique_ptr<PhysicalPool> pool = backend->create_pool(6, kPage);
  std::byte* at(int page) const { return range.base() + page * kPage; }
  // Pages 0-3 and 6-7, given out of order: two runs of adjacent pages.
  std::vector<PageMapping> two_runs() const {
    return {{2, at(3)}, {4, at(7)}, {0, at(1)}, {5, at(6)}, {3, at(0)}, {1, at(2)}};
  }
};

TEST_F(MapPages, SetsAccessOncePerRunOfAdjacentPages) {
  fill(*pool);
  const std::vector<PageMapping> batch = two_runs();
  const std::uint64_t maps = fake().calls("cuMemMap");
  const std::uint64_t access = fake().calls("cuMemSetAccess");
  backend->map_pages(*pool, batch, Access::read);
  EXPECT_EQ(fake().calls("cuMemMap") - maps, batch.size());
  EXPECT_EQ(fake().calls("cuMemSetAccess") - access, 2u) << "one per run: pages 0-3 and 6-7";
  for (const PageMapping& p : batch) expect_chunk_at(p.addr, p.chunk);
  for (int page : {4, 5, 8, 9}) EXPECT_EQ(fake().query_mapped(at(page)), FakeMapping::reserved);

  // Pages that are not adjacent get one call each.
  const std::uint64_t before_single = fake().calls("cuMemSetAccess");
  const std::vector<PageMapping> apart = {{5, at(9)}, {4, at(5)}};
  backend->unmap(at(7), kPage);
  backend->unmap(at(6), kPage);
  backend->map_pages(*pool, apart, Access::read);
  EXPECT_EQ(fake().calls("cuMemSetAccess") - before_single, 2u);
  expect_chunk_at(at(5), 4);
  expect_chunk_at(at(9), 5);

  // Each page unmaps on its own, from the middle of a run too; its neighbours stay readable.
  backend->unmap(at(1), kPage);
  EXPECT_EQ(fake().query_mapped(at(1)), FakeMapping::reserved);
  expect_chunk_at(at(0), 3);
  expect_chunk_at(at(2), 1);
  for (int page : {0, 2, 3, 5, 9}) backend->unmap(at(page), kPage);
  for (int page = 0; page < 10; ++page)
    EXPECT_EQ(fake().query_mapped(at(page)), FakeMapping::reserved) << "page " << page;
}

// All or nothing: a driver error in the middle of a batch leaves none of it mapped, names the
// call, the address and the size, and the same batch maps afterwards.
TEST_F(MapPages, ErrorInTheMiddleOfABatchLeavesNoneOfItMapped) {
  fill(*pool);
  const std::vector<PageMapping> batch = two_runs();
  const std::uint64_t handles = fake().live_handles();
  struct Failure {
    const char* entry;
    std::uint64_t nth;         // which call of the batch fails
    const std::byte* address;  // what the error names
    const char* size;
  };
  for (const Failure& f :
       {Failure{"cuMemMap", 4, at(6), "64 KiB"}, Failure{"cuMemSetAccess", 2, at(6), "128 KiB"}}) {
    SCOPED_TRACE(f.entry);
    fake().fail(f.entry, f.nth, kOutOfMemory);
    try {
      backend->map_pages(*pool, batch, Access::read);
      ADD_FAILURE() << "no error";
    } catch (const OutOfMemory& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(f.entry), std::string::npos) << m;
      EXPECT_NE(m.find(hex(f.address) + ", " + f.size), std::string::npos) << m;
      EXPECT_NE(m.find("CUDA_ERROR_OUT_OF_MEMORY"), std::string::npos) << m;
    }
    for (int page = 0; page < 10; ++page)
      EXPECT_EQ(fake().query_mapped(at(page)), FakeMapping::reserved) << "page " << page;
    EXPECT_EQ(fake().live_handles(), handles) << "a mapping of the failed batch survived";

    backend->map_pages(*pool, batch, Access::read);
    for (const PageMapping& p : batch) expect_chunk_at(p.addr, p.chunk);
    backend->unmap(range.base(), 10 * kPage);
  }
}

// Pager tests over the fake driver: pages of kPage, and no misuse of the driver (TearDown).
class CudaPager : public FakeDriverTest {
 protected:
  FakeSetting pages_{"granularity", static_cast<long long>(kPage)};
};

// ---- a Pager over the backends ----

// The pinned pool outside the pager: what its resource refuses, named, and nothing left behind.
TEST_F(CudaPager, PinnedHostPoolRefusesWhatItCannotPinAndGivesEverythingBack) {
  const std::uint64_t before = fake().live_handles();
  {
    auto pool = runtime::make_pinned_host_pool(
        {.slot_bytes = kPage, .slots_per_chunk = 4},
        {.device = 0, .driver_library = fake_cuda_driver_path()});
    void* a = pool->allocate(kPage, 4096);
    ASSERT_NE(a, nullptr);
    try {
      (void)pool->allocate(kPage + 1, 8192);  // passes through: more than a page's alignment
      ADD_FAILURE() << "an 8 KiB alignment was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("alignment 8192"), std::string::npos) << e.what();
    }
    fake().fail("cuMemHostAlloc", 1, kOutOfMemory);
    try {
      (void)pool->allocate(4 * kPage);  // passes through to the driver, which cannot pin it
      ADD_FAILURE() << "no error";
    } catch (const OutOfMemory& e) {
      EXPECT_NE(std::string(e.what()).find("256 KiB"), std::string::npos) << e.what();
    }
    pool->deallocate(a, kPage, 4096);
  }
  EXPECT_EQ(fake().live_handles(), before);  // the chunk and the pool's context released
}

// Fill staging and the host cache tier take their pinned page buffers from one pool of the
// backend: a pager whose host cache holds every page pins host memory once (chunks of 32 MiB
// hold 512 pages of kPage), where it used to pin once per page. Every block is given back.
TEST_F(CudaPager, StagingAndTheHostCachePinHostMemoryInFewBlocks) {
  const std::uint64_t before = fake().live_handles();
  const std::uint64_t pinned_before = fake().calls("cuMemHostAlloc");
  {
    OpenedModel m(make_fake_cuda_backend(), small_model(), kPage, "cuda-pinned-pool");
    ASSERT_GE(m.pages(), 8u);
    PagerOptions opt;
    opt.budget_bytes = 3 * kPage;
    opt.host_cache_bytes = m.pages() * kPage;
    Pager pager(m.space, opt);
    for (int pass = 0; pass < 2; ++pass)
      for (const auto* t : tensor_order(m.space.layout(), Order::layer, 7))
        check_tensor(pager, m, *t, false);
    pager.quiesce();
    EXPECT_GT(pager.stats().host_cache_hits, 0u);  // the second pass came from the host cache
    EXPECT_EQ(fake().calls("cuMemHostAlloc") - pinned_before, 1u)
        << "pinned blocks for " << m.pages() << " pages";
  }
  EXPECT_EQ(fake().live_handles(), before);  // the pool's block freed with the backend
}

TEST_F(CudaPager, FillsAndEvictsWithTheBytesOfTheFile) {
  const std::uint64_t before = fake().live_handles();
  {
    OpenedModel m(make_fake_cuda_backend(), small_model(), kPage, "cuda-pager");
    ASSERT_GE(m.pages(), 8u);
    for (PolicyKind policy : {PolicyKind::lru, PolicyKind::trace}) {
      PagerOptions opt;
      opt.budget_bytes = 3 * kPage;
      opt.policy = policy;
      Pager pager(m.space, opt);
      for (int pass = 0; pass < 2; ++pass)
        for (const auto* t : tensor_order(m.space.layout(), Order::layer, 7))
          check_tensor(pager, m, *t, false);
      pager.quiesce();
      const auto st = pager.stats();
      EXPECT_LE(st.peak_resident_bytes, opt.budget_bytes);
      EXPECT_GT(st.evictions, 0u);
      std::size_t mapped = 0;
      for (runtime::PageId p = 0; p < m.pages(); ++p) {
        const FakeMapping state = fake().query_mapped(m.space.page_address(p));
        EXPECT_EQ(state == FakeMapping::read, pager.is_resident(p)) << "page " << p;
        mapped += state == FakeMapping::read;
      }
      EXPECT_LE(mapped, 3u);
    }
  }
  EXPECT_EQ(fake().live_handles(), before);
}

// Note [Registered shared tier]: with the shared tier's pages registered, every page it serves
// reaches the device by one copy straight from the segment (the fake counts copies whose source
// is registered memory); when registration fails, pages go through staging. The bytes are the
// file's either way, and the segment is unregistered once, before it is unmapped (the fake
// calls an unregister of unmapped memory a misuse, which TearDown reports).
TEST_F(CudaPager, SharedTierPagesReachTheDeviceStraightFromTheSegment) {
  const std::uint64_t before = fake().live_handles();
  for (const bool registers : {true, false}) {
    SCOPED_TRACE(registers ? "registered" : "registration refused");
    const std::uint64_t copies_before = fake().registered_copies();
    const std::uint64_t unregisters_before = fake().calls("cuMemHostUnregister");
    if (!registers) fake().fail("cuMemHostRegister", 1, kOutOfMemory);
    std::uint64_t hits = 0;
    {
      OpenedModel m(make_fake_cuda_backend(), small_model(), kPage,
                    registers ? "cuda-shared-registered" : "cuda-shared-staged");
      ASSERT_GE(m.pages(), 8u);
      PagerOptions opt;
      opt.budget_bytes = 3 * kPage;
      opt.shared_host_cache_bytes = m.pages() * kPage;
      Pager pager(m.space, opt);
      for (int pass = 0; pass < 2; ++pass)
        for (const auto* t : tensor_order(m.space.layout(), Order::layer, 7))
          check_tensor(pager, m, *t, false);
      pager.quiesce();
      hits = pager.stats().shared_cache_hits;
      EXPECT_GT(hits, 0u) << "evicted pages came back from the shared tier";
    }
    const std::uint64_t direct = fake().registered_copies() - copies_before;
    const std::uint64_t unregisters = fake().calls("cuMemHostUnregister") - unregisters_before;
    EXPECT_EQ(direct, registers ? hits : 0u);
    EXPECT_EQ(unregisters, registers ? 1u : 0u);
  }
  EXPECT_EQ(fake().live_handles(), before);
}

// The bytes of pages [first, first + count) as the layout places the file's tensors: zero where
// no tensor is.
std::vector<std::byte> expected_pages(const OpenedModel& m, runtime::PageId first,
                                      std::uint32_t count) {
  const std::uint64_t lo = first * m.page_size(), hi = lo + count * m.page_size();
  std::vector<std::byte> out(hi - lo, std::byte{0});
  for (const auto& t : m.space.layout().tensors()) {
    const std::uint64_t a = std::max(lo, t.offset), b = std::min(hi, t.offset + t.nbytes);
    if (a < b)
      std::memcpy(out.data() + (a - lo), m.expected.at(t.name).data() + (a - t.offset), b - a);
  }
  return out;
}

// Note [Access per run]: a cold acquire of N adjacent pages maps N chunks and sets access once.
TEST_F(CudaPager, ColdAcquireOfAdjacentPagesSetsAccessOnce) {
  OpenedModel m(make_fake_cuda_backend(), small_model(), kPage, "cuda-runs");
  PagerOptions opt;
  opt.budget_bytes = 6 * kPage;
  opt.prefetch = false;
  Pager pager(m.space, opt);
  constexpr runtime::PageId kFirst = 1;
  constexpr std::uint32_t kCount = 4;
  const std::uint64_t maps = fake().calls("cuMemMap");
  const std::uint64_t access = fake().calls("cuMemSetAccess");
  Lease lease = pager.acquire_pages({kFirst, kCount});
  EXPECT_EQ(pager.stats().faults, kCount);
  EXPECT_EQ(fake().calls("cuMemMap") - maps, kCount);
  EXPECT_EQ(fake().calls("cuMemSetAccess") - access, 1u);
  const std::vector<std::byte> want = expected_pages(m, kFirst, kCount);
  EXPECT_EQ(std::memcmp(m.space.page_address(kFirst), want.data(), want.size()), 0);
  pager.release(std::move(lease));
}

// Copies into chunks complete before copy_to_chunk returns. The backend's rollback of a failed
// batch unmaps pages whose copies (through the pool window) may still run otherwise, which the
// fake's conservative detector reports as misuse; here the pager's handling of the error is
// under test, not that race.
class CopyWaitingBackend final : public ForwardingBackend {
 public:
  CopyWaitingBackend() : ForwardingBackend(make_fake_cuda_backend()) {}

 private:
  Fence do_copy_to_chunk(PhysicalPool& pool, std::size_t chunk, std::uint64_t offset,
                         std::span<const std::byte> src) override {
    Fence f = ForwardingBackend::do_copy_to_chunk(pool, chunk, offset, src);
    wait_fence(f);
    return f;
  }
};

// A driver error while mapping a batch of fills fails the acquire with the driver's error, leaves
// none of the batch mapped or counted resident, and the next acquire fills the pages.
TEST_F(CudaPager, FailedMapOfABatchIsReportedAndTheNextAcquireSucceeds) {
  OpenedModel m(std::make_unique<CopyWaitingBackend>(), small_model(), kPage, "cuda-map-error");
  ASSERT_GE(m.pages(), 9u);
  PagerOptions opt;
  opt.budget_bytes = 6 * kPage;
  opt.prefetch = false;
  Pager pager(m.space, opt);
  struct Failure {
    const char* entry;
    std::uint64_t nth;
    runtime::PageId first;
  };
  for (const Failure& f : {Failure{"cuMemMap", 3, 1}, Failure{"cuMemSetAccess", 1, 5}}) {
    SCOPED_TRACE(f.entry);
    constexpr std::uint32_t kCount = 4;
    fake().fail(f.entry, f.nth, kOutOfMemory);
    try {
      (void)pager.acquire_pages({f.first, kCount});
      ADD_FAILURE() << "no error";
    } catch (const OutOfMemory& e) {
      EXPECT_NE(std::string(e.what()).find(f.entry), std::string::npos) << e.what();
    }
    std::uint64_t mapped = 0;
    for (runtime::PageId p = 0; p < m.pages(); ++p) {
      const FakeMapping state = fake().query_mapped(m.space.page_address(p));
      EXPECT_EQ(state == FakeMapping::read, pager.is_resident(p)) << "page " << p;
      if (p >= f.first && p < f.first + kCount) {
        EXPECT_EQ(state, FakeMapping::reserved) << "page " << p;
      }
      mapped += state == FakeMapping::read;
    }
    EXPECT_EQ(pager.stats().resident_bytes, mapped * kPage);

    Lease lease = pager.acquire_pages({f.first, kCount});
    const std::vector<std::byte> want = expected_pages(m, f.first, kCount);
    EXPECT_EQ(std::memcmp(m.space.page_address(f.first), want.data(), want.size()), 0);
    pager.release(std::move(lease));
  }
  EXPECT_LE(pager.stats().peak_resident_bytes, opt.budget_bytes);
}

// Note [Device fills]: an acquire for a consumer queue returns while the copy into the chunk is
// still held back, and a kernel enqueued on that queue right after runs only once the copy
// completed, reading the file's bytes.
TEST_F(CudaPager, AcquireForAQueueLeavesTheWaitToTheQueue) {
  OpenedModel m(make_fake_cuda_backend(), small_model(), kPage, "cuda-async");
  PagerOptions opt;
  opt.budget_bytes = 3 * kPage;
  opt.prefetch = false;
  Pager pager(m.space, opt);
  void* compute = fake().test_stream(nullptr, 1);
  constexpr runtime::PageId kPageId = 1;
  const std::byte* addr = m.space.page_address(kPageId);
  constexpr std::uint64_t kNotRun = 0x5eed;
  std::uint64_t sum = kNotRun;
  {
    FakeSetting hold("hold_backend", 1);  // the pager's copy stream starts nothing
    std::atomic<bool> returned{false};
    Lease lease;
    std::thread acquirer([&] {
      lease = pager.acquire_pages({kPageId, 1}, Queue{compute});
      returned = true;
    });
    for (int i = 0; i < 200 && !returned; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    const bool without_host_wait = returned;
    if (!without_host_wait) fake().configure("hold_backend", 0);  // let it finish
    acquirer.join();
    ASSERT_TRUE(without_host_wait) << "the acquire waited on the host for the copy";
    ASSERT_EQ(fake().sum(compute, addr, kPage, &sum), 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    EXPECT_EQ(sum, kNotRun) << "the kernel ran before the copy it reads";
    fake().configure("hold_backend", 0);
    const Fence used = m.backend->record_fence(Queue{compute});
    m.backend->wait_fence(used);
    pager.release(std::move(lease), used);
  }
  Lease host = pager.acquire_pages({kPageId, 1});  // waits on the host: the bytes as filled
  EXPECT_EQ(sum, FakeCudaControl::hash_bytes(addr, kPage));
  pager.release(std::move(host));
  for (const auto* t : tensor_order(m.space.layout(), Order::layer, 0))
    check_tensor(pager, m, *t, false);
  fake().test_stream(compute, 0);
}

// The host cache tier over the cuda backend: pinned staging slots hold pages read once, later
// fills only copy host to device, and every pinned buffer is freed with the pager.
TEST_F(CudaPager, HostCacheTierServesLaterPassesWithoutReading) {
  const std::uint64_t before = fake().live_handles();
  {
    OpenedModel m(make_fake_cuda_backend(), small_model(), kPage, "cuda-cache");
    PagerOptions opt;
    opt.budget_bytes = 3 * kPage;
    opt.host_cache_bytes = m.pages() * kPage;
    opt.policy = PolicyKind::trace;
    Pager pager(m.space, opt);
    for (const auto* t : tensor_order(m.space.layout(), Order::layer, 0))
      check_tensor(pager, m, *t, false);
    pager.quiesce();
    const auto first = pager.stats();
    for (int pass = 0; pass < 2; ++pass)
      for (const auto* t : tensor_order(m.space.layout(), Order::layer, 0))
        check_tensor(pager, m, *t, false);
    pager.quiesce();
    const auto later = pager.stats();
    EXPECT_EQ(later.bytes_read, first.bytes_read);
    EXPECT_GT(later.host_cache_hits, first.host_cache_hits);
    EXPECT_LE(later.peak_resident_bytes, opt.budget_bytes);
  }
  EXPECT_EQ(fake().live_handles(), before) << "a pinned slot outlived the pager";
}

// A page's chunk is reused only after the kernel that read it (a pending stream operation) has
// completed: the fake reports any unmap before that as misuse.
TEST_F(CudaPager, LastUseFenceHoldsTheChunkUntilTheKernelCompleted) {
  OpenedModel m(make_fake_cuda_backend(), small_model(), kPage, "cuda-fence");
  PagerOptions opt;
  opt.budget_bytes = kPage;
  opt.prefetch = false;
  Pager pager(m.space, opt);
  void* compute = fake().test_stream(nullptr, 1);
  fake().hold(compute, true);
  {
    Lease lease = pager.acquire_pages({0, 1});
    ASSERT_EQ(fake().touch(compute, m.space.page_address(0), kPage), 0);
    pager.release(std::move(lease), m.backend->record_fence(Queue{compute}));
  }
  std::atomic<bool> resumed{false};
  std::thread resume([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    resumed = true;
    fake().hold(compute, false);
  });
  Lease other = pager.acquire_pages({1, 1});  // needs page 0's chunk
  EXPECT_TRUE(resumed.load());
  pager.release(std::move(other));
  resume.join();
  fake().test_stream(compute, 0);
}

TEST(ManagedPager, FillsAndPrefetchesWithTheBytesOfTheFile) {
  CudaBackendOptions o = fake_options();
  o.granularity = kPage;
  const std::uint64_t to_device = fake().prefetches(true);
  const std::uint64_t to_host = fake().prefetches(false);
  const std::uint64_t before = fake().live_handles();
  {
    OpenedModel m(runtime::make_managed_backend(o), small_model(), kPage, "managed-pager");
    EXPECT_EQ(m.backend->name(), "managed");
    EXPECT_TRUE(m.backend->host_accessible());
    PagerOptions opt;
    opt.budget_bytes = 3 * kPage;
    Pager pager(m.space, opt);
    for (int pass = 0; pass < 2; ++pass)
      for (const auto* t : tensor_order(m.space.layout(), Order::random, 3 + pass))
        check_tensor(pager, m, *t, false);
    const auto st = pager.stats();
    EXPECT_LE(st.peak_resident_bytes, opt.budget_bytes);
    // Every page made resident was prefetched to the device, every eviction back to the host.
    EXPECT_GE(fake().prefetches(true) - to_device, st.faults);
    EXPECT_GE(fake().prefetches(false) - to_host, st.evictions);
    EXPECT_GT(st.evictions, 0u);
  }
  EXPECT_EQ(fake().live_handles(), before);
}

}  // namespace
}  // namespace lema::test
