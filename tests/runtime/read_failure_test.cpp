// A checkpoint that cannot be read (truncated while in use, EIO) gives every acquirer and every
// read_tensor one named io::ReadError: never a hang, a prefetcher retrying the bad page forever,
// or a signal (only fault-mode code reading the addresses directly gets one, after the error is
// logged). A watchdog turns a regression into a failure instead of a hung test.
#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "lema/io/errors.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/runtime/pager.hpp"
#include "death.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::PageId;
using runtime::Pager;
using runtime::PagerOptions;

/// Ends the process with a failure when a test has not finished in `seconds`: a regression to a
/// hang or a spin fails the test run instead of blocking it.
class Watchdog {
 public:
  explicit Watchdog(int seconds) {
    thread_ = std::thread([this, seconds] {
      std::unique_lock lock(mutex_);
      if (!cv_.wait_for(lock, std::chrono::seconds(seconds), [&] { return done_; })) {
        std::fprintf(stderr, "watchdog: %s still running after %d s (hang or spin)\n",
                     ::testing::UnitTest::GetInstance()->current_test_info()->name(), seconds);
        std::_Exit(3);
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

constexpr int kWatchdogSeconds = 120;

std::vector<char> whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Rewrites the file in place (same inode, so open descriptors see it).
void rewrite(const std::filesystem::path& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::in | std::ios::out);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Holds every read of one file region until opened, counting them; then lets them run.
struct GateOnRegion : io::FaultInjector {
  std::uint32_t file = 0;
  std::uint64_t begin = 0, end = 0;
  std::atomic<int> calls{0};
  std::mutex mutex;
  std::condition_variable cv;
  bool open = false;

  std::optional<long> inject(std::uint32_t f, std::uint64_t offset, std::uint64_t length) override {
    if (f != file || offset >= end || offset + length <= begin) return std::nullopt;
    ++calls;
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return open; });
    return std::nullopt;
  }
  void let_through() {
    {
      std::lock_guard lock(mutex);
      open = true;
    }
    cv.notify_all();
  }
};

// Counts reads of one file region and fails them with EIO while `on`.
struct CountingFailure : io::FaultInjector {
  std::uint32_t file = 0;
  std::uint64_t begin = 0, end = 0;
  std::atomic<bool> on{false};
  std::atomic<int> failed{0};
  std::optional<long> inject(std::uint32_t f, std::uint64_t offset, std::uint64_t length) override {
    if (!on || f != file || offset >= end || offset + length <= begin) return std::nullopt;
    ++failed;
    return -EIO;
  }
};

// Several threads acquire a page whose file is truncated while the first one fills it: all of
// them get the fill's named error, from the one fill (no waiter reads the page again), none
// hangs; the page is absent with its chunk free; the next acquire reads again and fails the same
// way while the file is short, and gets the right bytes once it is whole again.
TEST(ReadFailure, EveryWaiterOfAFailedFillGetsItsErrorOnce) {
  Watchdog watchdog(kWatchdogSeconds);
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  const auto& t = *m.space.layout().find("model.layers.2.mlp.down_proj.weight");
  const std::filesystem::path file = m.space.layout().files()[t.file];
  const PageId page = m.space.page_of(m.space.base() + t.offset + t.nbytes / 2);
  auto gate = std::make_shared<GateOnRegion>();
  gate->file = t.file;
  gate->begin = t.file_offset;
  gate->end = t.file_offset + t.nbytes;
  PagerOptions opt;
  opt.budget_bytes = 4 * kPage;
  opt.reader.kind = io::IoKind::pread;
  opt.reader.direct = false;
  opt.reader.fault_injector = gate;
  Pager pager(m.space, opt);
  const std::vector<char> original = whole_file(file);
  std::filesystem::resize_file(file, t.file_offset);  // after the pager opened it

  constexpr int kThreads = 4;
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      try {
        Lease l = pager.acquire_pages({page, 1});
        errors[i] = "no error";
      } catch (const io::ReadError& e) {
        EXPECT_EQ(std::filesystem::path(e.file()), file);
        errors[i] = e.what();
      } catch (const std::exception& e) {
        errors[i] = std::string("another error: ") + e.what();
      }
    });
  }
  // The first acquirer is held in its read, the others wait for its fill (counted as hits).
  while (gate->calls.load() == 0 || pager.stats().hits < kThreads - 1)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  gate->let_through();
  for (auto& th : threads) th.join();

