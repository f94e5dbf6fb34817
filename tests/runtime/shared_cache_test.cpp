// The shared host cache tier: processes on one machine that open the same checkpoint read each
// page from disk once between them, a process killed mid-fill or a whole killed run leaves
// nothing the next process trusts wrongly, and the segment goes with its last user.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "runtime_fixture.hpp"
#include "shared_host_cache.hpp"
#include "test_backends.hpp"

extern char** environ;

namespace lema::test {
namespace {

using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;

constexpr std::uint64_t kPage = 2_MiB;     // the host backend's granularity
constexpr std::uint64_t kBudget = 4_MiB;    // well below the model: pages are evicted, refilled
constexpr std::uint64_t kCache = 64_MiB;    // holds every page

// About 17 MiB in 11 pages.
ModelShape shape() {
  ModelShape m;
  m.hidden = 512 * 1024 + 13;
  m.embed = 2 * 1024 * 1024 + 7;
  return m;
}

bool segment_exists(const std::string& name) {
  return std::filesystem::exists("/dev/shm" + name);
}

// A helper process (shared_cache_helper.cpp) with its stdin and stdout on pipes.
class Helper {
 public:
  Helper(const std::string& mode, const std::filesystem::path& ckpt,
         std::uint64_t cache = kCache) {
    int in[2], out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) throw std::runtime_error("pipe");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    const std::string exe = SHARED_CACHE_HELPER;
    std::vector<std::string> args = {exe,
                                     mode,
                                     ckpt.string(),
                                     std::to_string(cache),
                                     std::to_string(kPage),
                                     std::to_string(kBudget)};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, exe.c_str(), &fa, nullptr, argv.data(), environ) != 0)
      throw std::runtime_error("cannot spawn " + exe);
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    to_ = ::fdopen(in[1], "w");
    from_ = ::fdopen(out[0], "r");
  }
  ~Helper() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      wait();
    }
    if (to_ != nullptr) std::fclose(to_);
    if (from_ != nullptr) std::fclose(from_);
  }
  std::string line() {  // the next line of the protocol (log lines, "[...] ...", skipped)
    for (;;) {
      char buf[512];
      if (std::fgets(buf, sizeof buf, from_) == nullptr) return "";
      std::string s(buf);
      if (!s.empty() && s.back() == '\n') s.pop_back();
      if (s.empty() || s[0] != '[') return s;
    }
  }
  void say(const std::string& s) {
    std::fputs((s + "\n").c_str(), to_);
    std::fflush(to_);
  }
  void close_stdin() {
    std::fclose(to_);
    to_ = nullptr;
  }
  void kill9() { ::kill(pid_, SIGKILL); }
  void cont() {  // continues a helper that stopped itself, once it did
    int status = 0;
    ::waitpid(pid_, &status, WUNTRACED);
    ::kill(pid_, SIGCONT);
  }
  // line(), or "" when none came within `limit` (the test fails instead of hanging).
  std::string line_within(std::chrono::seconds limit) {
    pollfd p{::fileno(from_), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(limit.count() * 1000)) <= 0) return "";
    return line();
  }
  int wait() {  // the exit status, or 128 + signal
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
};

struct Done {
  std::uint64_t bytes_read = 0, shared_hits = 0;
  int ok = 0;
};

Done parse_done(const std::string& line) {
  std::istringstream in(line);
  std::string word;
  Done d;
  in >> word >> d.bytes_read >> d.shared_hits >> d.ok;
  EXPECT_EQ(word, "done") << line;
  return d;
}

std::string segment_of(const std::string& open_line) {
  EXPECT_EQ(open_line.rfind("open /lema-shc-", 0), 0u) << open_line;
  return open_line.substr(5);
}

// One process alone: what it reads from disk (its re-reads of evicted pages come from the
// shared cache too).
std::uint64_t one_process_bytes(const std::filesystem::path& ckpt) {
  Helper a("read", ckpt);
  segment_of(a.line());
  a.say("go");
  const Done d = parse_done(a.line());
  EXPECT_EQ(d.ok, 1);
  a.close_stdin();
  EXPECT_EQ(a.wait(), 0);
  return d.bytes_read;
}

