// The host cache tier of a device pool: a page read from the files once is copied from host
// memory on every later fill, the bytes stay the file's, and a failed read is never kept.
#include <gtest/gtest.h>

#include <thread>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/errors.hpp"
#include "lema/runtime/pager.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PolicyKind;

std::uint64_t all_fill_bytes(const runtime::Layout& layout) {
  std::uint64_t sum = 0;
  for (runtime::PageId p = 0; p < layout.page_count(); ++p) sum += layout.page_fill_bytes(p);
  return sum;
}

void one_pass(Pager& pager, const OpenedModel& m, Order order, unsigned seed) {
  for (const auto* t : tensor_order(m.space.layout(), order, seed)) check_tensor(pager, m, *t, false);
}

TEST(HostCacheTier, ASecondPassReadsNothingFromTheFiles) {
  OpenedModel m(std::make_unique<StagedBackend>(kPage), small_model(), kPage, "host-cache");
  ASSERT_GE(m.pages(), 8u);
  PagerOptions opt;
  opt.budget_bytes = 2 * kPage;
  opt.host_cache_bytes = m.pages() * kPage;
  opt.prefetch = false;
  Pager pager(m.space, opt);
  one_pass(pager, m, Order::layer, 0);
  const auto first = pager.stats();
  EXPECT_EQ(first.bytes_read, all_fill_bytes(m.space.layout())) << "each page read once";
  EXPECT_EQ(first.host_cache_bytes, m.pages() * kPage);
  one_pass(pager, m, Order::reverse, 0);
  one_pass(pager, m, Order::random, 3);
  const auto later = pager.stats();
  EXPECT_EQ(later.bytes_read, first.bytes_read) << "later passes only copy from host memory";
  EXPECT_GT(later.faults, first.faults);
  EXPECT_EQ(later.host_cache_hits - first.host_cache_hits, later.faults - first.faults);
  EXPECT_LE(later.peak_resident_bytes, opt.budget_bytes);
}

TEST(HostCacheTier, ACacheSmallerThanTheModelKeepsTheBytesAndSavesReads) {
  OpenedModel m(std::make_unique<StagedBackend>(kPage), small_model(), kPage, "host-cache");
  auto run = [&](std::uint64_t cache_pages) {
    PagerOptions opt;
    opt.budget_bytes = 2 * kPage;
    opt.host_cache_bytes = cache_pages * kPage;
    opt.policy = PolicyKind::lru;
    Pager pager(m.space, opt);
    for (unsigned pass = 0; pass < 4; ++pass) one_pass(pager, m, Order::random, 11 + pass);
    return pager.stats();
  };
  const auto uncached = run(0);
  const auto cached = run(m.pages() / 2);
  EXPECT_EQ(uncached.host_cache_hits, 0u);
  EXPECT_GT(cached.host_cache_hits, 0u);
  EXPECT_LT(cached.bytes_read, uncached.bytes_read);
  EXPECT_EQ(cached.faults, uncached.faults) << "the tier changes where bytes come from only";
}

TEST(HostCacheTier, ConcurrentAcquirersAndThePrefetcherGetTheFilesBytes) {
  OpenedModel m(std::make_unique<StagedBackend>(kPage), small_model(), kPage, "host-cache");
  PagerOptions opt;
  opt.budget_bytes = 4 * kPage;
  opt.host_cache_bytes = 5 * kPage;
  opt.policy = PolicyKind::trace;
  Pager pager(m.space, opt);
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      for (unsigned pass = 0; pass < 6; ++pass)
        one_pass(pager, m, pass % 2 ? Order::random : Order::layer, 100 * i + pass);
    });
  for (auto& t : threads) t.join();
  pager.quiesce();
  const auto st = pager.stats();
  EXPECT_GT(st.host_cache_hits, 0u);
  EXPECT_LE(st.peak_resident_bytes, opt.budget_bytes);
}

TEST(HostCacheTier, AFailedReadIsNotKept) {
  OpenedModel m(std::make_unique<StagedBackend>(kPage), small_model(), kPage, "host-cache");
  const auto& t = *m.space.layout().find("model.layers.1.mlp.up_proj.weight");
  auto injector = std::make_shared<FailingRegion>();
  injector->file = t.file;
  injector->begin = t.file_offset;
  injector->end = t.file_offset + t.nbytes;
  PagerOptions opt;
  opt.budget_bytes = 3 * kPage;
  opt.host_cache_bytes = m.pages() * kPage;
  opt.reader.fault_injector = injector;
  opt.reader.direct = false;
  Pager pager(m.space, opt);
  const std::byte* addr = m.space.base() + t.offset;
  // Twice: a slot holding what a failed read left must not serve the second attempt.
  for (int attempt = 0; attempt < 2; ++attempt)
    EXPECT_THROW((void)pager.acquire(addr, 1), io::ReadError) << "attempt " << attempt;
  EXPECT_EQ(pager.stats().host_cache_hits, 0u);
  injector->on = false;
  check_tensor(pager, m, t, false);
}

TEST(HostCacheTier, IsRefusedForAHostPoolAndWhenSmallerThanAPage) {
  OpenedModel host(runtime::make_host_backend(kPage), small_model(), kPage, "host-cache");
  PagerOptions opt;
  opt.budget_bytes = 2 * kPage;
  opt.host_cache_bytes = 8 * kPage;
  try {
    Pager pager(host.space, opt);
    FAIL() << "a host cache over host memory";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("host cache"), std::string::npos) << e.what();
  }
  OpenedModel staged(std::make_unique<StagedBackend>(kPage), small_model(), kPage, "host-cache");
  opt.host_cache_bytes = kPage / 2;
  try {
    Pager pager(staged.space, opt);
    FAIL() << "a host cache smaller than a page";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("holds no page"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lema::test