  for (const std::string& what : errors) {
    EXPECT_NE(what.find(file.string()), std::string::npos) << what;
    EXPECT_NE(what.find("changed under us"), std::string::npos) << what;
  }
  auto st = pager.stats();
  EXPECT_EQ(st.faults, 1u) << "a waiter read the page again instead of taking the fill's error";
  EXPECT_EQ(st.resident_bytes, 0u);
  EXPECT_FALSE(pager.is_resident(page));
  // The chunk went back: the whole budget is usable.
  { Lease l = pager.acquire_pages({0, 4}); }

  // The next acquire reads again, and fails again while the file is short.
  EXPECT_THROW((void)pager.acquire_pages({page, 1}), io::ReadError);
  EXPECT_EQ(pager.stats().faults, 6u);  // 1 + the four pages above + this one
  rewrite(file, original);
  check_tensor(pager, m, t, /*whole=*/false);
}

// With the trace policy's prefetcher on, a page that fails to read is tried by the prefetcher at
// most once (it is dropped from the prediction, not retried after every access), quiesce()
// returns (nothing spins), every acquire of the page gets the named error, and once the file
// reads again the page does too.
TEST(ReadFailure, PrefetcherDoesNotRetryAFailedPage) {
  Watchdog watchdog(kWatchdogSeconds);
  OpenedModel m(runtime::make_host_backend(kPage), small_model(/*shards=*/2));
  const auto n = static_cast<PageId>(m.pages());
  ASSERT_GE(n, 8u);
  const PageId bad = n / 2;
  const runtime::FillExtent extent = m.space.layout().extents(bad).front();
  auto failure = std::make_shared<CountingFailure>();
  failure->file = extent.file;
  failure->begin = extent.file_offset;
  failure->end = extent.file_offset + extent.length;
  PagerOptions opt;
  opt.budget_bytes = 5 * kPage;
  opt.policy = runtime::PolicyKind::trace;
  opt.reader.kind = io::IoKind::pread;
  opt.reader.direct = false;
  opt.reader.fault_injector = failure;
  Pager pager(m.space, opt);

  std::vector<PageId> step;  // forward, then backward
  for (PageId p = 0; p < n; ++p) step.push_back(p);
  for (PageId p = n; p-- > 0;) step.push_back(p);
  int acquires_of_bad = 0, errors_of_bad = 0;
  auto run_pass = [&] {
    for (PageId p : step) {
      try {
        if (p == bad) ++acquires_of_bad;
        Lease l = pager.acquire_pages({p, 1});
        pager.release(std::move(l));
      } catch (const io::ReadError& e) {
        EXPECT_EQ(p, bad);
        EXPECT_EQ(std::filesystem::path(e.file()), m.space.layout().files()[extent.file]);
        ++errors_of_bad;
      }
      pager.quiesce();  // hangs while the prefetcher retries the page in a loop
    }
  };
  for (int pass = 0; pass < 4; ++pass) run_pass();  // the policy learns the period
  ASSERT_GT(pager.stats().prefetches_issued, 0u);
  const std::size_t events_before = pager.events().snapshot().size();
  acquires_of_bad = 0;
  failure->on = true;
  for (int pass = 0; pass < 3; ++pass) run_pass();

  EXPECT_EQ(errors_of_bad, acquires_of_bad);
  const auto events = pager.events().snapshot();
  ASSERT_LT(events.size(), pager.events().capacity());  // nothing was overwritten
  int prefetches_of_bad = 0;
  for (std::size_t i = events_before; i < events.size(); ++i)
    if (events[i].kind == runtime::EventKind::prefetch_issued && events[i].first_page == bad)
      ++prefetches_of_bad;
  EXPECT_LE(prefetches_of_bad, 1);
  EXPECT_LE(failure->failed.load(), acquires_of_bad + 1);

  failure->on = false;
  for (const auto& t : m.space.layout().tensors()) {
    if (t.offset <= bad * m.page_size() + extent.page_offset &&
        bad * m.page_size() + extent.page_offset < t.offset + t.nbytes)
      check_tensor(pager, m, t, /*whole=*/false);
  }
  EXPECT_TRUE(pager.is_resident(bad));
}

