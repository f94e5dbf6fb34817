// Pause and resume (Note [Pause]): every weight page's memory given back with the addresses
// kept, made again on resume, every tensor reading the file's bytes (or its writes) after it;
// acquires while paused, pausing under a lease and resuming what is not paused are refused with
// one line.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/runtime/pager.hpp"
#include "runtime_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;

ModelShape model() {
  ModelShape m;
  m.layers = 4;
  m.hidden = 300_KiB + 13;
  return m;
}
constexpr std::uint64_t kBudgetPages = 3;

/// Bytes the host pools' memfds hold (st_blocks), found by their name in /proc/self/fd.
std::uint64_t host_pool_bytes() {
  std::uint64_t bytes = 0;
  for (const auto& fd : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const std::string target = std::filesystem::read_symlink(fd.path(), ec).string();
    if (ec || target.rfind("/memfd:lema-pool", 0) != 0) continue;
    struct stat st {};
    if (::stat(fd.path().c_str(), &st) == 0)
      bytes += static_cast<std::uint64_t>(st.st_blocks) * 512;
  }
  return bytes;
}

struct Case {
  const char* name;
  bool cuda;
};

class PagerPause : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    path_ = write_model(dir_.path(), model());
    MappedCheckpointOptions o;
    o.budget_bytes = kBudgetPages * 2_MiB;
    o.prefetch = false;
    o.page_size = 2_MiB;
#ifdef LEMA_FAKE_CUDA_DRIVER
    if (GetParam().cuda) {
      o.backend = std::shared_ptr<runtime::Backend>(make_fake_cuda_backend(2_MiB));
      o.read_only = true;
    }
#else
    if (GetParam().cuda) GTEST_SKIP() << "built without the fake CUDA driver";
#endif
    ckpt_ = MappedCheckpoint::open(path_, o);
    pager_ = ckpt_->pager();
    ASSERT_NE(pager_, nullptr);
  }

  std::vector<std::byte> read(const std::string& name) {
    const runtime::TensorAddress t = ckpt_->tensor(name);
    runtime::Lease lease = pager_->acquire(t.data, t.nbytes);
    std::vector<std::byte> out;
#ifdef LEMA_FAKE_CUDA_DRIVER
    // One copy per page: a device copy must lie inside one mapping.
    for (std::uint64_t at = 0; GetParam().cuda && at < t.nbytes;) {
      const auto addr = reinterpret_cast<std::uintptr_t>(t.data) + at;
      const std::uint64_t n = std::min<std::uint64_t>(t.nbytes - at, 2_MiB - addr % 2_MiB);
      const auto part = read_device(fake_cuda_driver_path(), t.data + at, n);
      out.insert(out.end(), part.begin(), part.end());
      at += n;
    }
#endif
    if (!GetParam().cuda) out.assign(t.data, t.data + t.nbytes);
    pager_->release(std::move(lease));
    return out;
  }

  std::size_t resident() {
    std::size_t n = 0;
    for (runtime::PageId p = 0; p < pager_->space().page_count(); ++p) n += pager_->is_resident(p);
    return n;
  }

  // The pool's memory held now: host, the memfd's blocks; cuda, the fake's live allocations.
  std::uint64_t pool_memory() {
#ifdef LEMA_FAKE_CUDA_DRIVER
    if (GetParam().cuda) return fake().live_handles();
#endif
    return host_pool_bytes();
  }

  TempDir dir_{"pager-pause"};
  std::filesystem::path path_;
  std::unique_ptr<MappedCheckpoint> ckpt_;
  runtime::Pager* pager_ = nullptr;
};

TEST_P(PagerPause, ReleasesThePoolAndRefillsEveryTensorAfterResume) {
  for (const io::TensorInfo& t : ckpt_->checkpoint().tensors())
    ASSERT_EQ(read(t.name), file_bytes(ckpt_->checkpoint(), t)) << t.name;
  const std::uint64_t held = pool_memory();
  ASSERT_GT(held, 0u);
  ASSERT_GT(resident(), 0u);

  ckpt_->pause();
  EXPECT_TRUE(pager_->paused());
  EXPECT_EQ(resident(), 0u);
  if (GetParam().cuda) {
    // Each chunk is an allocation and its mapping in the pool window (the fake counts both,
    // and the resident pages' mappings at their model addresses, gone too).
    EXPECT_LE(pool_memory(), held - 2 * kBudgetPages) << "every chunk's allocation released";
  } else {
    EXPECT_EQ(pool_memory(), 0u) << "the memfd still holds memory";
  }

  const std::uint64_t paused = pool_memory();
  ckpt_->resume();
  EXPECT_FALSE(pager_->paused());
  if (GetParam().cuda) {
    EXPECT_EQ(pool_memory(), paused + 2 * kBudgetPages) << "every chunk made again";
  }
  for (const io::TensorInfo& t : ckpt_->checkpoint().tensors())
    EXPECT_EQ(read(t.name), file_bytes(ckpt_->checkpoint(), t)) << t.name << " after resume";
  // A second round trip.
  ckpt_->pause();
  ckpt_->resume();
  const io::TensorInfo& first = ckpt_->checkpoint().tensors().front();
  EXPECT_EQ(read(first.name), file_bytes(ckpt_->checkpoint(), first));
}

