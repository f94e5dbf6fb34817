// The guard-mode fault fallback: reads of a weight's address outside any acquire (raw pointers,
// a write(2) from the range, several threads, a forked child) get the file's bytes under the
// budget, or a signal, never wrong bytes.
#include <gtest/gtest.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "death.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {
namespace {

using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

// About 4 MiB a layer at the host backend's 2 MiB pages: a dozen pages, some tensors
// straddling two.
ModelShape shape() {
  ModelShape m;
  m.layers = 3;
  m.hidden = 700 * 1024 + 13;
  m.embed = 3 * kMiB + 7;
  return m;
}

struct Model {
  explicit Model(std::uint64_t budget_pages, bool fallback = true,
                 std::shared_ptr<io::FaultInjector> injector = nullptr)
      : dir("guard-fallback"), path(write_model(dir.path(), shape())) {
    const io::Checkpoint ckpt = io::Checkpoint::open(path);
    for (const auto& t : ckpt.tensors()) expected.emplace(t.name, file_bytes(ckpt, t));
    MappedCheckpointOptions o;
    o.budget_bytes = budget_pages * 2 * kMiB;
    o.fault_fallback = fallback;
    o.prefetch = false;
    o.reader.fault_injector = std::move(injector);
    mapped = MappedCheckpoint::open(path, o);
  }
  const std::byte* data(const std::string& name) const { return mapped->tensor(name).data; }

