// The data of several ranks: TokenBatches::set_shard serves each rank every world-th sequence of
// the shared order, so the ranks together see exactly one loader of the global batch, step by
// step and across epochs, and every rank's position is that loader's.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/trainer/token_batches.hpp"

namespace lema::trainer {
namespace {

std::vector<std::uint32_t> stream(std::size_t n) {
  std::vector<std::uint32_t> ids(n);
  for (std::size_t i = 0; i < n; ++i) ids[i] = static_cast<std::uint32_t>(i);
  return ids;
}

TEST(DistributedData, RanksTogetherServeTheGlobalBatchInTheSharedOrder) {
  constexpr std::int64_t kSeqLen = 4, kBatch = 2;
  for (const int world : {1, 2, 3}) {
    // 7 sequences: a global batch of 2·world runs over epoch ends at different offsets.
    TokenBatches global(stream(7 * kSeqLen), "ids", kSeqLen, kBatch * world, 11);
    std::vector<TokenBatches> ranks;
    for (int r = 0; r < world; ++r) {
      ranks.emplace_back(stream(7 * kSeqLen), "ids", kSeqLen, kBatch, 11);
      ranks.back().set_shard(r, world);
    }
    for (int step = 0; step < 9; ++step) {
      const TokenBatch all = global.next();
      for (int r = 0; r < world; ++r) {
        const TokenBatch mine = ranks[static_cast<std::size_t>(r)].next();
        ASSERT_EQ(mine.rows, kBatch);
        for (std::int64_t row = 0; row < kBatch; ++row) {
          const std::int64_t g = row * world + r;  // every world-th from the r-th
          const std::vector<std::int64_t> want(all.ids.begin() + g * kSeqLen,
                                               all.ids.begin() + (g + 1) * kSeqLen);
          const std::vector<std::int64_t> got(mine.ids.begin() + row * kSeqLen,
                                              mine.ids.begin() + (row + 1) * kSeqLen);
          EXPECT_EQ(got, want) << "world " << world << " rank " << r << " step " << step;
        }
        EXPECT_EQ(ranks[static_cast<std::size_t>(r)].position(), global.position());
      }
    }
  }
}

TEST(DistributedData, ARestoredRankContinuesFromTheSharedPosition) {
  TokenBatches a(stream(40), "ids", 4, 2, 3), b(stream(40), "ids", 4, 2, 3);
  a.set_shard(1, 2);
  b.set_shard(1, 2);
  for (int i = 0; i < 7; ++i) a.next();
  b.restore(a.position());
  EXPECT_EQ(b.next().ids, a.next().ids);
}

TEST(DistributedData, ARankOutsideTheWorldIsRefused) {
  TokenBatches a(stream(40), "ids", 4, 2, 3);
  EXPECT_THROW(a.set_shard(2, 2), InvalidArgument);
  EXPECT_THROW(a.set_shard(-1, 2), InvalidArgument);
  EXPECT_THROW(a.set_shard(0, 0), InvalidArgument);
}

}  // namespace
}  // namespace lema::trainer
