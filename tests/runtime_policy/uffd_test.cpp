// The userfaultfd region: every byte right from several threads, the budget never exceeded
// (own counter and mincore), eviction and refault, prefetch, clean shutdown.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "detail/uffd_region.hpp"
#include "lema/base/error.hpp"

namespace lema::runtime::detail {
namespace {

constexpr std::size_t kPageSize = 64 << 10;
constexpr std::size_t kPages = 64;
constexpr std::size_t kBudget = 4;

std::byte pattern(PageId page, std::size_t offset) {
  const std::uint64_t x = ((std::uint64_t{page} << 32) ^ offset) * 0x9E3779B97F4A7C15ull;
  return static_cast<std::byte>(x >> 56);
}

void fill_pattern(PageId page, std::byte* out) {
  for (std::size_t i = 0; i < kPageSize; ++i) out[i] = pattern(page, i);
}

UffdRegion::Options options(std::size_t budget = kBudget) {
  UffdRegion::Options o;
  o.page_count = kPages;
  o.page_size = kPageSize;
  o.budget_pages = budget;
  o.fill = fill_pattern;
  return o;
}

/// Region pages of which at least one system page is resident, according to the kernel.
std::size_t mincore_pages(const UffdRegion& region) {
  const auto sys = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in(region.page_count() * region.page_size() / sys);
  if (::mincore(region.data(), region.page_count() * region.page_size(), in.data()) != 0)
    return SIZE_MAX;
  std::size_t pages = 0;
  const std::size_t per_page = region.page_size() / sys;
  for (std::size_t p = 0; p < region.page_count(); ++p) {
    pages += std::any_of(in.begin() + p * per_page, in.begin() + (p + 1) * per_page,
                         [](unsigned char c) { return (c & 1) != 0; });
  }
  return pages;
}

/// Reads every byte of `page`; returns how many differ from the pattern.
std::size_t check_page(const UffdRegion& region, PageId page) {
  const std::byte* p = region.data() + std::size_t{page} * kPageSize;
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < kPageSize; ++i) wrong += p[i] != pattern(page, i);
  return wrong;
}

class UffdRegionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto why = UffdRegion::unavailable_reason()) GTEST_SKIP() << *why;
  }
};

TEST(UffdRegionOptions, RejectedBeforeAnythingIsCreated) {
  auto o = options();
  o.page_size = 5000;
  EXPECT_THROW(UffdRegion{o}, InvalidArgument);
  o = options(0);
  EXPECT_THROW(UffdRegion{o}, InvalidArgument);
  o = options();
  o.fill = nullptr;
  EXPECT_THROW(UffdRegion{o}, InvalidArgument);
}

TEST_F(UffdRegionTest, EveryByteRightFromSeveralThreadsUnderBudget) {
  // mincore is no snapshot (pages come and go while it walks the range), so the kernel's view is
  // checked where the region holds its lock: when it picks a victim (the budget is full) and
  // when it fills (the victim is gone, the new page not yet in).
  auto o = options();
  std::mutex mutex;
  std::size_t most_at_evict = 0, most_at_fill = 0;
  UffdRegion* self = nullptr;
  o.choose_victim = [&](std::span<const PageId> resident) {
    std::lock_guard lock(mutex);
    most_at_evict = std::max(most_at_evict, mincore_pages(*self));
    return resident.front();
  };
  o.fill = [&](PageId page, std::byte* out) {
    {
      std::lock_guard lock(mutex);
      most_at_fill = std::max(most_at_fill, mincore_pages(*self));
    }
    fill_pattern(page, out);
  };
  UffdRegion region(o);
  {
    std::lock_guard lock(mutex);
    self = &region;
  }
  std::atomic<bool> done{false};
  std::atomic<std::size_t> over_budget{0};
  std::thread watcher([&] {
    while (!done.load()) {
      if (region.stats().resident_pages > kBudget) ++over_budget;
      std::this_thread::yield();
    }
  });

  constexpr int kThreads = 4;
  std::vector<std::size_t> wrong(kThreads, 0);
  std::vector<std::thread> readers;
  for (int t = 0; t < kThreads; ++t) {
    readers.emplace_back([&, t] {
      std::vector<PageId> order(kPages);
      std::iota(order.begin(), order.end(), 0u);
      if (t == 1) std::reverse(order.begin(), order.end());
      if (t == 2) std::shuffle(order.begin(), order.end(), std::mt19937(42));
      if (t == 3)
        for (std::size_t i = 0; i < kPages; ++i) order[i] = static_cast<PageId>(i * 7 % kPages);
      for (int pass = 0; pass < 2; ++pass)
        for (PageId page : order) wrong[t] += check_page(region, page);
    });
  }
  for (auto& r : readers) r.join();
  done = true;
  watcher.join();

  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(wrong[t], 0u) << "reader " << t;
  EXPECT_EQ(over_budget.load(), 0u);
  {
    std::lock_guard lock(mutex);
    EXPECT_EQ(most_at_evict, kBudget);
    EXPECT_EQ(most_at_fill, kBudget - 1);
  }
  const UffdRegion::Stats s = region.stats();
  EXPECT_LE(s.peak_resident_pages, kBudget);
  EXPECT_GE(s.faults, kPages);  // every page was filled at least once
  EXPECT_EQ(s.evictions, s.faults - s.resident_pages);
  EXPECT_LE(mincore_pages(region), kBudget);
  EXPECT_EQ(region.first_error(), "");
}

