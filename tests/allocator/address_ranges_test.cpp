// AddressRanges: first fit, alignment, coalescing, exhaustion.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "lema/allocator/cuda/address_ranges.hpp"

namespace lema::allocator::cuda {
namespace {

TEST(AddressRanges, TakesLowestFitAndGivesBackIntoOnePiece) {
  AddressRanges r(1000);
  EXPECT_EQ(r.take(100, 1), 0u);
  EXPECT_EQ(r.take(100, 1), 100u);
  EXPECT_EQ(r.take(100, 1), 200u);
  r.give_back(100, 100);
  EXPECT_EQ(r.take(50, 1), 100u);  // the hole, first
  r.give_back(100, 50);
  r.give_back(0, 100);
  r.give_back(200, 100);
  EXPECT_EQ(r.free_pieces(), 1u);
  EXPECT_EQ(r.free_bytes(), 1000u);
  EXPECT_EQ(r.largest_free(), 1000u);
}

TEST(AddressRanges, HonoursAlignmentAndKeepsThePaddingFree) {
  AddressRanges r(4096);
  EXPECT_EQ(r.take(10, 1), 0u);
  EXPECT_EQ(r.take(100, 1024), 1024u);
  EXPECT_EQ(r.take(10, 1), 10u);  // the padding before the aligned block is still free
  EXPECT_EQ(r.free_bytes(), 4096u - 120u);
}

TEST(AddressRanges, ReportsNoRoomWithoutChangingAnything) {
  AddressRanges r(300);
  EXPECT_EQ(r.take(100, 1), 0u);
  EXPECT_EQ(r.take(100, 1), 100u);
  r.give_back(0, 100);
  EXPECT_FALSE(r.take(150, 1).has_value());  // 200 free, but in two pieces of 100
  EXPECT_EQ(r.free_bytes(), 200u);
  EXPECT_EQ(r.free_pieces(), 2u);
}

TEST(AddressRanges, RandomTakesNeverOverlapAndAllComeBack) {
  AddressRanges r(1 << 20);
  std::mt19937 rng(7);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> live;
  for (int i = 0; i < 5000; ++i) {
    if (live.empty() || rng() % 3 != 0) {
      const std::uint64_t bytes = 1 + rng() % 4096;
      const std::uint64_t align = std::uint64_t{1} << (rng() % 10);
      if (auto o = r.take(bytes, align)) {
        EXPECT_EQ(*o % align, 0u);
        for (auto& [lo, n] : live) ASSERT_TRUE(*o + bytes <= lo || lo + n <= *o);
        live.push_back({*o, bytes});
      }
    } else {
      const std::size_t k = rng() % live.size();
      r.give_back(live[k].first, live[k].second);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
    }
  }
  for (auto& [lo, n] : live) r.give_back(lo, n);
  EXPECT_EQ(r.free_pieces(), 1u);
  EXPECT_EQ(r.free_bytes(), std::uint64_t{1} << 20);
}

}  // namespace
}  // namespace lema::allocator::cuda