// A checkpoint file truncated after open: read_tensor gives the same named read error in guard
// and fault mode (fault mode used to poison the page and the visit got SIGSEGV), the page is
// left absent, not poisoned, and once the file is whole again the same read gives its bytes.
class MappedReadFailure : public ::testing::TestWithParam<runtime::ResidencyMode> {};

TEST_P(MappedReadFailure, TruncatedFileIsANamedReadErrorAndReadsAgainOnceWhole) {
  Watchdog watchdog(kWatchdogSeconds);
  TempDir dir("read-failure");
  const std::filesystem::path path = write_model(dir.path(), ModelShape{});
  runtime::MappedCheckpointOptions options;
  options.budget_bytes = std::uint64_t{4} << 20;
  options.mode = GetParam();
  options.prefetch = false;
  options.reader.kind = io::IoKind::pread;
  options.reader.direct = false;
  auto mapped = runtime::MappedCheckpoint::open(path, options);
  if (GetParam() == runtime::ResidencyMode::fault && mapped->mode() != GetParam())
    GTEST_SKIP() << mapped->fallback_reason();
  const io::TensorInfo& t = mapped->checkpoint().at("lm_head.weight");
  const std::vector<char> original = whole_file(path);
  std::filesystem::resize_file(path, t.offset + t.nbytes / 2);

  auto bytes_of = [&] {
    std::vector<std::byte> got;
    mapped->read_tensor(t.name, [&](const std::byte* data, std::uint64_t bytes) {
      got.insert(got.end(), data, data + bytes);
    });
    return got;
  };
  try {
    (void)bytes_of();
    FAIL() << "no error";
  } catch (const io::ReadError& e) {
    const std::string what = e.what();
    EXPECT_EQ(std::filesystem::path(e.file()), path) << what;
    EXPECT_NE(what.find("offset"), std::string::npos) << what;
    EXPECT_NE(what.find("changed under us"), std::string::npos) << what;
  }
  rewrite(path, original);
  EXPECT_EQ(bytes_of(), file_bytes(mapped->checkpoint(), t));
}

// Code that reads a fault-mode tensor's address directly cannot be handed an error: it gets
// SIGSEGV at the page, but only after the error naming the file was logged.
TEST(ReadFailure, FaultModeDirectReaderSeesTheErrorLoggedBeforeTheSignal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir dir("read-failure");
  const std::filesystem::path path = write_model(dir.path(), ModelShape{});
  runtime::MappedCheckpointOptions options;
  options.budget_bytes = std::uint64_t{4} << 20;
  options.mode = runtime::ResidencyMode::fault;
  options.reader.kind = io::IoKind::pread;
  options.reader.direct = false;
  auto mapped = runtime::MappedCheckpoint::open(path, options);
  if (mapped->mode() != runtime::ResidencyMode::fault) GTEST_SKIP() << mapped->fallback_reason();
  const io::TensorInfo& t = mapped->checkpoint().at("lm_head.weight");
  std::filesystem::resize_file(path, t.offset + t.nbytes / 2);
  const std::byte* last = mapped->tensor(t.name).data + t.nbytes - 1;
  EXPECT_EXIT(
      {
        ::dup2(2, 1);  // the log goes to stdout; the death test matches stderr
        [[maybe_unused]] volatile std::byte b = *last;
      },
      lema::test::died_of_segv,
      "filling page [0-9]+: .*model\\.safetensors.*changed under us");
}

INSTANTIATE_TEST_SUITE_P(Modes, MappedReadFailure,
                         ::testing::Values(runtime::ResidencyMode::guard,
                                           runtime::ResidencyMode::fault),
                         [](const auto& info) {
                           return std::string(runtime::residency_mode_name(info.param));
                         });

}  // namespace
}  // namespace lema::test
