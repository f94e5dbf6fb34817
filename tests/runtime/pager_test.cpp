#include "lema/runtime/pager.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <cerrno>
#include <thread>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/errors.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PolicyKind;

struct HostSmallPages {
  static constexpr const char* kName = "host";
  static std::unique_ptr<runtime::Backend> make() { return runtime::make_host_backend(kPage); }
};
struct StagedSmallPages {
  static constexpr const char* kName = "staged";
  static std::unique_ptr<runtime::Backend> make() { return std::make_unique<StagedBackend>(kPage); }
};

template <typename Factory>
class PagerConformance : public ::testing::Test {};

struct Names {
  template <typename T>
  static std::string GetName(int) {
    return T::kName;
  }
};
using PagerBackends = ::testing::Types<HostSmallPages, StagedSmallPages>;
TYPED_TEST_SUITE(PagerConformance, PagerBackends, Names);

// Every tensor's bytes through the address space equal the file, for budgets from one page to
// the whole model, in several orders, with both policies; resident bytes never exceed the
// budget.
TYPED_TEST(PagerConformance, BytesEqualTheFileUnderEveryBudget) {
  auto backend = TypeParam::make();
  const std::uint64_t page = backend->granularity();
  OpenedModel m(std::move(backend), small_model(/*shards=*/2), page);
  ASSERT_GE(m.pages(), 8u);
  for (std::size_t budget_pages : {std::size_t{1}, std::size_t{2}, m.pages() / 2, m.pages()}) {
    for (PolicyKind policy : {PolicyKind::lru, PolicyKind::trace}) {
      for (Order order : {Order::layer, Order::reverse, Order::random}) {
        SCOPED_TRACE("budget " + std::to_string(budget_pages) + " pages, policy " +
                     std::to_string(static_cast<int>(policy)) + ", order " +
                     std::to_string(static_cast<int>(order)));
        PagerOptions opt;
        opt.budget_bytes = budget_pages * m.page_size() + 123;  // not a multiple: rounds down
        opt.policy = policy;
        Pager pager(m.space, opt);
        for (int pass = 0; pass < 2; ++pass) {
          for (const auto* t : tensor_order(m.space.layout(), order, 42 + pass)) {
            const bool whole =
                align_up(t->offset % m.page_size() + t->nbytes, m.page_size()) / m.page_size() <=
                budget_pages;
            check_tensor(pager, m, *t, whole && pass == 1);
          }
        }
        const auto st = pager.stats();
        EXPECT_LE(st.peak_resident_bytes, opt.budget_bytes);
        EXPECT_LE(st.peak_resident_bytes, budget_pages * m.page_size());
        EXPECT_GT(st.faults, 0u);
        EXPECT_EQ(st.page_size, m.page_size());
        EXPECT_EQ(st.budget_bytes, opt.budget_bytes);
        EXPECT_FALSE(st.io_path.empty());
        EXPECT_LE(st.bytes_read, (st.faults + st.prefetches_issued) * m.page_size());
      }
    }
  }
}

TEST(Pager, DefaultPageSizeIsTwoMiB) {
  ModelShape shape = small_model(/*shards=*/2);
  shape.hidden = 300 * 1024 + 1;
  OpenedModel m(runtime::make_host_backend(), shape);
  EXPECT_EQ(m.page_size(), 2_MiB);
  PagerOptions opt;
  opt.budget_bytes = 4_MiB;
  Pager pager(m.space, opt);
  for (const auto* t : tensor_order(m.space.layout(), Order::layer, 0))
    check_tensor(pager, m, *t, true);
  EXPECT_LE(pager.stats().peak_resident_bytes, 4_MiB);
}