TEST(SharedHostCache, TwoProcessesReadEachPageOnce) {
  TempDir dir("shc-two");
  const auto ckpt = write_model(dir.path(), shape());
  const std::uint64_t single = one_process_bytes(ckpt);
  ASSERT_GT(single, 0u);

  Helper a("read", ckpt), b("read", ckpt);
  const std::string name = segment_of(a.line());
  EXPECT_EQ(segment_of(b.line()), name);
  EXPECT_TRUE(segment_exists(name));
  a.say("go");
  b.say("go");
  const Done da = parse_done(a.line()), db = parse_done(b.line());
  EXPECT_EQ(da.ok, 1);
  EXPECT_EQ(db.ok, 1);
  EXPECT_LE(static_cast<double>(da.bytes_read + db.bytes_read), 1.05 * static_cast<double>(single))
      << "A read " << da.bytes_read << ", B " << db.bytes_read << ", one alone " << single;
  EXPECT_GT(da.shared_hits + db.shared_hits, 0u);
  a.close_stdin();
  b.close_stdin();
  EXPECT_EQ(a.wait(), 0);
  EXPECT_EQ(b.wait(), 0);
  EXPECT_FALSE(segment_exists(name)) << "the last process out removes the segment";
}

TEST(SharedHostCache, FillerKilledMidFillIsTakenOver) {
  TempDir dir("shc-kill");
  const auto ckpt = write_model(dir.path(), shape());
  Helper stall("stall", ckpt);
  const std::string name = segment_of(stall.line());
  ASSERT_EQ(stall.line(), "filling");
  Helper reader("read", ckpt);
  EXPECT_EQ(segment_of(reader.line()), name);
  reader.say("go");  // it waits for page 0, which the staller never publishes
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  stall.kill9();
  EXPECT_EQ(stall.wait(), 128 + SIGKILL);
  const Done d = parse_done(reader.line());
  EXPECT_EQ(d.ok, 1) << "the reader took page 0 over and read the file's bytes";
  reader.close_stdin();
  EXPECT_EQ(reader.wait(), 0);
  EXPECT_FALSE(segment_exists(name));
}

// Note [Slow fillers]: a filler stopped (SIGSTOP) between claiming page 0 and publishing it is
// alive, so nobody takes its claim over; a reader waits LEMA_SHARED_CACHE_WAIT, then reads the
// page itself. Once continued, the filler publishes its claim and reads everything through the
// shared cache: the reader's bypass left the slot whole.
TEST(SharedHostCache, StoppedFillerIsWaitedForAtMostTheBound) {
  TempDir dir("shc-stop");
  const auto ckpt = write_model(dir.path(), shape());
  ::setenv("LEMA_SHARED_CACHE_WAIT", "0.5", 1);  // the helpers inherit it
  Helper filler("stop-filling", ckpt);
  const std::string name = segment_of(filler.line());
  ASSERT_EQ(filler.line(), "filling");
  Helper reader("read", ckpt);
  EXPECT_EQ(segment_of(reader.line()), name);
  reader.say("go");
  const std::string done = reader.line_within(std::chrono::seconds(60));
  ASSERT_FALSE(done.empty()) << "the reader kept waiting for the stopped filler";
  const Done d = parse_done(done);
  EXPECT_EQ(d.ok, 1) << "the reader read page 0 itself, with the file's bytes";
  filler.cont();
  const Done f = parse_done(filler.line());
  EXPECT_EQ(f.ok, 1) << "the filler's published page 0, and every other page, are the file's";
  reader.close_stdin();
  filler.close_stdin();
  EXPECT_EQ(reader.wait(), 0);
  EXPECT_EQ(filler.wait(), 0);
  ::unsetenv("LEMA_SHARED_CACHE_WAIT");
  EXPECT_FALSE(segment_exists(name));
}

