// The Backend conformance suite: the same properties for every backend. New backends (the fake
// CUDA driver, real GPUs) add a factory to BackendTypes.
#include <gtest/gtest.h>

#include <cstring>
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
  EXPECT_EQ(mapping_perms(page1), "rw-s");
  b.unmap(r.base(), 4 * g);
  EXPECT_EQ(mapping_perms(page3), "---p");
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
