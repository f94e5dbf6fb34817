// Several threads acquire random, overlapping ranges under a tiny budget; every byte read must
// equal the file. LEMA_STRESS_SCALE=N multiplies the number of acquires.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include "lema/base/units.hpp"
#include "pager_fixture.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PolicyKind;

// Acquires per policy: 10^5 in all. Sanitizers slow each fill by an order of magnitude.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr std::uint64_t kAcquires = 8'000;
#else
constexpr std::uint64_t kAcquires = 50'000;
#endif

std::uint64_t scaled(std::uint64_t n) {
  const char* s = std::getenv("LEMA_STRESS_SCALE");
  const long scale = s ? std::atol(s) : 1;
  return n * static_cast<std::uint64_t>(scale > 0 ? scale : 1);
}

class PagerStress : public ::testing::TestWithParam<PolicyKind> {};

TEST_P(PagerStress, RandomOverlappingAcquiresFromFourThreadsReadTheFileBytes) {
  constexpr std::uint64_t kTinyPage = 4_KiB;
  ModelShape shape;
  shape.layers = 4;
  shape.hidden = 3 * 1024 + 5;
  shape.embed = 9 * 1024 + 1;
  shape.norm = 300;
  shape.shards = 2;
  OpenedModel m(runtime::make_host_backend(kTinyPage), shape, kTinyPage, "stress");
  // The expected image of the whole virtual range (zeros between tensors).
  std::vector<std::byte> image(m.space.size(), std::byte{0});
  for (const auto& t : m.space.layout().tensors()) {
    const auto& b = m.expected.at(t.name);
    std::memcpy(image.data() + t.offset, b.data(), b.size());
  }
  PagerOptions opt;
  opt.budget_bytes = 6 * kTinyPage;
  opt.policy = GetParam();
  opt.reader.direct = false;  // 4 KiB reads at odd offsets: buffered is what a user would get
  Pager pager(m.space, opt);

  const std::uint64_t per_thread = scaled(kAcquires) / 4;
  const std::uint64_t size = m.space.layout().virtual_bytes();
  std::atomic<std::uint64_t> mismatches{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      std::mt19937_64 rng(7 + i);
      for (std::uint64_t k = 0; k < per_thread; ++k) {
        // A range of up to 3 pages anywhere, sometimes 2 ranges (an op with two inputs).
        const std::uint64_t a = rng() % size;
        const std::uint64_t n = 1 + rng() % std::min<std::uint64_t>(size - a, 2 * kTinyPage);
        std::vector<runtime::ByteRange> ranges{{m.space.base() + a, n}};
        std::uint64_t b = 0, bn = 0;
        if (rng() % 4 == 0) {
          b = rng() % size;
          bn = 1 + rng() % std::min<std::uint64_t>(size - b, kTinyPage);
          ranges.push_back({m.space.base() + b, bn});
        }
        Lease l = pager.acquire(ranges);
        if (std::memcmp(m.space.base() + a, image.data() + a, n) != 0) ++mismatches;
        if (bn && std::memcmp(m.space.base() + b, image.data() + b, bn) != 0) ++mismatches;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0u);
  const auto st = pager.stats();
  EXPECT_LE(st.peak_resident_bytes, opt.budget_bytes);
  EXPECT_GE(st.faults + st.hits, per_thread * 4);
  EXPECT_GT(st.faults, 0u);
  EXPECT_GT(st.evictions, 0u);
}

INSTANTIATE_TEST_SUITE_P(Policies, PagerStress,
                         ::testing::Values(PolicyKind::lru, PolicyKind::trace),
                         [](const auto& info) {
                           return std::string(info.param == PolicyKind::lru ? "lru" : "trace");
                         });

}  // namespace
}  // namespace lema::test
