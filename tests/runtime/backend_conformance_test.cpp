// The Backend conformance suite: every backend, as it ships, holds to Note [Backend contract]
// (backend.hpp). Cases that need a capability are gated on the backend's BackendCapabilities,
// never on its name: permission strings from /proc/self/maps only where its pages are host
// pages, "unmap hides the bytes" only for Residency::mapped ("unmap keeps them" for unified),
// bytes read by the CPU where it can read them and back through the driver otherwise. A new
// backend adds a factory to BackendTypes. The fake-driver backends run on every build; the
// real-driver ones (label conformance, run by benchmarks/device/run.sh) skip where no GPU is.
#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::BackendCapabilities;
using Residency = BackendCapabilities::Residency;

// ---- the backends ----

// Backends whose mapped pages the CPU reads directly.
struct HostRead {
  static constexpr const char* kDriver = "";
};

struct HostBackendFactory : HostRead {
  static constexpr const char* kName = "host";
  static std::unique_ptr<Backend> make() { return runtime::make_host_backend(); }
};
/// The host backend over huge pages, or nullptr (the suite skips) where the system has too few
/// free for the suite's pools.
struct HugeHostBackendFactory : HostRead {
  static constexpr const char* kName = "host-huge";
  static std::unique_ptr<Backend> make() {
    const runtime::HugePagePool pool = runtime::huge_page_pool();
    if (pool.available < 4 || pool.page_bytes != (std::uint64_t{2} << 20)) return nullptr;
    return runtime::make_host_backend(pool.page_bytes, runtime::HostPages::huge);
  }
};
struct StagedBackendFactory : HostRead {
  static constexpr const char* kName = "staged";
  static std::unique_ptr<Backend> make() { return std::make_unique<StagedBackend>(); }
};
struct DelayedFenceBackendFactory : HostRead {
  static constexpr const char* kName = "delayed-fence";
  static std::unique_ptr<Backend> make() { return std::make_unique<DelayedFenceBackend>(); }
};

#ifdef LEMA_FAKE_CUDA_DRIVER
struct FakeCudaBackendFactory {
  static constexpr const char* kName = "fake-cuda";
  static inline const std::string kDriver = fake_cuda_driver_path();
  static std::unique_ptr<Backend> make() { return make_fake_cuda_backend(); }
};
struct FakeManagedBackendFactory {
  static constexpr const char* kName = "fake-managed";
  static inline const std::string kDriver = fake_cuda_driver_path();
  static std::unique_ptr<Backend> make() { return make_fake_managed_backend(); }
};
struct FakeUnifiedBackendFactory {
  static constexpr const char* kName = "fake-unified";
  static inline const std::string kDriver = fake_cuda_driver_path();
  static std::unique_ptr<Backend> make() { return make_fake_managed_backend(0, false); }
};
// The real driver, named explicitly (ctest points $LEMA_CUDA_DRIVER at the fake): these run on
// a GPU machine and skip elsewhere.
struct GpuCudaBackendFactory {
  static constexpr const char* kName = "gpu-cuda";
  static inline const std::string kDriver = "libcuda.so.1";
  static std::unique_ptr<Backend> make() {
    const runtime::CudaBackendOptions o{.driver_library = kDriver};
    if (!runtime::cuda_backend_unavailable_reason(o).empty()) return nullptr;
    return runtime::make_cuda_backend(o);
  }
};
struct GpuManagedBackendFactory {
  static constexpr const char* kName = "gpu-managed";
  static inline const std::string kDriver = "libcuda.so.1";
  static std::unique_ptr<Backend> make() {
    const runtime::CudaBackendOptions o{.driver_library = kDriver};
    if (!runtime::managed_backend_unavailable_reason(o).empty()) return nullptr;
    return runtime::make_managed_backend(o);
  }
};
#endif

template <typename Factory>
class BackendConformance : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend = Factory::make();
  BackendCapabilities caps;

  void SetUp() override {
    if (!backend) GTEST_SKIP() << Factory::kName << " is not available on this machine";
    caps = backend->capabilities();
  }
  bool host_pages() const { return caps.host_pages; }
  bool unified() const { return caps.residency == Residency::unified; }

  // The bytes at a mapped address: read by the CPU where it can, else through the driver.
  std::vector<std::byte> read(const std::byte* addr, std::size_t n) {
    if (caps.host_accessible) return {addr, addr + n};
    return read_device(Factory::kDriver, addr, n);
  }
  std::byte at(const std::byte* addr) { return read(addr, 1)[0]; }

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
                                      FakeCudaBackendFactory, FakeManagedBackendFactory,
                                      FakeUnifiedBackendFactory, GpuCudaBackendFactory,
                                      GpuManagedBackendFactory