TEST_P(PagerPause, AcquireWhilePausedIsRefused) {
  ckpt_->pause();
  const runtime::TensorAddress t = ckpt_->tensor(ckpt_->checkpoint().tensors().front().name);
  try {
    runtime::Lease lease = pager_->acquire(t.data, t.nbytes);
    FAIL() << "an acquire while paused succeeded";
  } catch (const runtime::PagerPaused& e) {
    EXPECT_NE(std::string(e.what()).find("call resume()"), std::string::npos) << e.what();
  }
  ckpt_->resume();
  EXPECT_EQ(read(ckpt_->checkpoint().tensors().front().name),
            file_bytes(ckpt_->checkpoint(), ckpt_->checkpoint().tensors().front()));
}

TEST_P(PagerPause, PauseUnderALeaseAndResumeWithoutPauseAreRefused) {
  const runtime::TensorAddress t = ckpt_->tensor(ckpt_->checkpoint().tensors().front().name);
  runtime::Lease lease = pager_->acquire(t.data, t.nbytes);
  try {
    ckpt_->pause();
    FAIL() << "paused under a lease";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(std::to_string(lease.pages().size()) + " page"), std::string::npos) << what;
    EXPECT_NE(what.find("pinned"), std::string::npos) << what;
  }
  EXPECT_FALSE(pager_->paused()) << "a refused pause left the pager paused";
  EXPECT_TRUE(pager_->is_resident(lease.pages().front()));
  pager_->release(std::move(lease));
  try {
    ckpt_->resume();
    FAIL() << "resumed what was not paused";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("not paused"), std::string::npos) << e.what();
  }
  ckpt_->pause();
  EXPECT_THROW(ckpt_->pause(), InvalidArgument);
  ckpt_->resume();
}

TEST_P(PagerPause, WrittenWeightsSurvivePauseAndResume) {
  if (!ckpt_->writable()) GTEST_SKIP() << "this backend's weights are read-only";
  const io::TensorInfo& info = ckpt_->checkpoint().tensors()[1];
  std::vector<std::byte> expected = file_bytes(ckpt_->checkpoint(), info);
  {
    const runtime::TensorAddress t = ckpt_->tensor(info.name);
    runtime::Lease lease = pager_->acquire(t.data, t.nbytes);
    for (std::uint64_t i = 0; i < t.nbytes; i += 3) {
      t.data[i] = ~t.data[i];
      expected[i] = ~expected[i];
    }
    pager_->release(std::move(lease));
  }
  ckpt_->pause();
  EXPECT_EQ(host_pool_bytes(), 0u);
  EXPECT_GE(ckpt_->stats().spilled_pages, 1u);
  ckpt_->resume();
  EXPECT_EQ(read(info.name), expected) << "the write was lost across pause";
}

// The prefetcher's fills are waited for, and it claims nothing while paused.
TEST(PagerPauseHost, PausesWithThePrefetcherRunning) {
  TempDir dir("pager-pause-prefetch");
  const auto path = write_model(dir.path(), model());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  o.policy = runtime::PolicyKind::trace;
  auto ckpt = MappedCheckpoint::open(path, o);
  for (int round = 0; round < 3; ++round) {
    for (const io::TensorInfo& t : ckpt->checkpoint().tensors()) {
      std::vector<std::byte> got;
      ckpt->read_tensor(
          t.name, [&](const std::byte* p, std::uint64_t n) { got.insert(got.end(), p, p + n); });
      ASSERT_EQ(got, file_bytes(ckpt->checkpoint(), t)) << t.name << " round " << round;
      if (&t == &ckpt->checkpoint().tensors()[2]) {
        ckpt->pause();
        ckpt->mark_step();
        EXPECT_EQ(host_pool_bytes(), 0u);
        ckpt->resume();
      }
    }
    ckpt->mark_step();
  }
}

TEST(PagerPauseHost, FaultModeRefusesWithOneLine) {
  TempDir dir("pager-pause-fault");
  const auto path = write_model(dir.path(), model());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  o.mode = runtime::ResidencyMode::fault;
  auto ckpt = MappedCheckpoint::open(path, o);
  if (ckpt->mode() != runtime::ResidencyMode::fault) GTEST_SKIP() << ckpt->fallback_reason();
  try {
    ckpt->pause();
    FAIL() << "fault mode paused";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("guard mode"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ckpt->resume(), InvalidArgument);
}

#ifdef LEMA_FAKE_CUDA_DRIVER
// Unified memory (managed) has no pool memory to give back: refused before anything is evicted.
TEST(PagerPauseManaged, IsRefusedNamingTheBackend) {
  TempDir dir("pager-pause-managed");
  const auto path = write_model(dir.path(), model());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudgetPages * 2_MiB;
  o.page_size = 2_MiB;
  o.prefetch = false;
  o.read_only = true;
  o.backend = std::shared_ptr<runtime::Backend>(make_fake_managed_backend(2_MiB));
  auto ckpt = MappedCheckpoint::open(path, o);
  runtime::Pager& pager = *ckpt->pager();
  const runtime::TensorAddress t = ckpt->tensor(ckpt->checkpoint().tensors().front().name);
  pager.release(pager.acquire(t.data, t.nbytes));
  const runtime::PageId page = pager.space().page_of(t.data);
  ASSERT_TRUE(pager.is_resident(page));
  try {
    ckpt->pause();
    FAIL() << "unified memory paused";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("managed"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(pager.paused());
  EXPECT_TRUE(pager.is_resident(page)) << "a refused pause evicted pages";
}
#endif

INSTANTIATE_TEST_SUITE_P(Backends, PagerPause,
                         ::testing::Values(Case{"host", false}, Case{"fake_cuda", true}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace lema::test
