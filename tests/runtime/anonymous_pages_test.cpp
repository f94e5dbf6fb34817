// Anonymous pages after the weights (MappedCheckpointOptions::anonymous_bytes; Note [Page
// source]): zero on first touch, written through their plain addresses, kept in the spill store
// when evicted and read back as written, under the one budget the weights are paged under, in
// guard mode (served by the fault fallback) and fault mode (userfaultfd); and anonymous memory
// with no checkpoint at all (open_anonymous).
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {
namespace {

using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;
using runtime::ResidencyMode;

constexpr std::uint64_t kBudgetPages = 3;
constexpr std::uint64_t kAnonymous = 10_MiB;  // five pages of 2 MiB: more than the budget

ModelShape model() {
  ModelShape m;
  m.layers = 2;
  m.hidden = 300_KiB + 13;
  return m;
}

// A byte for each offset that no zero page or file page has by chance.
std::byte pattern(std::uint64_t i) { return static_cast<std::byte>((i * 131 + 7) % 251 + 1); }

class AnonymousPages : public ::testing::TestWithParam<ResidencyMode> {
 protected:
  MappedCheckpointOptions options() const {
    MappedCheckpointOptions o;
    o.budget_bytes = kBudgetPages * 2_MiB;
    o.mode = GetParam();
    o.prefetch = false;
    o.anonymous_bytes = kAnonymous;
    return o;
  }
  // Skips where the plain loads and stores this test makes cannot be served.
  bool unguarded(const MappedCheckpoint& c) {
    if (c.mode() != GetParam()) return false;
    return c.fault_fallback_reason().empty();
  }
  TempDir dir_{"anonymous-pages"};
};

TEST_P(AnonymousPages, ZeroOnFirstTouchKeptAcrossEvictionUnderOneBudget) {
  const auto path = write_model(dir_.path(), model());
  auto ckpt = MappedCheckpoint::open(path, options());
  if (!unguarded(*ckpt)) GTEST_SKIP() << "userfaultfd unavailable: " << ckpt->fallback_reason()
                                      << ckpt->fault_fallback_reason();
  const runtime::TensorAddress anon = ckpt->anonymous();
  ASSERT_NE(anon.data, nullptr);
  ASSERT_EQ(anon.nbytes, kAnonymous);
  // The range follows the weights, on a page boundary.
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(anon.data) % 2_MiB, 0u);
  for (std::uint64_t i = 0; i < anon.nbytes; i += 4096) ASSERT_EQ(anon.data[i], std::byte{0}) << i;
  for (std::uint64_t i = 0; i < anon.nbytes; ++i) anon.data[i] = pattern(i);
  // Every weight read: the written anonymous pages are evicted, and the weights are unharmed.
  for (const io::TensorInfo& t : ckpt->checkpoint().tensors()) {
    std::vector<std::byte> got;
    ckpt->read_tensor(t.name, [&](const std::byte* p, std::uint64_t n) {
      got.insert(got.end(), p, p + n);
    });
    EXPECT_EQ(got, file_bytes(ckpt->checkpoint(), t)) << t.name;
  }
  std::uint64_t wrong = 0;
  for (std::uint64_t i = 0; i < anon.nbytes; ++i) wrong += anon.data[i] != pattern(i);
  EXPECT_EQ(wrong, 0u) << "bytes written to anonymous memory were lost at eviction";
  const runtime::PagerStats s = ckpt->stats();
  EXPECT_GE(s.spilled_pages, kAnonymous / 2_MiB - kBudgetPages);
  EXPECT_LE(s.peak_resident_bytes, kBudgetPages * 2_MiB);
}

// Fault mode: read-only weights refuse writes, the anonymous pages after them take them.
TEST(AnonymousPagesFault, WritableBesideReadOnlyWeights) {
  TempDir dir("anonymous-read-only");
  const auto path = write_model(dir.path(), model());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  o.mode = ResidencyMode::fault;
  o.prefetch = false;
  o.read_only = true;
  o.anonymous_bytes = kAnonymous;
  auto ckpt = MappedCheckpoint::open(path, o);
  if (ckpt->mode() != ResidencyMode::fault) GTEST_SKIP() << ckpt->fallback_reason();
  EXPECT_FALSE(ckpt->writable());
  const runtime::TensorAddress anon = ckpt->anonymous();
  for (std::uint64_t i = 0; i < anon.nbytes; ++i) anon.data[i] = pattern(i);
  for (const io::TensorInfo& t : ckpt->checkpoint().tensors())
    ckpt->read_tensor(t.name, [](const std::byte*, std::uint64_t) {});
  std::uint64_t wrong = 0;
  for (std::uint64_t i = 0; i < anon.nbytes; ++i) wrong += anon.data[i] != pattern(i);
  EXPECT_EQ(wrong, 0u);
  EXPECT_GE(ckpt->stats().spilled_pages, kAnonymous / 2_MiB - kBudgetPages);
}

TEST_P(AnonymousPages, WithoutACheckpoint) {
  auto mem = MappedCheckpoint::open_anonymous(options());
  if (!unguarded(*mem)) GTEST_SKIP() << "userfaultfd unavailable";
  const runtime::TensorAddress anon = mem->anonymous();
  ASSERT_EQ(anon.nbytes, kAnonymous);
  EXPECT_TRUE(mem->checkpoint().tensors().empty());
  for (int round = 0; round < 2; ++round) {
    for (std::uint64_t i = 0; i < anon.nbytes; i += 1024)
      anon.data[i] = static_cast<std::byte>(static_cast<std::uint8_t>(pattern(i)) + round);
    std::uint64_t wrong = 0;
    for (std::uint64_t i = 0; i < anon.nbytes; i += 1024)
      wrong += anon.data[i] != static_cast<std::byte>(static_cast<std::uint8_t>(pattern(i)) + round);
    EXPECT_EQ(wrong, 0u) << "round " << round;
  }
  EXPECT_LE(mem->stats().peak_resident_bytes, kBudgetPages * 2_MiB);
  EXPECT_EQ(mem->stats().bytes_read, 0u) << "anonymous pages are never read from a file";
}

TEST_P(AnonymousPages, RefusedWhereWritesCannotBeKept) {
  MappedCheckpointOptions o = options();
  o.read_only = true;
  if (GetParam() == ResidencyMode::guard) {
    EXPECT_THROW(MappedCheckpoint::open_anonymous(o), InvalidArgument);
  }
  o = options();
  o.anonymous_bytes = 0;
  EXPECT_THROW(MappedCheckpoint::open_anonymous(o), InvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Modes, AnonymousPages,
                         ::testing::Values(ResidencyMode::guard, ResidencyMode::fault),
                         [](const auto& info) {
                           return std::string(runtime::residency_mode_name(info.param));
                         });

}  // namespace
}  // namespace lema::test
