// The Backend conformance suite: the same properties for every backend. New backends (the fake
// CUDA driver, real GPUs) add a factory to BackendTypes.
#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

template <typename Factory>
class BackendConformance : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend = Factory::make();
  void SetUp() override {
    if (!backend) GTEST_SKIP() << Factory::kName << " is not available on this machine";
  }

  // Writes `value` over a whole chunk, through the window or a staging copy.
  void fill_chunk(PhysicalPool& pool, std::size_t chunk, std::byte value) {
    if (std::byte* w = pool.window(chunk)) {
      std::memset(w, static_cast<int>(value), pool.chunk_bytes());
      return;
    }
    auto staging = backend->allocate_staging(pool.chunk_bytes());
    ASSERT_GE(staging->bytes().size(), pool.chunk_bytes());
    std::memset(staging->bytes().data(), static_cast<int>(value), pool.chunk_bytes());
    backend->wait_fence(backend->copy_to_chunk(
        pool, chunk, 0, std::span<const std::byte>(staging->bytes().data(), pool.chunk_bytes())));
  }
};

struct FactoryNames {
  template <typename T>
  static std::string GetName(int) {
    std::string n = T::kName;
    for (char& c : n)
      if (c == '-') c = '_';
    return n;
  }
};

using BackendTypes = ::testing::Types<HostBackendFactory, HugeHostBackendFactory,
                                      StagedBackendFactory, DelayedFenceBackendFactory
#ifdef LEMA_FAKE_CUDA_DRIVER
                                      ,
                                      FakeCudaBackendFactory
#endif
                                      >;
TYPED_TEST_SUITE(BackendConformance, BackendTypes, FactoryNames);

TYPED_TEST(BackendConformance, GranularityIsAPowerOfTwo) {
  const auto g = this->backend->granularity();
  EXPECT_TRUE(is_power_of_two(g)) << g;
}

TYPED_TEST(BackendConformance, ReservationIsInaccessibleAndReleased) {
  const auto g = this->backend->granularity();
  std::byte* base = nullptr;
  {  // the reservation is released at the end of the scope (checked by ASan/valgrind runs)
    Reservation r = this->backend->reserve(4 * g);
    ASSERT_TRUE(r);
    base = r.base();
    EXPECT_EQ(r.bytes(), 4 * g);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(base) % g, 0u) << "aligned to the granularity";
    if (!this->backend->host_accessible()) GTEST_SKIP() << "address range not visible to the CPU";
    EXPECT_EQ(mapping_perms(base), "---p");
    EXPECT_EQ(mapping_perms(base + 4 * g - 1), "---p");
    Reservation moved = std::move(r);
    EXPECT_FALSE(r);  // NOLINT(bugprone-use-after-move): the moved-from state is specified
    EXPECT_EQ(moved.base(), base);
  }
}

TYPED_TEST(BackendConformance, MapShowsChunkBytesReadOnlyAndUnmapHidesThem) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(4 * g);
  auto pool = b.create_pool(3, g);
  ASSERT_EQ(pool->chunk_count(), 3u);
  ASSERT_EQ(pool->chunk_bytes(), g);
  for (std::size_t c = 0; c < 3; ++c) this->fill_chunk(*pool, c, std::byte(0x10 + c));

  std::byte* page1 = r.base() + g;
  std::byte* page3 = r.base() + 3 * g;
  b.map(*pool, 2, page1, Access::read);
  b.map(*pool, 0, page3, Access::read);
  if (!b.host_accessible()) GTEST_SKIP() << "mapped pages not visible to the CPU";
  EXPECT_EQ(mapping_perms(page1), "r--s");
  EXPECT_EQ(page1[0], std::byte(0x12));
  EXPECT_EQ(page1[g - 1], std::byte(0x12));
  EXPECT_EQ(page3[g / 2], std::byte(0x10));
  EXPECT_EQ(mapping_perms(r.base()), "---p");  // neighbours untouched

  // A chunk refilled after unmap and mapped elsewhere shows its new bytes there.
  b.unmap(page1, g);
  EXPECT_EQ(mapping_perms(page1), "---p");  // still reserved, not readable
  this->fill_chunk(*pool, 2, std::byte(0x7f));
  b.map(*pool, 2, r.base(), Access::read);
  EXPECT_EQ(r.base()[123], std::byte(0x7f));
  EXPECT_EQ(page3[0], std::byte(0x10));

  b.map(*pool, 1, page1, Access::read_write);
  EXPECT_EQ(mapping_perms(page1).substr(0, 3), "rw-");  // private copy-on-write on the host
  b.unmap(r.base(), 4 * g);
  EXPECT_EQ(mapping_perms(page3), "---p");
}