#endif
                                      >;
TYPED_TEST_SUITE(BackendConformance, BackendTypes, FactoryNames);

TYPED_TEST(BackendConformance, GranularityIsAPowerOfTwo) {
  const auto g = this->backend->granularity();
  EXPECT_TRUE(is_power_of_two(g)) << g;
}

// The capabilities are consistent with each other and with the pool the backend creates.
TYPED_TEST(BackendConformance, CapabilitiesAgreeWithThePool) {
  const BackendCapabilities& c = this->caps;
  auto pool = this->backend->create_pool(2, this->backend->granularity());
  EXPECT_EQ(pool->window(0) != nullptr, c.host_window);
  EXPECT_EQ(pool->window(1) != nullptr, c.host_window);
  if (c.host_pages) {
    EXPECT_TRUE(c.host_accessible) << "host pages are readable by the CPU";
  }
  if (c.tracks_writes) {
    EXPECT_TRUE(c.host_pages) << "written pages are found in the page table";
  }
  EXPECT_EQ(c.residency == Residency::unified, c.unified_memory_device >= 0);
  if (c.residency == Residency::unified) {
    EXPECT_TRUE(c.host_accessible);
  }
  EXPECT_EQ(this->backend->host_accessible(), c.host_accessible);
  EXPECT_EQ(this->backend->unified_memory_device(), c.unified_memory_device);
  EXPECT_EQ(this->backend->tracks_writes(), c.tracks_writes);
}

TYPED_TEST(BackendConformance, ReservationIsAlignedAndReleased) {
  const auto g = this->backend->granularity();
  std::byte* base = nullptr;
  {  // the reservation is released at the end of the scope (checked by ASan/valgrind runs)
    Reservation r = this->backend->reserve(4 * g);
    ASSERT_TRUE(r);
    base = r.base();
    EXPECT_EQ(r.bytes(), 4 * g);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(base) % g, 0u) << "aligned to the granularity";
    if (this->host_pages() && !this->unified()) {
      EXPECT_EQ(mapping_perms(base), "---p");
      EXPECT_EQ(mapping_perms(base + 4 * g - 1), "---p");
    }
    Reservation moved = std::move(r);
    EXPECT_FALSE(r);  // NOLINT(bugprone-use-after-move): the moved-from state is specified
    EXPECT_EQ(moved.base(), base);
  }
}

TYPED_TEST(BackendConformance, MapShowsChunkBytesAndUnmapHidesThem) {
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
  EXPECT_EQ(this->at(page1), std::byte(0x12));
  EXPECT_EQ(this->at(page1 + g - 1), std::byte(0x12));
  EXPECT_EQ(this->at(page3 + g / 2), std::byte(0x10));
  if (this->host_pages()) {
    EXPECT_EQ(mapping_perms(page1), "r--s");
    EXPECT_EQ(mapping_perms(r.base()), "---p");  // neighbours untouched
  }

  // A chunk refilled after unmap and mapped elsewhere shows its new bytes there.
  b.unmap(page1, g);
  if (this->host_pages()) {
    EXPECT_EQ(mapping_perms(page1), "---p");  // still reserved, unreadable
  }
  if (this->unified()) {
    EXPECT_EQ(this->at(page1 + 7), std::byte(0x12)) << "unified: bytes stay";
  }
  this->fill_chunk(*pool, 2, std::byte(0x7f));
  b.map(*pool, 2, r.base(), Access::read);
  EXPECT_EQ(this->at(r.base() + 123), std::byte(0x7f));
  EXPECT_EQ(this->at(page3), std::byte(0x10));

  if (!this->caps.tracks_writes) {  // device pages are mapped read-only (Note [Dirty pages])
    b.unmap(r.base(), g);
    b.unmap(page3, g);
    return;
  }
  b.map(*pool, 1, page1, Access::read_write);
  EXPECT_EQ(this->at(page1 + 5), std::byte(0x11));
  if (this->host_pages()) {
    EXPECT_EQ(mapping_perms(page1).substr(0, 3), "rw-");  // private copy-on-write
  }
  b.unmap(r.base(), 4 * g);
  if (this->host_pages()) {
    EXPECT_EQ(mapping_perms(page3), "---p");
  }
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
  for (const auto& p : batch) {
    if (this->host_pages()) {
      EXPECT_EQ(mapping_perms(p.addr), "r--s") << "chunk " << p.chunk;
    }
    EXPECT_EQ(this->at(p.addr), std::byte(0x20 + p.chunk));
    EXPECT_EQ(this->at(p.addr + g - 1), std::byte(0x20 + p.chunk));
  }
  if (this->host_pages()) {
    for (std::size_t page : {3, 4, 6, 7}) {
      EXPECT_EQ(mapping_perms(at(page)), "---p") << page;
    }
  }

  b.unmap(at(1), g);
  if (this->host_pages()) {
    EXPECT_EQ(mapping_perms(at(1)), "---p");
  }
  EXPECT_EQ(this->at(at(0) + g / 2), std::byte(0x20));
  EXPECT_EQ(this->at(at(2) + g / 2), std::byte(0x22));
  for (std::size_t page : {0, 2, 5}) {
    b.unmap(at(page), g);
    if (this->host_pages()) {
      EXPECT_EQ(mapping_perms(at(page)), "---p") << page;
    }
  }
  // The chunks map again, one by one.
  b.map(*pool, 3, at(7), Access::read);
  EXPECT_EQ(this->at(at(7) + 1), std::byte(0x23));
  b.unmap(at(7), g);
}