// The pool from the kernel's huge pages: the same bytes, the same budget. Runs where the system
// has free huge pages (.ci/run reserves some).
TEST(Pager, HugePagePoolGivesTheSameBytes) {
  constexpr std::size_t kBudgetPages = 3;
  if (runtime::huge_page_pool().available < kBudgetPages)
    GTEST_SKIP() << "fewer than " << kBudgetPages << " free huge pages (vm.nr_hugepages)";
  ModelShape shape = small_model(/*shards=*/2);
  shape.hidden = 300 * 1024 + 1;
  OpenedModel m(runtime::make_host_backend(2_MiB, runtime::HostPages::huge), shape);
  ASSERT_GT(m.pages(), 2 * kBudgetPages);
  for (PolicyKind policy : {PolicyKind::lru, PolicyKind::trace}) {
    PagerOptions opt;
    opt.budget_bytes = kBudgetPages * m.page_size();
    opt.policy = policy;
    Pager pager(m.space, opt);
    for (int pass = 0; pass < 2; ++pass)
      for (const auto* t : tensor_order(m.space.layout(), Order::random, 7 + pass))
        check_tensor(pager, m, *t, false);
    EXPECT_LE(pager.stats().peak_resident_bytes, opt.budget_bytes);
    EXPECT_GT(pager.stats().evictions, 0u);
  }
}

TEST(Pager, HugePagePoolLargerThanTheSystemHasNamesTheNumbersAndTheSetting) {
  const runtime::HugePagePool pool = runtime::huge_page_pool();
  if (pool.page_bytes == 0) {
    EXPECT_THROW(runtime::make_host_backend(2_MiB, runtime::HostPages::huge), InvalidArgument);
    return;
  }
  auto backend = runtime::make_host_backend(pool.page_bytes, runtime::HostPages::huge);
  // Far more than are free, so that pages other tests give back meanwhile cannot make it fit.
  const std::size_t chunks = pool.available + 65536;
  try {
    backend->create_pool(chunks, pool.page_bytes);
    FAIL() << "a pool of " << chunks << " huge pages was created with " << pool.available
           << " free";
  } catch (const OutOfMemory& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("needs " + std::to_string(chunks) + " huge pages"), std::string::npos)
        << what;
    EXPECT_NE(what.find("nr_hugepages"), std::string::npos) << what;
  }
  EXPECT_THROW(runtime::make_host_backend(pool.page_bytes / 2, runtime::HostPages::huge),
               InvalidArgument)
      << "a page smaller than the huge page";
}

TEST(Pager, UnmappedPagesAreNotReadable) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 2 * kPage;
  Pager pager(m.space, opt);
  EXPECT_EQ(mapping_perms(m.space.page_address(0)), "---p");
  {
    Lease a = pager.acquire_pages({0, 2});
    EXPECT_EQ(mapping_perms(m.space.page_address(0)), "r--s");
    EXPECT_TRUE(pager.is_resident(1));
  }
  Lease b = pager.acquire_pages({3, 2});  // evicts both
  EXPECT_FALSE(pager.is_resident(0));
  EXPECT_EQ(mapping_perms(m.space.page_address(0)), "---p");
  EXPECT_EQ(mapping_perms(m.space.page_address(4)), "r--s");
  EXPECT_EQ(pager.stats().evictions, 2u);
}

TEST(Pager, EvictFreesUnpinnedPagesAndSkipsPinnedOnes) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 4 * kPage;
  opt.prefetch = false;
  Pager pager(m.space, opt);
  pager.release(pager.acquire_pages({0, 2}));
  Lease pinned = pager.acquire_pages({2, 1});
  EXPECT_EQ(pager.evict({0, 3}), 2u) << "pages 0 and 1; page 2 is pinned";
  EXPECT_FALSE(pager.is_resident(0));
  EXPECT_TRUE(pager.is_resident(2));
  EXPECT_EQ(mapping_perms(m.space.page_address(0)), "---p");
  EXPECT_EQ(pager.stats().resident_bytes, kPage);
  EXPECT_EQ(pager.evict({5, 1}), 0u) << "absent pages are skipped";
  // The freed chunks serve new pages without evicting anything else.
  pager.release(pager.acquire_pages({4, 3}));
  EXPECT_TRUE(pager.is_resident(2));
  EXPECT_EQ(pager.stats().evictions, 2u);
  pager.release(std::move(pinned));
  check_tensor(pager, m, *tensor_order(m.space.layout(), Order::layer, 0).front(), false);
}