// map_pages: a batch in any order shows each chunk at its address; each page unmaps on its own
// afterwards, from the middle of a run of adjacent pages too.
TYPED_TEST(BackendConformance, MapPagesShowsEveryChunkAndUnmapsPageByPage) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(8 * g);
  auto pool = b.create_pool(4, g);
  for (std::size_t c = 0; c < 4; ++c) this->fill_chunk(*pool, c, std::byte(0x20 + c));
  auto at = [&](std::size_t page) { return r.base() + page * g; };
  // Pages 0-2 and 5: two runs of adjacent pages, given out of order.
  const std::vector<runtime::PageMapping> batch = {{2, at(2)}, {0, at(0)}, {3, at(5)}, {1, at(1)}};
  b.map_pages(*pool, batch, Access::read);
  if (!b.host_accessible()) {
    for (const auto& p : batch) b.unmap(p.addr, g);
    GTEST_SKIP() << "mapped pages not visible to the CPU";
  }
  for (const auto& p : batch) {
    EXPECT_EQ(mapping_perms(p.addr), "r--s") << "chunk " << p.chunk;
    EXPECT_EQ(p.addr[0], std::byte(0x20 + p.chunk));
    EXPECT_EQ(p.addr[g - 1], std::byte(0x20 + p.chunk));
  }
  for (std::size_t page : {3, 4, 6, 7}) EXPECT_EQ(mapping_perms(at(page)), "---p") << page;

  b.unmap(at(1), g);
  EXPECT_EQ(mapping_perms(at(1)), "---p");
  EXPECT_EQ(at(0)[g / 2], std::byte(0x20));
  EXPECT_EQ(at(2)[g / 2], std::byte(0x22));
  for (std::size_t page : {0, 2, 5}) {
    b.unmap(at(page), g);
    EXPECT_EQ(mapping_perms(at(page)), "---p") << page;
  }
  // The chunks map again, one by one.
  b.map(*pool, 3, at(7), Access::read);
  EXPECT_EQ(at(7)[1], std::byte(0x23));
  b.unmap(at(7), g);
}

// The default map_pages (one map() per page) is all or nothing too: when a map fails, the pages
// the call mapped before it are unmapped again.
class FailingMapBackend final : public ForwardingBackend {
 public:
  FailingMapBackend() : ForwardingBackend(runtime::make_host_backend()) {}
  void map_pages(PhysicalPool& pool, std::span<const runtime::PageMapping> pages,
                 Access access) override {
    Backend::map_pages(pool, pages, access);  // the default, over map() below
  }
  void map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    if (maps++ == fail_at) throw std::runtime_error("map refused");
    ForwardingBackend::map(pool, chunk, addr, access);
  }
  void unmap(std::byte* addr, std::uint64_t bytes) override {
    ++unmaps;
    ForwardingBackend::unmap(addr, bytes);
  }
  int maps = 0, unmaps = 0, fail_at = -1;
};

TEST(BackendMapPages, DefaultUnmapsWhatItMappedWhenAMapFails) {
  FailingMapBackend b;
  const auto g = b.granularity();
  Reservation r = b.reserve(4 * g);
  auto pool = b.create_pool(4, g);
  const std::vector<runtime::PageMapping> batch = {
      {0, r.base() + 2 * g}, {1, r.base()}, {2, r.base() + 3 * g}, {3, r.base() + g}};
  b.fail_at = 2;
  EXPECT_THROW(b.map_pages(*pool, batch, Access::read), std::runtime_error);
  EXPECT_EQ(b.unmaps, 2);
  for (std::uint64_t off = 0; off < 4 * g; off += g)
    EXPECT_EQ(mapping_perms(r.base() + off), "---p");
  b.fail_at = -1;
  b.map_pages(*pool, batch, Access::read);
  for (std::uint64_t off = 0; off < 4 * g; off += g)
    EXPECT_EQ(mapping_perms(r.base() + off), "r--s");
  b.unmap(r.base(), 4 * g);
}

TYPED_TEST(BackendConformance, WindowAndModelAddressShareMemory) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(g);
  auto pool = b.create_pool(1, g);
  if (pool->window(0) == nullptr || !b.host_accessible()) GTEST_SKIP() << "no host window";
  b.map(*pool, 0, r.base(), Access::read);
  pool->window(0)[77] = std::byte{0x5a};
  EXPECT_EQ(r.base()[77], std::byte{0x5a});
  b.unmap(r.base(), g);
}

TYPED_TEST(BackendConformance, FencesComplete) {
  Backend& b = *this->backend;
  const Fence f = b.record_fence(Queue{});
  b.wait_fence(f);
  EXPECT_TRUE(b.fence_complete(f));
  EXPECT_TRUE(b.fence_complete(Fence{}));
  b.queue_wait(Queue{}, f);
}

TYPED_TEST(BackendConformance, StagingCopyLandsInChunk) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(g);
  auto pool = b.create_pool(2, g);
  auto staging = b.allocate_staging(4096);
  for (std::size_t i = 0; i < 4096; ++i) staging->bytes()[i] = std::byte(i * 13);
  b.wait_fence(
      b.copy_to_chunk(*pool, 1, 8192, std::span<const std::byte>(staging->bytes().data(), 4096)));
  if (!b.host_accessible()) GTEST_SKIP() << "mapped pages not visible to the CPU";
  b.map(*pool, 1, r.base(), Access::read);
  for (std::size_t i = 0; i < 4096; i += 511) EXPECT_EQ(r.base()[8192 + i], std::byte(i * 13));
  b.unmap(r.base(), g);
}

}  // namespace
}  // namespace lema::test