TEST_F(UffdRegionTest, EvictionThenTouchRefaults) {
  UffdRegion region(options());
  EXPECT_EQ(check_page(region, 3), 0u);
  EXPECT_EQ(region.stats().faults, 1u);
  EXPECT_TRUE(region.is_resident(3));
  EXPECT_EQ(mincore_pages(region), 1u);

  region.evict(3);
  EXPECT_FALSE(region.is_resident(3));
  EXPECT_EQ(mincore_pages(region), 0u);
  region.evict(3);  // not resident: nothing to do
  EXPECT_EQ(region.stats().evictions, 1u);

  EXPECT_EQ(check_page(region, 3), 0u);
  EXPECT_EQ(region.stats().faults, 2u);
  EXPECT_EQ(mincore_pages(region), 1u);
}

TEST_F(UffdRegionTest, BudgetEvictsTheVictimTheOwnerChooses) {
  auto o = options();
  // The faulting thread is ordered after the callback by the kernel's wake, which TSan does not
  // see: share the callback's record through a mutex.
  std::mutex mutex;
  std::vector<PageId> offered;
  o.choose_victim = [&](std::span<const PageId> resident) {
    std::lock_guard lock(mutex);
    offered.assign(resident.begin(), resident.end());
    return *std::max_element(resident.begin(), resident.end());
  };
  UffdRegion region(o);
  for (PageId p : {5u, 1u, 9u, 2u, 7u}) EXPECT_EQ(check_page(region, p), 0u);
  {
    std::lock_guard lock(mutex);
    EXPECT_EQ(offered, (std::vector<PageId>{5, 1, 9, 2}));  // oldest fill first
  }
  for (PageId p : {5u, 1u, 2u, 7u}) EXPECT_TRUE(region.is_resident(p)) << p;
  EXPECT_FALSE(region.is_resident(9));
  EXPECT_EQ(region.stats().evictions, 1u);
}

TEST_F(UffdRegionTest, DefaultVictimIsTheOldestFill) {
  UffdRegion region(options(2));
  for (PageId p : {4u, 6u, 8u}) EXPECT_EQ(check_page(region, p), 0u);
  EXPECT_FALSE(region.is_resident(4));
  EXPECT_TRUE(region.is_resident(6));
  EXPECT_TRUE(region.is_resident(8));
}

TEST_F(UffdRegionTest, PrefetchAvoidsTheFault) {
  UffdRegion region(options());
  EXPECT_TRUE(region.prefetch(10));
  EXPECT_FALSE(region.prefetch(10));
  EXPECT_EQ(check_page(region, 10), 0u);
  const UffdRegion::Stats s = region.stats();
  EXPECT_EQ(s.faults, 0u);
  EXPECT_EQ(s.prefetches, 1u);
}

TEST_F(UffdRegionTest, PrefetchFillErrorIsThrownAndLeavesThePageAbsent) {
  auto o = options();
  o.fill = [](PageId page, std::byte* out) {
    if (page == 2) throw std::runtime_error("read of page 2 failed");
    fill_pattern(page, out);
  };
  UffdRegion region(o);
  EXPECT_THROW(region.prefetch(2), std::runtime_error);
  EXPECT_FALSE(region.is_resident(2));
  EXPECT_EQ(check_page(region, 3), 0u);
}

TEST_F(UffdRegionTest, SyscallsReadingTheRangeWaitForTheFill) {
  UffdRegion region(options());
  if (!region.handles_kernel_faults()) GTEST_SKIP() << "only user-mode faults are permitted here";
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const std::byte* page7 = region.data() + 7 * kPageSize;
  ASSERT_EQ(::write(fds[1], page7 + 100, 4096), 4096);
  std::vector<std::byte> got(4096);
  ASSERT_EQ(::read(fds[0], got.data(), got.size()), 4096);
  ::close(fds[0]);
  ::close(fds[1]);
  for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], pattern(7, 100 + i)) << i;
}

TEST_F(UffdRegionTest, DestructionWithTheHandlerRunningIsClean) {
  for (int round = 0; round < 20; ++round) {
    UffdRegion region(options());
    if (round % 2 == 0) {
      EXPECT_EQ(check_page(region, static_cast<PageId>(round)), 0u);
    }
    UffdRegion moved = std::move(region);  // the handler keeps serving the moved-to owner
    EXPECT_EQ(check_page(moved, 40), 0u);
  }
}

}  // namespace
}  // namespace lema::runtime::detail
