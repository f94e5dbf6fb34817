// The CUDA backends against the real driver (ctest label gpu): the conformance properties, read
// back from the device with cuMemcpyDtoH, and a Pager filling device pages with the file's bytes.
// Every test skips with the reason where no usable GPU and driver are present.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include <cstring>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/cuda_backend.hpp"
#include "lema/runtime/pager.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::Access;
using runtime::Backend;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::Queue;
using runtime::Reservation;

// Read back with the driver's cuMemcpyDtoH, from the library LEMA_CUDA_DRIVER names, if any
// (the fake driver rehearses this suite without a GPU).
std::vector<std::byte> read_device(const void* addr, std::size_t n) {
  const char* env = std::getenv("LEMA_CUDA_DRIVER");
  return test::read_device(env != nullptr && *env != '\0' ? env : "libcuda.so.1", addr, n);
}

#define SKIP_WITHOUT(reason_fn)                                 \
  do {                                                          \
    const std::string why = runtime::reason_fn();               \
    if (!why.empty()) GTEST_SKIP() << "no usable GPU: " << why; \
  } while (0)

TEST(CudaGpu, PoolStagingCopyMapAndReadBack) {
  SKIP_WITHOUT(cuda_backend_unavailable_reason);
  auto b = runtime::make_cuda_backend();
  const auto g = b->granularity();
  EXPECT_TRUE(is_power_of_two(g));
  EXPECT_FALSE(b->host_accessible());
  Reservation r = b->reserve(4 * g);
  auto pool = b->create_pool(3, g);
  EXPECT_EQ(pool->window(0), nullptr);
  auto staging = b->allocate_staging(g);
  for (std::size_t c = 0; c < 3; ++c) {
    std::memset(staging->bytes().data(), static_cast<int>(0x10 + c), g);
    b->wait_fence(b->copy_to_chunk(*pool, c, 0, {staging->bytes().data(), g}));
  }
  b->map(*pool, 2, r.base() + g, Access::read);
  b->map(*pool, 0, r.base() + 3 * g, Access::read);
  EXPECT_EQ(read_device(r.base() + g, g)[g - 1], std::byte{0x12});
  EXPECT_EQ(read_device(r.base() + 3 * g, 16)[0], std::byte{0x10});
  b->unmap(r.base() + g, g);
  std::memset(staging->bytes().data(), 0x7f, g);
  b->wait_fence(b->copy_to_chunk(*pool, 2, 0, {staging->bytes().data(), g}));
  b->map(*pool, 2, r.base(), Access::read);
  EXPECT_EQ(read_device(r.base() + 123, 1)[0], std::byte{0x7f});
  b->unmap(r.base(), 4 * g);
}

TEST(CudaGpu, FencesAndQueueWait) {
  SKIP_WITHOUT(cuda_backend_unavailable_reason);
  auto b = runtime::make_cuda_backend();
  const runtime::Fence f = b->record_fence(Queue{});
  b->queue_wait(Queue{}, f);
  b->wait_fence(f);
  EXPECT_TRUE(b->fence_complete(f));
}

TEST(CudaGpu, OutOfMemoryAtPoolCreationRollsBack) {
  SKIP_WITHOUT(cuda_backend_unavailable_reason);
  auto b = runtime::make_cuda_backend();
  const auto g = b->granularity();
  // More chunks than any current GPU holds; the error names the sizes and the free memory.
  const std::size_t chunks = static_cast<std::size_t>((std::uint64_t{1} << 40) / g);
  try {
    (void)b->create_pool(chunks, g);
    FAIL() << "a pool of " << chunks << " chunks was created";
  } catch (const OutOfMemory& e) {
    EXPECT_NE(std::string(e.what()).find("free of"), std::string::npos) << e.what();
  }
  auto pool = b->create_pool(4, g);  // everything was given back
  EXPECT_EQ(pool->chunk_count(), 4u);
}

TEST(CudaGpu, PagerFillsDevicePagesWithTheBytesOfTheFile) {
  SKIP_WITHOUT(cuda_backend_unavailable_reason);
  ModelShape shape;
  shape.layers = 4;
  shape.hidden = 700 * 1024 + 13;
  shape.embed = 3 * 1024 * 1024 + 7;
  OpenedModel m(runtime::make_cuda_backend(), shape, 0, "gpu-pager");
  PagerOptions opt;
  opt.budget_bytes = 3 * m.page_size();
  Pager pager(m.space, opt);
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& t : m.space.layout().tensors()) {
      if (t.nbytes == 0) continue;
      const std::byte* base = m.space.base() + t.offset;
      std::uint64_t done = 0;
      while (done < t.nbytes) {
        const std::uint64_t n =
            std::min(t.nbytes - done, m.page_size() - (t.offset + done) % m.page_size());
        runtime::Lease lease = pager.acquire(base + done, n);
        const auto got = read_device(base + done, n);
        ASSERT_EQ(std::memcmp(got.data(), m.expected.at(t.name).data() + done, n), 0) << t.name;
        pager.release(std::move(lease));
        done += n;
      }
    }
  }
  EXPECT_GT(pager.stats().evictions, 0u);
  EXPECT_LE(pager.stats().peak_resident_bytes, opt.budget_bytes);
}

TEST(ManagedGpu, PagerFillsManagedPagesWithTheBytesOfTheFile) {
  SKIP_WITHOUT(managed_backend_unavailable_reason);
  OpenedModel m(runtime::make_managed_backend(), ModelShape{}, 0, "gpu-managed");
  PagerOptions opt;
  opt.budget_bytes = 2 * m.page_size();
  Pager pager(m.space, opt);
  for (const auto* t : tensor_order(m.space.layout(), Order::layer, 1))
    check_tensor(pager, m, *t, false);
  EXPECT_LE(pager.stats().peak_resident_bytes, opt.budget_bytes);
}

}  // namespace
}  // namespace lema::test
