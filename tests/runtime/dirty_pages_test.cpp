// Writes to weight pages are kept (Note [Dirty pages]): a tensor written through its address,
// then evicted by reading every other tensor under a small budget, reads back as written, in
// guard and fault mode, on ordinary and huge pages; the checkpoint's files never change. A
// checkpoint opened read-only refuses the write instead (the writer faults).
#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "death.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {
namespace {

using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;
using runtime::ResidencyMode;

// Four layers of 2 MiB pages, about 11 MiB: a budget of three pages holds a quarter of it.
ModelShape model() {
  ModelShape m;
  m.layers = 4;
  m.hidden = 300_KiB + 13;
  return m;
}
constexpr std::uint64_t kBudgetPages = 3;
const std::string kWritten = "model.layers.1.self_attn.q_proj.weight";

std::vector<char> file_contents(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct Case {
  ResidencyMode mode;
  bool huge;
  bool write_protect;  // fault mode: find written pages with userfaultfd write protection
  const char* name;
};

class DirtyPages : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (GetParam().huge && runtime::huge_page_pool().available < 2 * kBudgetPages)
      GTEST_SKIP() << "fewer than " << 2 * kBudgetPages
                   << " free huge pages (vm.nr_hugepages): a writable pool needs twice its pages";
    path_ = write_model(dir_.path(), model());
    before_ = file_contents(path_);
    MappedCheckpointOptions o;
    o.budget_bytes = kBudgetPages * 2_MiB;
    o.mode = GetParam().mode;
    o.huge_pages = GetParam().huge;
    o.uffd_write_protect = GetParam().write_protect;
    o.prefetch = false;
    ckpt_ = MappedCheckpoint::open(path_, o);
    if (ckpt_->mode() != GetParam().mode) GTEST_SKIP() << ckpt_->fallback_reason();
  }

  /// Runs `body` with the tensor's bytes resident: guard mode pins them, fault mode needs not.
  template <class Body>
  void with_resident(const std::string& name, Body body) {
    const runtime::TensorAddress t = ckpt_->tensor(name);
    if (runtime::Pager* pager = ckpt_->pager()) {
      runtime::Lease lease = pager->acquire(t.data, t.nbytes);
      body(t.data, t.nbytes);
      pager->release(std::move(lease));
    } else {
      body(t.data, t.nbytes);
    }
  }

  std::vector<std::byte> read(const std::string& name) {
    std::vector<std::byte> out;
    ckpt_->read_tensor(name, [&](const std::byte* p, std::uint64_t n) {
      out.insert(out.end(), p, p + n);
    });
    return out;
  }

  TempDir dir_{"dirty-pages"};
  std::filesystem::path path_;
  std::vector<char> before_;
  std::unique_ptr<MappedCheckpoint> ckpt_;
};

TEST_P(DirtyPages, AWriteSurvivesEvictionAndNeverReachesTheFile) {
  ASSERT_TRUE(ckpt_->writable());
  const io::TensorInfo& info = *ckpt_->checkpoint().find(kWritten);
  std::vector<std::byte> expected = file_bytes(ckpt_->checkpoint(), info);
  // Every other byte changed, over the whole tensor (it spans two pages).
  with_resident(kWritten, [&](std::byte* p, std::uint64_t n) {
    for (std::uint64_t i = 0; i < n; i += 2) {
      p[i] = ~p[i];
      expected[i] = ~expected[i];
    }
  });
  // Every other tensor read: the written pages are evicted many times over.
  for (const io::TensorInfo& t : ckpt_->checkpoint().tensors()) {
    if (t.name == kWritten) continue;
    EXPECT_EQ(read(t.name), file_bytes(ckpt_->checkpoint(), t)) << t.name;
  }
  const runtime::PagerStats evicted = ckpt_->stats();
  EXPECT_GE(evicted.dirty_evictions, 1u);
  EXPECT_GE(evicted.spilled_pages, 1u);
  EXPECT_LE(evicted.peak_resident_bytes, evicted.budget_bytes);

  EXPECT_EQ(read(kWritten), expected) << "the write was lost at eviction";
  EXPECT_GE(ckpt_->stats().spill_fills, 1u);
  // A second round: the page, clean since its refill, is evicted and read back again.
  for (const io::TensorInfo& t : ckpt_->checkpoint().tensors())
    if (t.name != kWritten) read(t.name);
  EXPECT_EQ(read(kWritten), expected);
  ckpt_.reset();
  EXPECT_TRUE(file_contents(path_) == before_) << "the checkpoint file changed";
}