// The default map_pages (one map() per page) is all or nothing too: when a map fails, the pages
// the call mapped before it are unmapped again.
class FailingMapBackend final : public ForwardingBackend {
 public:
  FailingMapBackend() : ForwardingBackend(runtime::make_host_backend()) {}
  int maps = 0, unmaps = 0, fail_at = -1;

 private:
  void do_map_pages(PhysicalPool& pool, std::span<const runtime::PageMapping> pages,
                    Access access) override {
    Backend::do_map_pages(pool, pages, access);  // the default, over do_map() below
  }
  void do_map(PhysicalPool& pool, std::size_t chunk, std::byte* addr, Access access) override {
    if (maps++ == fail_at) throw std::runtime_error("map refused");
    ForwardingBackend::do_map(pool, chunk, addr, access);
  }
  void do_unmap(std::byte* addr, std::uint64_t bytes) override {
    ++unmaps;
    ForwardingBackend::do_unmap(addr, bytes);
  }
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

// A host window of a mapped backend is the chunk's memory itself: a write through it shows at
// the model address. (A unified backend's window is staging that map copies from.)
TYPED_TEST(BackendConformance, WindowAndModelAddressShareMemory) {
  Backend& b = *this->backend;
  if (!this->caps.host_window || this->unified() || !this->caps.host_accessible)
    GTEST_SKIP() << "no host window shared with the mapped pages";
  const auto g = b.granularity();
  Reservation r = b.reserve(g);
  auto pool = b.create_pool(1, g);
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
  ASSERT_GE(staging->bytes().size(), 4096u);
  for (std::size_t i = 0; i < 4096; ++i) staging->bytes()[i] = std::byte(i * 13);
  b.wait_fence(
      b.copy_to_chunk(*pool, 1, 8192, std::span<const std::byte>(staging->bytes().data(), 4096)));
  b.map(*pool, 1, r.base(), Access::read);
  const std::vector<std::byte> got = this->read(r.base() + 8192, 4096);
  for (std::size_t i = 0; i < 4096; i += 511) {
    EXPECT_EQ(got[i], std::byte(i * 13)) << i;
  }
  b.unmap(r.base(), g);
}

// Pages larger than the granularity lie at base + k × page in a reservation aligned to the
// granularity only: a chunk maps at any granularity-aligned address.
TYPED_TEST(BackendConformance, ChunksLargerThanTheGranularityMapAtGranularityAlignedAddresses) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(4 * g);
  auto pool = b.create_pool(1, 2 * g);
  this->fill_chunk(*pool, 0, std::byte{0x44});
  // An address that is not aligned to the chunk's size.
  std::byte* page = r.base() + g;
  if (reinterpret_cast<std::uintptr_t>(page) % (2 * g) == 0) page += g;
  b.map(*pool, 0, page, Access::read);
  EXPECT_EQ(this->at(page), std::byte{0x44});
  EXPECT_EQ(this->at(page + 2 * g - 1), std::byte{0x44});
  b.unmap(page, 2 * g);
}

