// VmmResource (allocator/vmm): allocations several times the budget keep their bytes across
// eviction while the resident memory stays under the budget; pages are zero on first touch;
// freed ranges are reused; bad requests get their named errors; and the memory shares one
// budget with a checkpoint's weights (Note [One budget]). In fault mode and in guard mode.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "lema/allocator/vmm_resource.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "runtime_fixture.hpp"

namespace lema::allocator {
namespace {

using runtime::ResidencyMode;

constexpr std::uint64_t kBudget = 8_MiB;  // four pages of 2 MiB

std::uint8_t pattern(std::uint64_t block, std::uint64_t i) {
  return static_cast<std::uint8_t>((i * 131 + block * 17 + 7) % 251 + 1);
}

class Vmm : public ::testing::TestWithParam<ResidencyMode> {
 protected:
  VmmOptions options() const {
    VmmOptions o;
    o.budget_bytes = kBudget;
    o.capacity_bytes = 256_MiB;
    o.mode = GetParam();
    return o;
  }
  void SetUp() override {
    mr_ = std::make_unique<VmmResource>(options());
    // Plain loads and stores need userfaultfd (fault mode, or guard mode's fault fallback).
    if (mr_->memory().mode() != GetParam() || !mr_->memory().fault_fallback_reason().empty())
      GTEST_SKIP() << "userfaultfd unavailable: " << mr_->memory().fallback_reason()
                   << mr_->memory().fault_fallback_reason();
  }
  std::unique_ptr<VmmResource> mr_;
};

TEST_P(Vmm, BytesSurviveEvictionWhileResidentStaysUnderTheBudget) {
  constexpr int kBlocks = 5;
  constexpr std::uint64_t kBytes = 6_MiB + 123;  // 30 MiB in all: almost four budgets
  std::vector<std::uint8_t*> blocks;
  for (int b = 0; b < kBlocks; ++b) {
    auto* p = static_cast<std::uint8_t*>(mr_->allocate(kBytes, 64));
    ASSERT_TRUE(mr_->contains(p));
    for (std::uint64_t i = 0; i < kBytes; ++i) p[i] = pattern(b, i);
    blocks.push_back(p);
  }
  EXPECT_GE(mr_->bytes_in_use(), kBlocks * kBytes);
  for (int round = 0; round < 2; ++round) {
    for (int b = 0; b < kBlocks; ++b) {
      std::uint64_t wrong = 0;
      for (std::uint64_t i = 0; i < kBytes; ++i) wrong += blocks[b][i] != pattern(b, i);
      EXPECT_EQ(wrong, 0u) << "block " << b << ", round " << round;
    }
  }
  const runtime::PagerStats s = mr_->stats();
  EXPECT_LE(s.peak_resident_bytes, kBudget);
  EXPECT_LE(s.resident_bytes, kBudget);
  EXPECT_GT(s.spilled_pages, 0u);
  for (auto* p : blocks) mr_->deallocate(p, kBytes, 64);
  EXPECT_EQ(mr_->bytes_in_use(), 0u);
}

TEST_P(Vmm, ZeroOnFirstTouch) {
  constexpr std::uint64_t kBytes = 3 * kBudget;
  auto* p = static_cast<std::uint8_t*>(mr_->allocate(kBytes));
  std::uint64_t nonzero = 0;
  for (std::uint64_t i = 0; i < kBytes; ++i) nonzero += p[i] != 0;
  EXPECT_EQ(nonzero, 0u);
  EXPECT_EQ(mr_->stats().bytes_read, 0u);
  mr_->deallocate(p, kBytes);
}

TEST_P(Vmm, FreedRangesAreReused) {
  void* a = mr_->allocate(1_MiB);
  void* b = mr_->allocate(1_MiB);
  mr_->deallocate(a, 1_MiB);
  EXPECT_EQ(mr_->allocate(1_MiB), a) << "the freed range was not reused";
  mr_->deallocate(a, 1_MiB);
  mr_->deallocate(b, 1_MiB);
  // Everything freed coalesces: the whole capacity is one block again, many times over.
  for (int i = 0; i < 3; ++i) {
    void* all = mr_->allocate(mr_->capacity());
    ASSERT_NE(all, nullptr);
    mr_->deallocate(all, mr_->capacity());
  }
}

// Note [Freed pages]: in fault mode freed pages are dropped unsaved: no memory, no spill file.
TEST_P(Vmm, FreedPagesGiveBackTheirMemoryAndSpillSpace) {
  if (GetParam() != ResidencyMode::fault) GTEST_SKIP() << "guard mode keeps freed pages";
  constexpr std::uint64_t kBytes = 3 * kBudget;
  auto* keep = static_cast<std::uint8_t*>(mr_->allocate(1000));  // shares a page with `p`
  auto* p = static_cast<std::uint8_t*>(mr_->allocate(kBytes));
  std::memset(keep, 0x5a, 1000);
  std::memset(p, 0x33, kBytes);
  ASSERT_GT(mr_->stats().spilled_pages, 0u);
  mr_->deallocate(p, kBytes);
  const runtime::PagerStats s = mr_->stats();
  // At most the page `keep` shares stays, resident or spilled.
  EXPECT_LE(s.resident_bytes, 2_MiB);
  EXPECT_LE(s.spilled_pages, 1u);
  std::uint64_t wrong = 0;
  for (int i = 0; i < 1000; ++i) wrong += keep[i] != 0x5a;
  EXPECT_EQ(wrong, 0u) << "a live block lost bytes on a page it shares with a freed one";
  mr_->deallocate(keep, 1000);
}

// Without pressure a freed block's pages stay mapped, so a step that frees and allocates the same
// activations again does not fault them in anew (Note [Freed pages]).
TEST_P(Vmm, FreedPagesStayMappedWithoutPressure) {
  if (GetParam() != ResidencyMode::fault) GTEST_SKIP() << "guard mode keeps freed pages";
  constexpr std::uint64_t kBytes = 4_MiB;  // two of the budget's four pages: no pressure
  auto* p = static_cast<std::uint8_t*>(mr_->allocate(kBytes, 2_MiB));
  std::memset(p, 0x33, kBytes);
  const runtime::PagerStats before = mr_->stats();
  mr_->deallocate(p, kBytes, 2_MiB);
  EXPECT_EQ(mr_->stats().resident_bytes, before.resident_bytes);
  auto* q = static_cast<std::uint8_t*>(mr_->allocate(kBytes, 2_MiB));
  ASSERT_EQ(q, p) << "best fit places the same block where the freed one was";
  std::memset(q, 0x44, kBytes);
  const runtime::PagerStats after = mr_->stats();
  EXPECT_EQ(after.faults, before.faults) << "freed pages were dropped and faulted in again";
  EXPECT_EQ(after.spilled_pages, 0u);
  mr_->deallocate(q, kBytes, 2_MiB);
}

TEST_P(Vmm, BadRequestsGetTheirNamedErrors) {
  EXPECT_THROW(mr_->allocate(64, 0), InvalidArgument);
  EXPECT_THROW(mr_->allocate(64, 48), InvalidArgument);
  EXPECT_THROW(mr_->allocate(mr_->capacity() + 1), OutOfMemory);
  EXPECT_THROW(mr_->allocate(std::uint64_t{1} << 62), OutOfMemory);
  try {
    mr_->allocate(mr_->capacity() * 2);
    FAIL() << "no error";
  } catch (const OutOfMemory& e) {
    EXPECT_NE(std::string(e.what()).find("capacity"), std::string::npos) << e.what();
  }
  VmmOptions o = options();
  o.budget_bytes = 1_MiB;  // under one page
  EXPECT_THROW(VmmResource{o}, BudgetError);
}

TEST_P(Vmm, SharesOneBudgetWithTheWeights) {
  test::TempDir dir("vmm-shared");
  test::ModelShape m;
  m.layers = 2;
  m.hidden = 300_KiB + 13;
  const auto path = test::write_model(dir.path(), m);
  runtime::MappedCheckpointOptions o;
  o.budget_bytes = kBudget;
  o.mode = GetParam();
  o.prefetch = false;
  o.anonymous_bytes = 64_MiB;
  auto ckpt = runtime::MappedCheckpoint::open(path, o);
  VmmResource mr(*ckpt);
  constexpr std::uint64_t kBytes = 20_MiB;
  auto* p = static_cast<std::uint8_t*>(mr.allocate(kBytes));
  for (std::uint64_t i = 0; i < kBytes; ++i) p[i] = pattern(0, i);
  for (const io::TensorInfo& t : ckpt->checkpoint().tensors()) {
    std::vector<std::byte> got;
    ckpt->read_tensor(t.name, [&](const std::byte* b, std::uint64_t n) {
      got.insert(got.end(), b, b + n);
    });
    EXPECT_EQ(got, test::file_bytes(ckpt->checkpoint(), t)) << t.name;
  }
  std::uint64_t wrong = 0;
  for (std::uint64_t i = 0; i < kBytes; ++i) wrong += p[i] != pattern(0, i);
  EXPECT_EQ(wrong, 0u);
  EXPECT_LE(ckpt->stats().peak_resident_bytes, kBudget) << "weights and allocations together";
  mr.deallocate(p, kBytes);
}

INSTANTIATE_TEST_SUITE_P(Modes, Vmm, ::testing::Values(ResidencyMode::fault, ResidencyMode::guard),
                         [](const auto& info) {
                           return std::string(runtime::residency_mode_name(info.param));
                         });

}  // namespace
}  // namespace lema::allocator