TEST_P(DirtyPages, UntouchedPagesAreNotSpilled) {
  if (GetParam().mode == ResidencyMode::fault && !GetParam().write_protect)
    GTEST_SKIP() << "without write protection every evicted page is kept";
  for (const io::TensorInfo& t : ckpt_->checkpoint().tensors())
    EXPECT_EQ(read(t.name), file_bytes(ckpt_->checkpoint(), t)) << t.name;
  const runtime::PagerStats s = ckpt_->stats();
  EXPECT_GE(s.evictions, 1u);
  EXPECT_EQ(s.dirty_evictions, 0u);
  EXPECT_EQ(s.spilled_pages, 0u);
}

// Where the spill directory takes no file, the store lives in a memfd: writes are still kept.
TEST(SpillStore, AnUnusableSpillDirectoryFallsBackToMemory) {
  TempDir dir("dirty-pages-memfd");
  const auto path = write_model(dir.path(), model());
  ::setenv("LEMA_SPILL_DIR", (dir.path() / "absent").c_str(), 1);
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  auto ckpt = MappedCheckpoint::open(path, o);
  ::unsetenv("LEMA_SPILL_DIR");
  const runtime::TensorAddress t = ckpt->tensor(kWritten);
  {
    runtime::Lease lease = ckpt->pager()->acquire(t.data, t.nbytes);
    t.data[7] = std::byte{0x5a};
    ckpt->pager()->release(std::move(lease));
  }
  for (const io::TensorInfo& info : ckpt->checkpoint().tensors())
    if (info.name != kWritten) ckpt->read_tensor(info.name, [](const std::byte*, std::uint64_t) {});
  ASSERT_GE(ckpt->stats().spilled_pages, 1u);
  std::byte got{};
  ckpt->read_tensor_range(kWritten, 7, 1, [&](const std::byte* p, std::uint64_t) { got = *p; });
  EXPECT_EQ(got, std::byte{0x5a});
}

INSTANTIATE_TEST_SUITE_P(
    Modes, DirtyPages,
    ::testing::Values(Case{ResidencyMode::guard, false, true, "guard"},
                      Case{ResidencyMode::guard, true, true, "guard_huge_pages"},
                      Case{ResidencyMode::fault, false, true, "fault"},
                      Case{ResidencyMode::fault, false, false, "fault_without_write_protection"}),
    [](const auto& info) { return std::string(info.param.name); });

// Read-only: the mapping refuses the write itself, so nothing can be lost.
class ReadOnly : public ::testing::TestWithParam<ResidencyMode> {};

TEST_P(ReadOnly, ARawWriteFaultsInsteadOfBeingKept) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir dir("dirty-pages-ro");
  const auto path = write_model(dir.path(), model());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  o.mode = GetParam();
  o.read_only = true;
  auto ckpt = MappedCheckpoint::open(path, o);
  if (ckpt->mode() != GetParam()) GTEST_SKIP() << ckpt->fallback_reason();
  EXPECT_FALSE(ckpt->writable());
  const runtime::TensorAddress t = ckpt->tensor(kWritten);
  EXPECT_EXIT(
      {
        runtime::Lease lease;
        if (ckpt->pager() != nullptr) lease = ckpt->pager()->acquire(t.data, t.nbytes);
        volatile std::byte b = t.data[0];  // a read is served
        t.data[0] = ~b;
        std::_Exit(0);
      },
      lema::test::died_of_segv, "");
}

// Without userfaultfd write protection a raw write cannot be refused: it is kept, not lost.
TEST(ReadOnlyFaultMode, WithoutWriteProtectionAWriteIsKeptRatherThanLost) {
  TempDir dir("dirty-pages-ro-nowp");
  const auto path = write_model(dir.path(), model());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  o.mode = ResidencyMode::fault;
  o.read_only = true;
  o.uffd_write_protect = false;
  auto ckpt = MappedCheckpoint::open(path, o);
  if (ckpt->mode() != ResidencyMode::fault) GTEST_SKIP() << ckpt->fallback_reason();
  const runtime::TensorAddress t = ckpt->tensor(kWritten);
  const std::byte flipped = ~t.data[3];
  t.data[3] = flipped;
  std::uint64_t sum = 0;  // touched: fault mode fills pages when they are read
  for (const io::TensorInfo& info : ckpt->checkpoint().tensors()) {
    if (info.name == kWritten) continue;
    ckpt->read_tensor(info.name, [&](const std::byte* p, std::uint64_t n) {
      for (std::uint64_t i = 0; i < n; ++i) sum += static_cast<std::uint8_t>(p[i]);
    });
  }
  EXPECT_GT(sum, 0u);
  EXPECT_GE(ckpt->stats().evictions, 1u);
  EXPECT_EQ(t.data[3], flipped);
}

INSTANTIATE_TEST_SUITE_P(Modes, ReadOnly,
                         ::testing::Values(ResidencyMode::guard, ResidencyMode::fault),
                         [](const auto& info) {
                           return std::string(runtime::residency_mode_name(info.param));
                         });

}  // namespace
}  // namespace lema::test