// Note [Backend contract]: a caller's mistake is refused by the public entry, with the same
// InvalidArgument from every backend, before the backend (or its driver) sees it.
TYPED_TEST(BackendConformance, PreconditionsAreCheckedBeforeTheBackend) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  EXPECT_THROW((void)b.reserve(g + 1), InvalidArgument);
  EXPECT_THROW((void)b.reserve(0), InvalidArgument);
  EXPECT_THROW((void)b.create_pool(0, g), InvalidArgument);
  EXPECT_THROW((void)b.create_pool(1, g / 2), InvalidArgument);
  Reservation r = b.reserve(2 * g);
  auto pool = b.create_pool(1, g);
  EXPECT_THROW(b.map(*pool, 1, r.base(), Access::read), InvalidArgument);  // no chunk 1
  EXPECT_THROW(b.map(*pool, 0, r.base() + g / 2, Access::read), InvalidArgument);  // misaligned
  const std::vector<runtime::PageMapping> batch = {{0, r.base()}, {3, r.base() + g}};
  EXPECT_THROW(b.map_pages(*pool, batch, Access::read), InvalidArgument);
  EXPECT_THROW(b.unmap(r.base() + g / 2, g), InvalidArgument);
  EXPECT_THROW(b.unmap(r.base(), g / 2), InvalidArgument);
  auto staging = b.allocate_staging(4096);
  EXPECT_THROW((void)b.copy_to_chunk(*pool, 0, g - 100,
                                     std::span<const std::byte>(staging->bytes().data(), 4096)),
               InvalidArgument);
  EXPECT_THROW((void)b.copy_to_chunk(*pool, 1, 0,
                                     std::span<const std::byte>(staging->bytes().data(), 4096)),
               InvalidArgument);
  EXPECT_THROW((void)b.allocate_staging(0), InvalidArgument);
  if (!this->caps.tracks_writes) {
    EXPECT_THROW((void)b.written_bytes(r.base(), g), InvalidArgument);
  }
  if (!this->caps.host_pages) {
    EXPECT_FALSE(b.set_unmapped_pages(nullptr)) << "only host pages take a placeholder source";
  }
  // Nothing was mapped by the refused calls: the page maps now.
  this->fill_chunk(*pool, 0, std::byte{0x31});
  b.map(*pool, 0, r.base() + g, Access::read);
  EXPECT_EQ(this->at(r.base() + g + 9), std::byte{0x31});
  b.unmap(r.base() + g, g);
}

// Note [Released pool memory]: a released pool gives its memory back and keeps its chunks'
// count; after a restore its chunks fill and map as before. Backends whose memory is not in a
// pool (unified) refuse with one line naming themselves.
TYPED_TEST(BackendConformance, PoolMemoryIsReleasedAndRestored) {
  Backend& b = *this->backend;
  const auto g = b.granularity();
  Reservation r = b.reserve(2 * g);
  auto pool = b.create_pool(2, g);
  if (this->unified()) {
    try {
      b.release_pool_memory(*pool);
      FAIL() << "unified memory released its pool";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("cannot release"), std::string::npos) << e.what();
    }
    return;
  }
  this->fill_chunk(*pool, 1, std::byte(0x21));
  b.map(*pool, 1, r.base(), Access::read);
  EXPECT_EQ(this->at(r.base() + 9), std::byte(0x21));
  b.unmap(r.base(), g);
#ifdef LEMA_FAKE_CUDA_DRIVER
  const bool fake_cuda = std::string_view(TypeParam::kName) == "fake-cuda";
  const std::uint64_t handles_before = fake_cuda ? fake().live_handles() : 0;
#endif
  b.release_pool_memory(*pool);
  EXPECT_TRUE(pool->memory_released());
  EXPECT_EQ(pool->chunk_count(), 2u);
#ifdef LEMA_FAKE_CUDA_DRIVER
  if (fake_cuda) {
    // Each chunk is an allocation and its mapping in the pool window.
    EXPECT_EQ(fake().live_handles(), handles_before - 4) << "chunks released";
  }
#endif
  EXPECT_THROW(b.map(*pool, 0, r.base(), Access::read), InvalidArgument);
  EXPECT_THROW(b.release_pool_memory(*pool), InvalidArgument);

  b.restore_pool_memory(*pool);
  EXPECT_FALSE(pool->memory_released());
  EXPECT_THROW(b.restore_pool_memory(*pool), InvalidArgument);
#ifdef LEMA_FAKE_CUDA_DRIVER
  if (fake_cuda) {
    EXPECT_EQ(fake().live_handles(), handles_before) << "chunks made again";
  }
#endif
  this->fill_chunk(*pool, 0, std::byte(0x33));
  this->fill_chunk(*pool, 1, std::byte(0x44));
  b.map(*pool, 0, r.base(), Access::read);
  b.map(*pool, 1, r.base() + g, Access::read);
  EXPECT_EQ(this->at(r.base() + 1), std::byte(0x33));
  EXPECT_EQ(this->at(r.base() + g + g - 1), std::byte(0x44));
  b.unmap(r.base(), 2 * g);
}

}  // namespace
}  // namespace lema::test
