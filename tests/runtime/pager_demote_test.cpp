// Pager::demote: the hinted pages go first when room is needed, and stay resident otherwise.
#include <gtest/gtest.h>

#include "lema/base/error.hpp"
#include "lema/runtime/pager.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PolicyKind;

class PagerDemote : public ::testing::TestWithParam<PolicyKind> {};

// Four chunks hold pages 0..3, accessed in that order: page 0 is LRU's victim. Demoting page 3
// (the most recent) makes it the victim instead, and only when room is needed.
TEST_P(PagerDemote, DemotedPagesAreEvictedBeforeColderOnes) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  ASSERT_GE(m.pages(), 6u);
  PagerOptions opt;
  opt.budget_bytes = 4 * kPage;
  opt.prefetch = false;
  opt.policy = GetParam();
  Pager pager(m.space, opt);
  for (runtime::PageId p = 0; p < 4; ++p) pager.release(pager.acquire_pages({p, 1}));
  EXPECT_EQ(pager.demote({2, 2}), 2u);
  for (runtime::PageId p = 0; p < 4; ++p) EXPECT_TRUE(pager.is_resident(p)) << "not an eviction";
  EXPECT_EQ(pager.stats().evictions, 0u);
  pager.release(pager.acquire_pages({4, 1}));
  pager.release(pager.acquire_pages({5, 1}));
  EXPECT_FALSE(pager.is_resident(2));
  EXPECT_FALSE(pager.is_resident(3));
  EXPECT_TRUE(pager.is_resident(0)) << "colder by LRU, but not demoted";
  EXPECT_TRUE(pager.is_resident(1));
  // An access ends the hint: page 0 is LRU's victim again, not the re-read page 2.
  pager.release(pager.acquire_pages({2, 1}));
  EXPECT_FALSE(pager.is_resident(0));
  EXPECT_TRUE(pager.is_resident(2));
  check_tensor(pager, m, *tensor_order(m.space.layout(), Order::layer, 0).front(), false);
}

TEST_P(PagerDemote, PinnedAndAbsentPagesAreSkipped) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 2 * kPage;
  opt.prefetch = false;
  opt.policy = GetParam();
  Pager pager(m.space, opt);
  Lease pinned = pager.acquire_pages({0, 1});
  pager.release(pager.acquire_pages({1, 1}));
  EXPECT_EQ(pager.demote({0, 4}), 1u) << "page 0 is pinned, pages 2 and 3 are absent";
  EXPECT_TRUE(pager.is_resident(0));
  EXPECT_TRUE(pager.is_resident(1));
  EXPECT_FALSE(pager.is_resident(2));
  pager.release(pager.acquire_pages({2, 1}));  // evicts page 1, the only unpinned one
  EXPECT_TRUE(pager.is_resident(0));
  EXPECT_FALSE(pager.is_resident(1));
  EXPECT_THROW(pager.demote({static_cast<runtime::PageId>(m.pages()), 1}), Error);
  pager.release(std::move(pinned));
}

INSTANTIATE_TEST_SUITE_P(Policies, PagerDemote,
                         ::testing::Values(PolicyKind::lru, PolicyKind::trace),
                         [](const auto& info) {
                           return info.param == PolicyKind::lru ? "lru" : "trace";
                         });

}  // namespace
}  // namespace lema::test
