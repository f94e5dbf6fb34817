// The pager's page table keeps its invariants and names a broken one as an InternalError (a bug,
// never the caller's input); budget errors carry the numbers their message states.
#include "page_table.hpp"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lema/base/error.hpp"
#include "pager_fixture.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::PageId;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PageState;
using runtime::PageTable;

// An InternalError, not an InvalidArgument: callers that report bad input must not mistake it.
template <typename Fn>
void expect_internal_error(Fn fn, const std::string& words) {
  try {
    fn();
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    ADD_FAILURE() << "an InvalidArgument: " << e.what();
  } catch (const InternalError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(words), std::string::npos) << what;
    EXPECT_NE(what.find("page_table.cpp"), std::string::npos) << what;
  }
}

TEST(PageTable, ChunksGoFromFreeToClaimedToResidentAndBack) {
  PageTable t(8, 3);
  std::lock_guard lock(t.mutex());
  EXPECT_EQ(t.free_chunk_count(), 3u);
  EXPECT_EQ(t.take_free_chunk(), 0u) << "chunk 0 first";
  t.claim(5, 0, false);
  EXPECT_EQ(t.entry(5).state, PageState::filling);
  EXPECT_EQ(t.chunk_owners()[0], 5u);
  t.fill_succeeded(5, {});
  EXPECT_EQ(t.entry(5).state, PageState::resident);
  EXPECT_EQ(t.entry(5).fills_done, 1u);
  EXPECT_EQ(t.evicted(5), 0u);
  EXPECT_EQ(t.chunk_owners()[0], runtime::kNoPage);
  EXPECT_EQ(t.free_chunk_count(), 2u) << "an evicted page's chunk goes to the caller";
  t.free_chunk(0);
  EXPECT_EQ(t.free_chunk_count(), 3u);

  // A failed fill gives its chunk back and keeps the error for its waiters.
  const std::uint32_t c = t.take_free_chunk();
  t.claim(2, c, true);
  t.fill_failed(2, std::make_exception_ptr(std::runtime_error("EIO")));
  EXPECT_EQ(t.entry(2).state, PageState::absent);
  EXPECT_TRUE(t.entry(2).fill_failed);
  EXPECT_FALSE(t.entry(2).prefetched);
  EXPECT_EQ(t.free_chunk_count(), 3u);
  EXPECT_EQ(t.chunk_owners()[c], runtime::kNoPage);
}

TEST(PageTable, BrokenInvariantsAreInternalErrors) {
  PageTable t(4, 1);
  std::lock_guard lock(t.mutex());
  const std::uint32_t c = t.take_free_chunk();
  expect_internal_error([&] { (void)t.take_free_chunk(); }, "empty free list");
  t.claim(1, c, false);
  expect_internal_error([&] { t.claim(1, c, false); }, "page 1 claimed chunk 0");
  expect_internal_error([&] { t.claim(2, c, false); }, "page 2 claimed chunk 0");
  expect_internal_error([&] { t.free_chunk(c); }, "chunk 0 was freed while a page owns it");
  expect_internal_error([&] { (void)t.evicted(1); }, "page 1 was evicted");
  t.fill_succeeded(1, {});
  expect_internal_error([&] { t.fill_succeeded(1, {}); }, "not filling");
  t.pin(1, std::this_thread::get_id());
  expect_internal_error([&] { (void)t.evicted(1); }, "pinned");
}

TEST(PageTable, PinsAreCountedPerThread) {
  PageTable t(8, 4);
  std::lock_guard lock(t.mutex());
  const auto self = std::this_thread::get_id();
  const std::vector<PageId> held = {1, 2, 3};
  for (PageId p : held) t.pin(p, self);
  const std::vector<PageId> request = {3, 4};
  EXPECT_EQ(t.pins_outside(self, request), 2u);
  std::thread other([&] { EXPECT_EQ(t.pins_outside(std::this_thread::get_id(), request), 0u); });
  other.join();
  // A lost lease's pins stay on the pages but are no longer the thread's.
  t.forget_owner(held, self);
  EXPECT_EQ(t.pins_outside(self, request), 0u);
  EXPECT_EQ(t.entry(2).pins, 1u);
}

// ---- BudgetError's numbers ----

TEST(PagerBudgetError, ABudgetBelowOnePageCarriesItsNumbers) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model());
  PagerOptions opt;
  opt.budget_bytes = kPage - 1;
  try {
    Pager pager(m.space, opt);
    FAIL();
  } catch (const BudgetError& e) {
    EXPECT_EQ(e.numbers().budget_bytes, kPage - 1);
    EXPECT_EQ(e.numbers().needed_bytes, kPage);
    EXPECT_EQ(e.numbers().smallest_budget, kPage);
    EXPECT_EQ(e.numbers().pinned_bytes, 0u);
    EXPECT_EQ(e.numbers().page_size, kPage);
  }
}

TEST(PagerBudgetError, AnAcquireLargerThanThePoolCarriesItsNumbers) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model());
  PagerOptions opt;
  opt.budget_bytes = 4 * kPage + 100;  // holds four pages
  Pager pager(m.space, opt);
  try {
    (void)pager.acquire_pages({1, 6});
    FAIL();
  } catch (const BudgetError& e) {
    EXPECT_EQ(e.numbers().needed_bytes, 6 * kPage);
    EXPECT_EQ(e.numbers().budget_bytes, 4 * kPage);
    EXPECT_EQ(e.numbers().smallest_budget, 6 * kPage);
    EXPECT_EQ(e.numbers().pinned_bytes, 0u);
  }
}

TEST(PagerBudgetError, OwnLeasesInTheWayAreCounted) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model());
  PagerOptions opt;
  opt.budget_bytes = 3 * kPage;
  Pager pager(m.space, opt);
  Lease held = pager.acquire_pages({0, 2});
  try {
    (void)pager.acquire_pages({4, 2});
    FAIL();
  } catch (const BudgetError& e) {
    EXPECT_EQ(e.numbers().needed_bytes, 2 * kPage);
    EXPECT_EQ(e.numbers().pinned_bytes, 2 * kPage);
    EXPECT_EQ(e.numbers().budget_bytes, 3 * kPage);
    EXPECT_EQ(e.numbers().smallest_budget, 4 * kPage);
  }
  pager.release(std::move(held));
}

}  // namespace
}  // namespace lema::test