TEST(Pager, BudgetSmallerThanAPageIsRefusedWithBothNumbers) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = kPage - 1;
  try {
    Pager pager(m.space, opt);
    FAIL();
  } catch (const BudgetError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(std::to_string(kPage - 1)), std::string::npos) << what;
    EXPECT_NE(what.find("64 KiB"), std::string::npos) << what;
    // A C++ caller is told the option field; the page is the backend's smallest, so a smaller
    // page size is no way out.
    EXPECT_NE(what.find("the smallest budget that works is 64 KiB (65536 bytes): raise the "
                        "budget (budget_bytes) to at least that"),
              std::string::npos)
        << what;
    EXPECT_EQ(what.find("page size"), std::string::npos) << what;
  }
}

TEST(Pager, AcquireLargerThanTheBudgetIsRefusedBeforeAnyChange) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 4 * kPage;
  Pager pager(m.space, opt);
  Lease keep = pager.acquire_pages({0, 1});
  try {
    (void)pager.acquire_pages({1, 6});
    FAIL();
  } catch (const BudgetError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("acquire needs 6 pages of 64 KiB (384 KiB) but the budget holds 4 pages "
                        "(256 KiB); the smallest budget that works is 384 KiB (393216 bytes)"),
              std::string::npos)
        << what;
  }
  const auto st = pager.stats();
  EXPECT_EQ(st.faults, 1u);
  EXPECT_EQ(st.resident_bytes, kPage);
  EXPECT_FALSE(pager.is_resident(1));
}

// Two pages' worth of bytes that start mid-page span three pages: the error counts those, gives
// the budget that holds them, names the settings as the opener's caller writes them, and offers
// a smaller page size only down to the backend's granularity.
TEST(Pager, BudgetErrorCountsThePagesAnUnalignedRangeSpans) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2), 2 * kPage);
  ASSERT_GE(m.pages(), 4u);
  PagerOptions opt;
  opt.budget_bytes = 2 * m.page_size();
  opt.setting_names = {.budget = "--budget", .page_size = "--page-size"};
  Pager pager(m.space, opt);
  try {
    (void)pager.acquire(m.space.base() + m.page_size() / 2, 2 * m.page_size());
    FAIL();
  } catch (const BudgetError& e) {
    EXPECT_STREQ(e.what(),
                 "acquire needs 3 pages of 128 KiB (384 KiB) but the budget holds 2 pages "
                 "(256 KiB); the smallest budget that works is 384 KiB (393216 bytes): raise the "
                 "budget (--budget) to at least that, or lower the page size (--page-size; its "
                 "minimum is 64 KiB)");
  }
  EXPECT_EQ(pager.budget_shortfall(3).substr(0, 43), "3 pages of 128 KiB (384 KiB) but the budget");
  // At the granularity already, no smaller page size is offered.
  OpenedModel fine(runtime::make_host_backend(kPage), small_model(/*shards=*/2), kPage);
  opt.budget_bytes = 2 * kPage;
  Pager at_minimum(fine.space, opt);
  try {
    (void)at_minimum.acquire(fine.space.base() + kPage / 2, 2 * kPage);
    FAIL();
  } catch (const BudgetError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("acquire needs 3 pages of 64 KiB (192 KiB)"), std::string::npos) << what;
    EXPECT_NE(what.find("192 KiB (196608 bytes)"), std::string::npos) << what;
    EXPECT_EQ(what.find("--page-size"), std::string::npos) << what;
  }
}

TEST(Pager, OwnLeasesMakingAnAcquireImpossibleAreAnErrorNotADeadlock) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 3 * kPage;
  Pager pager(m.space, opt);
  Lease held = pager.acquire_pages({0, 2});
  EXPECT_THROW((void)pager.acquire_pages({4, 2}), BudgetError);
  // Overlapping the held pages is fine: only distinct pages count.
  Lease more = pager.acquire_pages({1, 2});
  EXPECT_EQ(more.pages().size(), 2u);
  pager.release(std::move(held));
  Lease now = pager.acquire_pages({4, 1});
  EXPECT_TRUE(pager.is_resident(4));
}