TEST(SharedHostCache, SegmentOfAKilledRunIsRecovered) {
  TempDir dir("shc-stale");
  const auto ckpt = write_model(dir.path(), shape());
  std::string name;
  {
    Helper stall("stall", ckpt), reader("read", ckpt);
    name = segment_of(stall.line());
    ASSERT_EQ(stall.line(), "filling");
    EXPECT_EQ(segment_of(reader.line()), name);
    stall.kill9();
    reader.kill9();
    EXPECT_EQ(stall.wait(), 128 + SIGKILL);
    EXPECT_EQ(reader.wait(), 128 + SIGKILL);
  }
  ASSERT_TRUE(segment_exists(name)) << "left behind by the killed run";
  Helper next("read", ckpt);
  EXPECT_EQ(segment_of(next.line()), name);
  next.say("go");
  EXPECT_EQ(parse_done(next.line()).ok, 1);
  next.close_stdin();
  EXPECT_EQ(next.wait(), 0);
  EXPECT_FALSE(segment_exists(name)) << "the dead users were purged, the last live one removed it";
}

// A process killed holding the segment's lock: the next locker repairs the metadata and keeps
// the pages that were ready.
TEST(SharedHostCache, LockOfADeadProcessIsRecovered) {
  TempDir dir("shc-locked");
  const auto ckpt = write_model(dir.path(), shape());
  Helper keeper("read", ckpt);  // keeps the segment (and its pages) alive across the kill
  const std::string name = segment_of(keeper.line());
  {
    Helper locked("die-locked", ckpt);
    EXPECT_EQ(segment_of(locked.line()), name);
    ASSERT_EQ(locked.line(), "locked");
    locked.kill9();
    EXPECT_EQ(locked.wait(), 128 + SIGKILL);
  }
  keeper.say("go");
  const Done d = parse_done(keeper.line());
  EXPECT_EQ(d.ok, 1);
  EXPECT_EQ(d.bytes_read, 0u) << "the dead process's pages survived the repair";
  EXPECT_GT(d.shared_hits, 0u);
  keeper.close_stdin();
  EXPECT_EQ(keeper.wait(), 0);
  EXPECT_FALSE(segment_exists(name));
}

// A segment under the checkpoint's name whose header is not one (another version's, damaged)
// is rebuilt, never read from.
TEST(SharedHostCache, DamagedSegmentIsRebuilt) {
  TempDir dir("shc-damaged");
  const auto ckpt = write_model(dir.path(), shape());
  std::string name;
  {
    Helper probe("stall", ckpt);
    name = segment_of(probe.line());
    probe.kill9();
    probe.wait();
  }
  {
    std::fstream f("/dev/shm" + name, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8);
    const char garbage[4] = {9, 9, 9, 9};  // the version
    f.write(garbage, sizeof garbage);
  }
  Helper next("read", ckpt);
  EXPECT_EQ(segment_of(next.line()), name);
  next.say("go");
  EXPECT_EQ(parse_done(next.line()).ok, 1);
  next.close_stdin();
  EXPECT_EQ(next.wait(), 0);
  EXPECT_FALSE(segment_exists(name));
}