  TempDir dir;
  std::filesystem::path path;
  std::map<std::string, std::vector<std::byte>> expected;
  std::unique_ptr<MappedCheckpoint> mapped;
};

bool raw_equal(const Model& m, const std::string& name) {
  const auto& want = m.expected.at(name);
  return std::memcmp(m.data(name), want.data(), want.size()) == 0;
}

// The Backend contract the fallback relies on: once given an UnmappedPages source, the host
// backend's unmap asks it for the page (and only then), and nullptr restores its own.
TEST(GuardFallback, HostUnmapPlacesTheSourcesPages) {
  struct Recorder : runtime::UnmappedPages {
    std::vector<std::pair<std::byte*, std::uint64_t>> placed;
    void place(std::byte* addr, std::uint64_t bytes) override {
      placed.emplace_back(addr, bytes);
      ASSERT_NE(::mmap(addr, bytes, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                MAP_FAILED);
    }
  };
  auto backend = runtime::make_host_backend(4096);
  runtime::Reservation r = backend->reserve(4 * 4096);
  auto pool = backend->create_pool(1, 4096);
  Recorder recorder;
  ASSERT_TRUE(backend->set_unmapped_pages(&recorder));
  backend->map(*pool, 0, r.base() + 4096, runtime::Access::read);
  backend->unmap(r.base() + 4096, 4096);
  ASSERT_EQ(recorder.placed.size(), 1u);
  EXPECT_EQ(recorder.placed[0].first, r.base() + 4096);
  EXPECT_EQ(recorder.placed[0].second, 4096u);
  ASSERT_TRUE(backend->set_unmapped_pages(nullptr));
  backend->map(*pool, 0, r.base(), runtime::Access::read);
  backend->unmap(r.base(), 4096);
  EXPECT_EQ(recorder.placed.size(), 1u);
}

TEST(GuardFallback, RawReadsOfEveryTensorEqualTheFileUnderTwoPages) {
  Model m(2);
  ASSERT_EQ(m.mapped->mode(), runtime::ResidencyMode::guard);
  ASSERT_EQ(m.mapped->fault_fallback_reason(), "");
  ASSERT_GT(m.mapped->layout().page_count(), 6u);
  for (int pass = 0; pass < 2; ++pass)
    for (const auto& [name, bytes] : m.expected) EXPECT_TRUE(raw_equal(m, name)) << name;
  const runtime::PagerStats s = m.mapped->stats();
  EXPECT_GE(s.fallback_faults, m.mapped->layout().page_count());
  EXPECT_GE(s.faults, m.mapped->layout().page_count());
  EXPECT_GT(s.evictions, 0u);
  EXPECT_LE(s.peak_resident_bytes, 2 * 2 * kMiB);
}

TEST(GuardFallback, RawReadsMixWithLeasesOfTheGuard) {
  Model m(2);
  runtime::Pager& pager = *m.mapped->pager();
  // One page pinned by the guard; raw reads of everything else share the other one.
  const std::string first = m.mapped->layout().tensors().front().name;
  runtime::Lease lease = pager.acquire(m.data(first), 1);
  for (const auto& [name, bytes] : m.expected) EXPECT_TRUE(raw_equal(m, name)) << name;
  EXPECT_TRUE(pager.is_resident(lease.pages().front()));
  pager.release(std::move(lease));
}

TEST(GuardFallback, WriteFromTheRangeToAFileGetsTheBytes) {
  // write(2) reads the range in the kernel: its fault is served like a user-mode one (EFAULT
  // without the fallback, or with a user-mode-only userfaultfd).
  Model m(2);
  const auto out = m.dir.path() / "copy.bin";
  for (const auto& [name, want] : m.expected) {
    const int fd = ::open(out.c_str(), O_CREAT | O_TRUNC | O_RDWR, 0600);
    ASSERT_GE(fd, 0);
    std::size_t done = 0;
    while (done < want.size()) {
      const ssize_t n = ::write(fd, m.data(name) + done, want.size() - done);
      ASSERT_GT(n, 0) << name << ": " << std::strerror(errno);
      done += static_cast<std::size_t>(n);
    }
    std::vector<std::byte> back(want.size());
    ASSERT_EQ(::pread(fd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
    ::close(fd);
    EXPECT_TRUE(back == want) << name;
  }
}

TEST(GuardFallback, ConcurrentRawReadersAllSeeTheFile) {
  Model m(3);
  std::vector<std::string> names;
  for (const auto& [name, bytes] : m.expected) names.push_back(name);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::string> order = names;
      std::rotate(order.begin(), order.begin() + (t * 3) % order.size(), order.end());
      if (t % 2 == 1) std::reverse(order.begin(), order.end());
      for (int pass = 0; pass < 3; ++pass)
        for (const auto& name : order) wrong += raw_equal(m, name) ? 0 : 1;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_LE(m.mapped->stats().peak_resident_bytes, 3 * 2 * kMiB);
}

// The child does not inherit the userfaultfd registration: it must get a signal (or the right
// bytes), never the zeros of unregistered anonymous memory nor a reused chunk's bytes.
TEST(GuardFallback, AForkedChildNeverReadsWrongBytes) {
  Model m(2);
  const auto& tensors = m.mapped->layout().tensors();
  const std::string resident = tensors.front().name;
  const std::string evicted = tensors.back().name;
  ASSERT_TRUE(raw_equal(m, resident));  // leaves its page mapped in the parent
  for (const std::string& name : {resident, evicted}) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    constexpr int kWrongBytes = 42;  // apart from a sanitizer's exit status after SIGSEGV
    if (child == 0) _exit(raw_equal(m, name) ? 0 : kWrongBytes);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == kWrongBytes)
        << name << ": the child read wrong bytes";
    EXPECT_TRUE(died_of_segv(status) || WIFSIGNALED(status) ||
                (WIFEXITED(status) && WEXITSTATUS(status) == 0))
        << name << ": status " << status;
  }
  EXPECT_TRUE(raw_equal(m, evicted));  // the parent is unaffected
}

TEST(GuardFallbackDeathTest, WithoutTheFallbackARawReadKillsTheProcess) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Model m(2, /*fallback=*/false);
  EXPECT_NE(m.mapped->fault_fallback_reason(), "");
  const std::string name = m.mapped->layout().tensors().back().name;
  EXPECT_DEATH((void)raw_equal(m, name), "");
}

struct FailEverything : io::FaultInjector {
  std::optional<long> inject(std::uint32_t, std::uint64_t, std::uint64_t) override {
    return -EIO;
  }
};

TEST(GuardFallbackDeathTest, AnUnservableReadNamesTheTensorAndGetsSigsegv) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Model m(2, true, std::make_shared<FailEverything>());
  const std::string name = m.mapped->layout().tensors().back().name;
  // The library logs through spdlog's default logger (stdout); death tests match stderr.
  EXPECT_EXIT(
      {
        spdlog::set_default_logger(spdlog::stderr_logger_mt("stderr"));
        (void)raw_equal(m, name);
      },
      lema::test::died_of_segv,
              name + ".*could not be served");
}

}  // namespace
}  // namespace lema::test