TEST(Pager, WaitsForLeasesOfOtherThreads) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 2 * kPage;
  Pager pager(m.space, opt);
  Lease held = pager.acquire_pages({0, 2});
  std::atomic<bool> done{false};
  std::thread t([&] {
    Lease l = pager.acquire_pages({5, 1});
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(done.load());  // every chunk is pinned: it must wait, not evict a pinned page
  EXPECT_TRUE(pager.is_resident(0));
  EXPECT_TRUE(pager.is_resident(1));
  pager.release(std::move(held));
  t.join();
  EXPECT_TRUE(done.load());
}

TEST(Pager, ReadErrorFailsTheAcquireLeavesThePageUnmappedAndALaterAcquireRetries) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  const auto& t = *m.space.layout().find("model.layers.1.mlp.up_proj.weight");
  auto injector = std::make_shared<FailingRegion>();
  injector->file = t.file;
  injector->begin = t.file_offset;
  injector->end = t.file_offset + t.nbytes;
  PagerOptions opt;
  opt.budget_bytes = 3 * kPage;
  opt.reader.fault_injector = injector;
  opt.reader.direct = false;
  Pager pager(m.space, opt);
  const std::byte* addr = m.space.base() + t.offset;
  const auto page = m.space.page_of(addr);
  try {
    (void)pager.acquire(addr, 1);
    FAIL() << "no error";
  } catch (const io::ReadError& e) {
    EXPECT_EQ(std::filesystem::path(e.file()), m.space.layout().files()[t.file]) << e.what();
    EXPECT_GE(e.offset() + e.length(), t.file_offset);
    EXPECT_LT(e.offset(), t.file_offset + t.nbytes);
  }
  EXPECT_FALSE(pager.is_resident(page));
  EXPECT_EQ(mapping_perms(m.space.page_address(page)), "---p");
  EXPECT_EQ(pager.stats().resident_bytes, 0u);
  // The chunk went back: the whole budget is still usable.
  { Lease l = pager.acquire_pages({0, 3}); }
  injector->on = false;
  check_tensor(pager, m, t, false);
}

TEST(Pager, ConcurrentAcquirersOfAMissingPageFillItOnce) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  for (int round = 0; round < 8; ++round) {
    PagerOptions opt;
    opt.budget_bytes = 4 * kPage;
    Pager pager(m.space, opt);
    std::barrier start(4);
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i) {
      threads.emplace_back([&] {
        start.arrive_and_wait();
        Lease l = pager.acquire_pages({2, 2});
        EXPECT_EQ(std::memcmp(m.space.page_address(2), m.space.page_address(2), 1), 0);
      });
    }
    for (auto& t : threads) t.join();
    const auto st = pager.stats();
    EXPECT_EQ(st.faults, 2u);
    EXPECT_EQ(st.hits, 6u);
    EXPECT_EQ(st.bytes_read,
              m.space.layout().page_fill_bytes(2) + m.space.layout().page_fill_bytes(3));
  }
}