TEST(SharedHostCache, ChangedFileGetsAnotherSegment) {
  TempDir dir("shc-changed");
  const auto ckpt = write_model(dir.path(), shape());
  Helper a("read", ckpt);
  const std::string first = segment_of(a.line());
  a.say("go");
  ASSERT_EQ(parse_done(a.line()).ok, 1);  // every page of the old bytes is in the segment
  {
    // Same size, same header, other tensor bytes: only the file's identity tells them apart.
    std::fstream f(ckpt, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(0, std::ios::end);
    const auto size = static_cast<std::uint64_t>(f.tellg());
    std::vector<char> tail(4096);
    f.seekg(static_cast<std::streamoff>(size - tail.size()));
    f.read(tail.data(), static_cast<std::streamsize>(tail.size()));
    for (char& c : tail) c = static_cast<char>(~c);
    f.seekp(static_cast<std::streamoff>(size - tail.size()));
    f.write(tail.data(), static_cast<std::streamsize>(tail.size()));
  }
  Helper b("read", ckpt);
  const std::string second = segment_of(b.line());
  EXPECT_NE(second, first);
  b.say("go");
  EXPECT_EQ(parse_done(b.line()).ok, 1) << "B read the new bytes, not A's cached ones";
  a.close_stdin();
  b.close_stdin();
  EXPECT_EQ(a.wait(), 0);
  EXPECT_EQ(b.wait(), 0);
  EXPECT_FALSE(segment_exists(first));
  EXPECT_FALSE(segment_exists(second));
}

// Two checkpoints of one file in one process share the segment too (threads of one process:
// the sanitizer build checks the lock discipline here).
TEST(SharedHostCache, TwoOpensInOneProcessShare) {
  TempDir dir("shc-inproc");
  const auto ckpt = write_model(dir.path(), shape());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudget;
  o.page_size = kPage;
  o.shared_host_cache_bytes = kCache;
  auto a = MappedCheckpoint::open(ckpt, o);
  auto b = MappedCheckpoint::open(ckpt, o);
  auto read_all = [&](MappedCheckpoint& m) {
    for (const io::TensorInfo& t : m.checkpoint().tensors()) {
      std::vector<std::byte> got;
      m.read_tensor(t.name, [&](const std::byte* p, std::uint64_t n) {
        got.insert(got.end(), p, p + n);
      });
      EXPECT_EQ(got, file_bytes(m.checkpoint(), t)) << t.name;
    }
  };
  std::thread ta([&] { read_all(*a); });
  std::thread tb([&] { read_all(*b); });
  ta.join();
  tb.join();
  read_all(*a);  // pages evicted under the budget come back from the segment
  const auto sa = a->stats(), sb = b->stats();
  EXPECT_EQ(sa.shared_host_cache_bytes, sb.shared_host_cache_bytes);
  EXPECT_GT(sa.shared_host_cache_bytes, 0u);
  std::uint64_t file_pages_bytes = 0;
  for (runtime::PageId p = 0; p < a->layout().page_count(); ++p)
    file_pages_bytes += a->layout().page_fill_bytes(p);
  EXPECT_EQ(sa.bytes_read + sb.bytes_read, file_pages_bytes) << "each page read once";
  const std::string name = runtime::shared_cache_name(runtime::shared_cache_key(a->layout()));
  a.reset();
  EXPECT_TRUE(segment_exists(name)) << "b still uses it";
  b.reset();
  EXPECT_FALSE(segment_exists(name));
}

// Pools without a host window (a GPU's) fill through staging or the private host cache tier;
// the shared tier sits below both.
TEST(SharedHostCache, StagedPoolsShare) {
  TempDir dir("shc-staged");
  const auto ckpt = write_model(dir.path(), shape());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudget;
  o.page_size = kPage;
  o.shared_host_cache_bytes = kCache;
  o.read_only = true;
  o.backend = std::make_shared<StagedBackend>();
  auto a = MappedCheckpoint::open(ckpt, o);
  o.backend = std::make_shared<StagedBackend>();
  o.host_cache_bytes = kBudget;  // a private tier smaller than the model, above the shared one
  auto b = MappedCheckpoint::open(ckpt, o);
  for (auto* m : {a.get(), b.get(), a.get(), b.get()})
    for (const io::TensorInfo& t : m->checkpoint().tensors()) {
      std::vector<std::byte> got;
      m->read_tensor(t.name, [&](const std::byte* p, std::uint64_t n) {
        got.insert(got.end(), p, p + n);
      });
      EXPECT_EQ(got, file_bytes(m->checkpoint(), t)) << t.name;
    }
  std::uint64_t file_pages_bytes = 0;
  for (runtime::PageId p = 0; p < a->layout().page_count(); ++p)
    file_pages_bytes += a->layout().page_fill_bytes(p);
  const auto sa = a->stats(), sb = b->stats();
  EXPECT_EQ(sa.bytes_read + sb.bytes_read, file_pages_bytes) << "each page read once";
  EXPECT_EQ(sb.bytes_read, 0u);
  EXPECT_GT(sb.shared_cache_hits, 0u);
}

// Note [Registered shared tier]: a page a copy reads in place is pinned in its slot; while the
// pin lives, no other page takes the slot (a fill of another page reads around the cache), and
// once unpinned the slot is reused as usual.
TEST(SharedHostCache, PinnedSlotIsNotReused) {
  runtime::SharedCacheKey key{};
  for (std::size_t i = 0; i < key.size(); ++i)
    key[i] = static_cast<std::uint8_t>(::getpid() >> (i % 4 * 8) ^ (i * 37));
  constexpr std::uint64_t kSmall = 4096;
  runtime::SharedHostCache cache(key, kSmall, 4, kSmall);  // one slot for four pages
  std::vector<std::byte> page(kSmall, std::byte{7}), out(kSmall);
  std::uint32_t slot = 0;
  ASSERT_EQ(cache.try_begin(0, out.data(), &slot), runtime::SharedHostCache::Outcome::fill);
  cache.publish(slot, page.data());
  std::uint32_t pinned = 0;
  const std::byte* in_place = cache.pin_ready(0, &pinned);
  ASSERT_NE(in_place, nullptr);
  EXPECT_EQ(std::memcmp(in_place, page.data(), kSmall), 0);
  EXPECT_EQ(cache.pin_ready(1, &slot), nullptr) << "page 1 is not there";
  EXPECT_EQ(cache.try_begin(1, out.data(), &slot), runtime::SharedHostCache::Outcome::bypass)
      << "the pinned slot of page 0 was given to page 1";
  EXPECT_EQ(std::memcmp(in_place, page.data(), kSmall), 0);
  cache.unpin(pinned);
  ASSERT_EQ(cache.try_begin(1, out.data(), &slot), runtime::SharedHostCache::Outcome::fill);
  cache.abandon(slot);
}

// A cache too small for one page, a size that is not one, fault mode: one line naming it.
TEST(SharedHostCache, BadSettingsAreNamed) {
  TempDir dir("shc-bad");
  const auto ckpt = write_model(dir.path(), shape());
  MappedCheckpointOptions o;
  o.budget_bytes = kBudget;
  o.page_size = kPage;
  o.shared_host_cache_bytes = 1000;
  try {
    (void)MappedCheckpoint::open(ckpt, o);
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("holds no page of 2 MiB"), std::string::npos)
        << e.what();
  }
  o.shared_host_cache_bytes = 0;
  ::setenv("LEMA_SHARED_HOST_CACHE", "lots", 1);
  try {
    (void)MappedCheckpoint::open(ckpt, o);
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("LEMA_SHARED_HOST_CACHE"), std::string::npos)
        << e.what();
  }
  ::setenv("LEMA_SHARED_HOST_CACHE", "4MiB", 1);
  {
    auto m = MappedCheckpoint::open(ckpt, o);
    EXPECT_EQ(m->stats().shared_host_cache_bytes, 4_MiB) << "the environment's size is used";
  }
  ::unsetenv("LEMA_SHARED_HOST_CACHE");
  o.shared_host_cache_bytes = 4_MiB;
  ::setenv("LEMA_SHARED_CACHE_WAIT", "forever", 1);
  try {
    (void)MappedCheckpoint::open(ckpt, o);
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("LEMA_SHARED_CACHE_WAIT='forever'"), std::string::npos)
        << e.what();
  }
  ::unsetenv("LEMA_SHARED_CACHE_WAIT");
  o.mode = runtime::ResidencyMode::fault;
  try {
    (void)MappedCheckpoint::open(ckpt, o);
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("guard mode only"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lema::test