TEST(Pager, ChunkIsNotReusedBeforeTheLastUseFenceCompleted) {
  ModelShape shape = small_model(/*shards=*/2);
  auto delayed = std::make_unique<DelayedFenceBackend>();
  DelayedFenceBackend* fences = delayed.get();
  OpenedModel m(std::move(delayed), shape, 2_MiB);
  PagerOptions opt;
  opt.budget_bytes = 2_MiB;
  Pager pager(m.space, opt);
  Lease first = pager.acquire_pages({0, 1});
  const runtime::Fence last_use = fences->record_fence_for(
      {m.space.page_address(0)}, std::numeric_limits<std::uint64_t>::max());
  pager.release(std::move(first), last_use);

  std::atomic<bool> done{false};
  std::thread t([&] {
    Lease second = pager.acquire_pages({1, 1});
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(done.load());
  EXPECT_TRUE(pager.is_resident(0));  // still mapped: its last use may still be running
  DelayedFenceBackend::signal(last_use);
  t.join();
  EXPECT_TRUE(pager.is_resident(1));
  EXPECT_FALSE(pager.is_resident(0));
  EXPECT_EQ(fences->violations.load(), 0u);
}

TEST(Pager, DelayedFencesUnderConcurrencyNeverLetAChunkBeReusedEarly) {
  auto delayed = std::make_unique<DelayedFenceBackend>();
  DelayedFenceBackend* fences = delayed.get();
  OpenedModel m(std::move(delayed), small_model(/*shards=*/2), 2_MiB);
  PagerOptions opt;
  opt.budget_bytes = 3 * 2_MiB;
  Pager pager(m.space, opt);
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] {
      std::mt19937 rng(100 + i);
      for (int k = 0; k < 60; ++k) {
        const auto page = static_cast<runtime::PageId>(rng() % m.pages());
        Lease l = pager.acquire_pages({page, 1});
        const auto f = fences->record_fence_for({m.space.page_address(page)}, (rng() % 200) * 1000);
        pager.release(std::move(l), f);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(fences->violations.load(), 0u);
  EXPECT_LE(pager.stats().peak_resident_bytes, opt.budget_bytes);
}

TEST(Pager, EvictHookSeesEveryEvictionAndFaultInDoesNotPin) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = 2 * kPage;
  Pager pager(m.space, opt);
  std::vector<runtime::PageId> evicted;
  pager.set_evict_hook([&](runtime::PageId p) { evicted.push_back(p); });
  pager.fault_in(0);
  pager.fault_in(1);
  pager.fault_in(2);  // no pins held: evicts one of the others
  EXPECT_TRUE(pager.is_resident(2));
  ASSERT_EQ(evicted.size(), 1u);
  EXPECT_EQ(evicted[0], 0u);  // lru
  EXPECT_EQ(pager.stats().evictions, 1u);
}

TEST(Pager, EventsRecordFaultsHitsAndEvictions) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  PagerOptions opt;
  opt.budget_bytes = kPage;
  Pager pager(m.space, opt);
  { Lease l = pager.acquire_pages({0, 1}); }
  { Lease l = pager.acquire_pages({0, 1}); }
  { Lease l = pager.acquire_pages({1, 1}); }
  std::map<runtime::EventKind, int> kinds;
  for (const auto& e : pager.events().snapshot()) ++kinds[e.kind];
  EXPECT_EQ(kinds[runtime::EventKind::fault], 2);
  EXPECT_EQ(kinds[runtime::EventKind::hit], 1);
  EXPECT_EQ(kinds[runtime::EventKind::evict], 1);
  const auto st = pager.stats();
  EXPECT_EQ(st.faults, 2u);
  EXPECT_EQ(st.hits, 1u);
}

}  // namespace
}  // namespace lema::test

namespace lema::test {
namespace {

// On a repeating access sequence, the trace policy with prefetch fetches per pass exactly what
// Belady's MIN fetches, and turns most of those fetches into prefetches.
TEST(Pager, TracePolicyWithPrefetchFetchesWhatBeladyFetches) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  const auto n = static_cast<runtime::PageId>(m.pages());
  std::vector<runtime::PageId> step;  // a training step: forward, then backward
  for (runtime::PageId p = 0; p < n; ++p) step.push_back(p);
  for (runtime::PageId p = n; p-- > 0;) step.push_back(p);
  constexpr std::size_t kCapacity = 5;
  constexpr int kWarmup = 4, kMeasured = 3;

  PagerOptions opt;
  opt.budget_bytes = kCapacity * kPage;
  opt.policy = PolicyKind::trace;
  Pager pager(m.space, opt);
  std::uint64_t fetches_before = 0;
  for (int pass = 0; pass < kWarmup + kMeasured; ++pass) {
    if (pass == kWarmup) {
      const auto st = pager.stats();
      fetches_before = st.faults + st.prefetches_issued;
    }
    for (runtime::PageId p : step) {
      Lease l = pager.acquire_pages({p, 1});
      pager.release(std::move(l));
      pager.quiesce();
    }
  }
  const auto st = pager.stats();
  const std::uint64_t fetched = st.faults + st.prefetches_issued - fetches_before;

  auto repeat = [&](int passes) {
    std::vector<runtime::PageId> seq;
    for (int i = 0; i < passes; ++i) seq.insert(seq.end(), step.begin(), step.end());
    return seq;
  };
  const auto all = repeat(kWarmup + kMeasured);
  const auto warm = repeat(kWarmup);
  const std::uint64_t belady =
      runtime::belady_fetches(all, kCapacity) - runtime::belady_fetches(warm, kCapacity);
  const std::uint64_t lru =
      runtime::lru_fetches(all, kCapacity) - runtime::lru_fetches(warm, kCapacity);
  EXPECT_EQ(fetched, belady) << "lru would fetch " << lru;
  EXPECT_GT(st.prefetches_used, 0u);
  EXPECT_LE(st.peak_resident_bytes, opt.budget_bytes);
}

}  // namespace
}  // namespace lema::test
