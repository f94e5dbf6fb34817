// The profiler: publishing into shared memory and attaching, the file format, and a report of a
// real Pager's run whose numbers must equal the Pager's own counters.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/crc.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "lema/base/units.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/profile.hpp"
#include "profile_reader.hpp"
#include "lema/runtime/profile_file.hpp"
#include "pager_fixture.hpp"
#include "prof_report.hpp"
#include "profile_shm.hpp"

namespace lema {
namespace {

using runtime::Event;
using runtime::EventKind;
using runtime::ProfileAttachment;
using runtime::ProfileEvent;
using runtime::ProfilePublisher;
using runtime::ProfileSegment;
using runtime::ProfileSourceInfo;
using runtime::Recording;

std::string unique_name(const std::string& tag) {
  static int n = 0;
  return "lema-prof-test-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

ProfileSourceInfo sample_info() {
  ProfileSourceInfo info;
  info.kind = "pager";
  info.policy = "trace";
  info.io_path = "pread";
  info.page_size = 64_KiB;
  info.budget_bytes = 256_KiB;
  info.pool_pages = 4;
  info.page_count = 10;
  info.tensors = {{"model.embed_tokens.weight", 0, 2, -1},
                  {"model.layers.0.self_attn.q_proj.weight", 2, 3, 0},
                  {"model.layers.1.mlp.down_proj.weight", 5, 4, 1},
                  {"lm_head.weight", 9, 1, -1}};
  return info;
}

ProfileSegment::Options options(const std::string& name, std::size_t capacity) {
  ProfileSegment::Options o;
  o.name = name;
  o.event_capacity = capacity;
  return o;
}

TEST(ProfileSegment, IsReadableByTheOwnerOnly) {
  auto seg = ProfileSegment::create(options(unique_name("mode"), 64));
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm/" + seg->name()).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const std::string name = seg->name();
  seg.reset();
  EXPECT_FALSE(ProfileAttachment::try_attach(name).has_value()) << "removed on destruction";
}

TEST(ProfileSegment, PublishAttachRoundTrip) {
  auto seg = ProfileSegment::create(options(unique_name("rt"), 256));
  auto pub = ProfilePublisher::open(seg, sample_info());
  ASSERT_NE(pub, nullptr);
  runtime::PagerCounters counters;
  counters.add(counters.faults, 7);
  counters.add(counters.hits, 11);
  counters.add(counters.bytes_read, 7 * 64_KiB);
  counters.add(counters.evictions, 3);
  counters.add(counters.stall_ns, 12345);
  counters.page_mapped();
  counters.page_mapped();
  counters.page_unmapped();
  for (std::uint32_t i = 0; i < 100; ++i)
    pub->publish(Event{1000 + i, static_cast<EventKind>(i % 6), i % 10, 1, i * 3, i});
  pub->update(counters, 64_KiB);

  ProfileAttachment a = ProfileAttachment::attach(seg->name());
  EXPECT_EQ(a.pid(), static_cast<std::uint64_t>(::getpid()));
  const auto sources = a.sources();
  ASSERT_EQ(sources.size(), 1u);
  const ProfileSourceInfo& s = sources[0];
  const ProfileSourceInfo want = sample_info();
  EXPECT_EQ(s.kind, want.kind);
  EXPECT_EQ(s.policy, want.policy);
  EXPECT_EQ(s.io_path, want.io_path);
  EXPECT_EQ(s.page_size, want.page_size);
  EXPECT_EQ(s.budget_bytes, want.budget_bytes);
  EXPECT_EQ(s.pool_pages, want.pool_pages);
  EXPECT_EQ(s.page_count, want.page_count);
  EXPECT_EQ(s.close_ns, 0u);
  ASSERT_EQ(s.tensors.size(), want.tensors.size());
  for (std::size_t i = 0; i < want.tensors.size(); ++i) {
    EXPECT_EQ(s.tensors[i].name, want.tensors[i].name);
    EXPECT_EQ(s.tensors[i].first_page, want.tensors[i].first_page);
    EXPECT_EQ(s.tensors[i].page_count, want.tensors[i].page_count);
    EXPECT_EQ(s.tensors[i].layer, want.tensors[i].layer);
  }
  const runtime::PagerStats expect = counters.snapshot(64_KiB, 256_KiB, "pread");
  EXPECT_EQ(s.counters.faults, expect.faults);
  EXPECT_EQ(s.counters.hits, expect.hits);
  EXPECT_EQ(s.counters.bytes_read, expect.bytes_read);
  EXPECT_EQ(s.counters.evictions, expect.evictions);
  EXPECT_EQ(s.counters.stall_ns, expect.stall_ns);
  EXPECT_EQ(s.counters.resident_bytes, expect.resident_bytes);
  EXPECT_EQ(s.counters.peak_resident_bytes, 2 * 64_KiB);

  std::vector<ProfileEvent> events;
  EXPECT_EQ(a.drain(events), 100u);
  ASSERT_EQ(events.size(), 100u);
  for (std::uint32_t i = 0; i < 100; ++i) {
    EXPECT_EQ(events[i].time_ns, 1000 + i);
    EXPECT_EQ(events[i].kind, static_cast<EventKind>(i % 6));
    EXPECT_EQ(events[i].first_page, i % 10);
    EXPECT_EQ(events[i].bytes, i * 3);
    EXPECT_EQ(events[i].duration_ns, i);
    EXPECT_EQ(events[i].source, 0);
  }
  EXPECT_EQ(a.dropped(), 0u);
  EXPECT_EQ(a.drain(events), 0u) << "a drain returns only new events";
  pub.reset();
  EXPECT_NE(a.sources()[0].close_ns, 0u) << "closed on destruction";
}

TEST(ProfileSegment, SlowReaderLosesTheOldestAndCountsThem) {
  auto seg = ProfileSegment::create(options(unique_name("slow"), 64));
  auto pub = ProfilePublisher::open(seg, sample_info());
  ProfileAttachment a = ProfileAttachment::attach(seg->name());
  for (std::uint32_t i = 0; i < 1000; ++i) pub->publish(Event{i, EventKind::fault, i, 1, 0, 0});
  std::vector<ProfileEvent> events;
  a.drain(events);
  ASSERT_EQ(events.size(), 64u);
  EXPECT_EQ(events.front().first_page, 936u);
  EXPECT_EQ(events.back().first_page, 999u);
  EXPECT_EQ(a.dropped(), 936u);
  EXPECT_EQ(a.written(), 1000u);
  for (std::uint32_t i = 0; i < 10; ++i) pub->publish(Event{i, EventKind::hit, i, 1, 0, 0});
  events.clear();
  a.drain(events);
  EXPECT_EQ(events.size(), 10u);
  EXPECT_EQ(a.dropped(), 936u);
}

// Writers on several threads against a reader draining concurrently: every event written is
// either read whole or counted as dropped, and the writers finish whatever the reader does.
TEST(ProfileSegment, WritersNeverWaitForTheReader) {
  auto seg = ProfileSegment::create(options(unique_name("mt"), 256));
  auto pub = ProfilePublisher::open(seg, sample_info());
  ProfileAttachment a = ProfileAttachment::attach(seg->name());
  constexpr std::uint32_t kThreads = 4, kPerThread = 20000;
  std::atomic<bool> done{false};
  std::vector<ProfileEvent> events;
  std::thread reader([&] {
    while (!done.load()) {
      a.drain(events);
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> writers;
  for (std::uint32_t t = 0; t < kThreads; ++t)
    writers.emplace_back([&, t] {
      for (std::uint32_t i = 0; i < kPerThread; ++i) {
        const std::uint32_t page = t * kPerThread + i;
        pub->publish(Event{page, EventKind::fault, page, 1, std::uint64_t{page} * 3, page + 1});
      }
    });
  for (auto& w : writers) w.join();
  done = true;
  reader.join();
  a.drain(events, true);
  EXPECT_EQ(a.written(), kThreads * kPerThread);
  EXPECT_EQ(events.size() + a.dropped(), kThreads * kPerThread);
  for (const ProfileEvent& e : events) {  // never torn
    ASSERT_EQ(e.bytes, std::uint64_t{e.first_page} * 3);
    ASSERT_EQ(e.time_ns, e.first_page);
    ASSERT_EQ(e.duration_ns, e.first_page + 1u);
  }
}

TEST(ProfileSegment, AttachRefusesAnAbsentOrForeignSegment) {
  try {
    ProfileAttachment::attach("lema-prof-test-absent-" + std::to_string(::getpid()));
    FAIL() << "attached to nothing";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no profile segment"), std::string::npos) << e.what();
  }
  namespace bip = boost::interprocess;
  const std::string name = unique_name("foreign");
  {
    bip::shared_memory_object shm(bip::create_only, name.c_str(), bip::read_write);
    shm.truncate(8192);
  }
  EXPECT_THROW(ProfileAttachment::attach(name), Error);
  bip::shared_memory_object::remove(name.c_str());
}

// A recorder finds segments by listing /dev/shm while the program creates them: whatever name it
// sees must already hold a whole, readable segment.
TEST(ProfileSegment, IsNeverVisibleHalfMade) {
  const std::string prefix = "lema-prof-test-race-" + std::to_string(::getpid()) + "-";
  std::atomic<bool> done{false};
  std::thread creator([&] {
    for (int i = 0; i < 300; ++i) ProfileSegment::create(options(prefix + std::to_string(i), 1024));
    done = true;
  });
  int attached = 0;
  std::vector<std::string> refused;
  while (!done.load()) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(prefix, 0) != 0) continue;
      try {
        if (ProfileAttachment::try_attach(name)) ++attached;
      } catch (const Error& e) {
        refused.push_back(e.what());
      }
    }
  }
  creator.join();
  EXPECT_TRUE(refused.empty()) << refused.size()
                               << " half-made segments seen, first: " << refused.front();
  RecordProperty("attached", attached);
}

// ---- dead owners ----

bool shm_exists(const std::string& name) {
  return std::filesystem::exists("/dev/shm/" + name);
}

/// A child that creates its profile segment ("lema-prof-<its pid>") and then waits to be killed.
pid_t child_with_segment() {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(ready[0]);
    auto seg = ProfileSegment::create(options(ProfileSegment::name_for(::getpid()), 64));
    const char ok = 1;
    if (::write(ready[1], &ok, 1) != 1) ::_exit(1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  const bool made = ::read(ready[0], &ok, 1) == 1;
  ::close(ready[0]);
  return made ? pid : -1;
}

void kill_and_reap(pid_t pid) {
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
}

/// The header of segment `name`, mapped read-write (the test owns it), for forging fields.
struct MappedHeader {
  explicit MappedHeader(const std::string& name) {
    const int fd = ::shm_open(("/" + name).c_str(), O_RDWR, 0);
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0) throw std::runtime_error("cannot open " + name);
    size = static_cast<std::size_t>(st.st_size);
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) throw std::runtime_error("cannot map " + name);
    header = static_cast<runtime::profile_shm::Header*>(p);
  }
  ~MappedHeader() { ::munmap(header, size); }
  runtime::profile_shm::Header* header;
  std::size_t size = 0;
};

// A run killed by SIGKILL cannot remove its segment: the next scan removes it, and only it.
TEST(ProfileOwners, AKilledOwnersSegmentIsRemovedALiveOneKept) {
  const pid_t dead = child_with_segment();
  const pid_t live = child_with_segment();
  ASSERT_GT(dead, 0);
  ASSERT_GT(live, 0);
  const std::string dead_name = ProfileSegment::name_for(dead);
  const std::string live_name = ProfileSegment::name_for(live);
  kill_and_reap(dead);
  ASSERT_TRUE(shm_exists(dead_name)) << "SIGKILL left no segment to clean up";
  {
    auto a = ProfileAttachment::try_attach(dead_name);
    ASSERT_TRUE(a);
    EXPECT_FALSE(a->owner_running());
    auto b = ProfileAttachment::try_attach(live_name);
    ASSERT_TRUE(b);
    EXPECT_TRUE(b->owner_running());
  }
  const auto removed = ProfileSegment::remove_orphans();
  EXPECT_FALSE(shm_exists(dead_name));
  EXPECT_NE(std::find(removed.begin(), removed.end(), dead_name), removed.end());
  EXPECT_TRUE(shm_exists(live_name)) << "a running owner's segment was removed";
  kill_and_reap(live);
  ProfileSegment::remove_orphans();
  EXPECT_FALSE(shm_exists(live_name));
}

// A pid is reused: a segment whose recorded start time is not the running process's is a dead
// owner's, though kill(pid, 0) would answer.
TEST(ProfileOwners, AnotherStartTimeUnderTheSamePidIsADeadOwner) {
  const pid_t live = child_with_segment();
  ASSERT_GT(live, 0);
  const std::string name = ProfileSegment::name_for(live);
  {
    MappedHeader m(name);
    ASSERT_NE(m.header->start_ticks, 0u) << "the owner's start time was not recorded";
    m.header->start_ticks += 1;
  }
  EXPECT_FALSE(ProfileAttachment::attach(name).owner_running());
  ProfileSegment::remove_orphans();
  EXPECT_FALSE(shm_exists(name));
  kill_and_reap(live);
}

// A header whose arena size is near 2^64 wraps the computed layout back to consistent-looking
// offsets; the tensor tables would then be read past the mapping. It must be refused at attach.
TEST(ProfileSegment, AForgedArenaSizeIsRefused) {
  const std::string name = unique_name("arena");
  auto seg = ProfileSegment::create(options(name, 64));
  ASSERT_NE(ProfilePublisher::open(seg, sample_info()), nullptr);  // a tensor table in the arena
  {
    MappedHeader m(name);
    auto& h = *m.header;
    h.arena_bytes = ~std::uint64_t{0} - 62;  // rounds up to 64 by wrapping to 0
    const auto g = runtime::profile_shm::geometry(h.max_sources, h.arena_bytes, h.event_capacity);
    h.events_offset = g.events_offset;
    h.total_bytes = g.total_bytes;
  }
  try {
    ProfileAttachment::attach(name).sources();
    FAIL() << "a forged arena size was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("arena"), std::string::npos) << e.what();
  }
}

// ---- the file ----

Recording sample_recording() {
  Recording rec;
  rec.pid = 4242;
  rec.exit_code = 3;
  rec.command = "lema verify model --budget 2MiB";
  rec.start_ns = 1'000'000;
  rec.end_ns = 9'000'000;
  rec.dropped = 5;
  rec.sources = {sample_info(), sample_info()};
  rec.sources[1].kind = "fault";
  rec.sources[1].tensors.pop_back();
  rec.sources[0].counters.faults = 6;
  rec.sources[0].counters.hits = 4;
  rec.sources[0].counters.bytes_read = 6 * 64_KiB;
  rec.sources[0].counters.evictions = 2;
  rec.sources[0].counters.stall_ns = 600'000;
  rec.sources[0].counters.peak_resident_bytes = 4 * 64_KiB;
  rec.sources[0].close_ns = 8'000'000;
  rec.sources[0].uvm_counters = "on";
  rec.sources[0].counters.gpu_faults = 17;
  rec.sources[0].counters.cpu_faults = 2;
  rec.sources[0].counters.migrated_to_device_bytes = 3 * 64_KiB;
  rec.sources[0].counters.migrated_to_host_bytes = 64_KiB;
  rec.sources[1].uvm_counters = "cannot load CUPTI 'libcupti.so.13'";
  const EventKind kinds[] = {EventKind::fault,         EventKind::hit,   EventKind::prefetch_issued,
                             EventKind::prefetch_done, EventKind::evict, EventKind::stall};
  for (std::uint32_t i = 0; i < 60; ++i)
    rec.events.push_back(ProfileEvent{1'000'000 + i * 100'000, 50'000 + i, 64_KiB, i % 10, 1,
                                      kinds[i % 6], static_cast<std::uint16_t>(i % 2)});
  return rec;
}

void expect_equal(const Recording& a, const Recording& b) {
  EXPECT_EQ(a.pid, b.pid);
  EXPECT_EQ(a.exit_code, b.exit_code);
  EXPECT_EQ(a.command, b.command);
  EXPECT_EQ(a.start_ns, b.start_ns);
  EXPECT_EQ(a.end_ns, b.end_ns);
  EXPECT_EQ(a.dropped, b.dropped);
  ASSERT_EQ(a.sources.size(), b.sources.size());
  for (std::size_t i = 0; i < a.sources.size(); ++i) {
    const auto &x = a.sources[i], &y = b.sources[i];
    EXPECT_EQ(x.kind, y.kind);
    EXPECT_EQ(x.policy, y.policy);
    EXPECT_EQ(x.io_path, y.io_path);
    EXPECT_EQ(x.page_size, y.page_size);
    EXPECT_EQ(x.budget_bytes, y.budget_bytes);
    EXPECT_EQ(x.pool_pages, y.pool_pages);
    EXPECT_EQ(x.page_count, y.page_count);
    EXPECT_EQ(x.close_ns, y.close_ns);
    EXPECT_EQ(x.counters.faults, y.counters.faults);
    EXPECT_EQ(x.counters.hits, y.counters.hits);
    EXPECT_EQ(x.counters.bytes_read, y.counters.bytes_read);
    EXPECT_EQ(x.counters.evictions, y.counters.evictions);
    EXPECT_EQ(x.counters.stall_ns, y.counters.stall_ns);
    EXPECT_EQ(x.counters.peak_resident_bytes, y.counters.peak_resident_bytes);
    EXPECT_EQ(x.uvm_counters, y.uvm_counters);
    EXPECT_EQ(x.counters.gpu_faults, y.counters.gpu_faults);
    EXPECT_EQ(x.counters.cpu_faults, y.counters.cpu_faults);
    EXPECT_EQ(x.counters.migrated_to_device_bytes, y.counters.migrated_to_device_bytes);
    EXPECT_EQ(x.counters.migrated_to_host_bytes, y.counters.migrated_to_host_bytes);
    ASSERT_EQ(x.tensors.size(), y.tensors.size());
    for (std::size_t t = 0; t < x.tensors.size(); ++t) {
      EXPECT_EQ(x.tensors[t].name, y.tensors[t].name);
      EXPECT_EQ(x.tensors[t].first_page, y.tensors[t].first_page);
      EXPECT_EQ(x.tensors[t].page_count, y.tensors[t].page_count);
      EXPECT_EQ(x.tensors[t].layer, y.tensors[t].layer);
    }
  }
  ASSERT_EQ(a.events.size(), b.events.size());
  for (std::size_t i = 0; i < a.events.size(); ++i) {
    const auto &x = a.events[i], &y = b.events[i];
    EXPECT_EQ(x.time_ns, y.time_ns);
    EXPECT_EQ(x.duration_ns, y.duration_ns);
    EXPECT_EQ(x.bytes, y.bytes);
    EXPECT_EQ(x.first_page, y.first_page);
    EXPECT_EQ(x.page_count, y.page_count);
    EXPECT_EQ(x.kind, y.kind);
    EXPECT_EQ(x.source, y.source);
  }
}

std::string read_all(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
void write_all(const std::filesystem::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << s;
}

TEST(ProfileFile, RoundTrip) {
  test::TempDir dir("prof");
  const auto path = dir.path() / "run.lprof";
  const Recording rec = sample_recording();
  runtime::save_recording(rec, path);
  expect_equal(runtime::load_recording(path), rec);
}

void expect_file_error(const std::filesystem::path& path, const std::string& what) {
  try {
    runtime::load_recording(path);
    FAIL() << "loaded " << path;
  } catch (const runtime::ProfileFileError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(path.string(), 0), 0u) << "names the file: " << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  }
}

TEST(ProfileFile, BadFilesAreRefusedNamingTheFile) {
  test::TempDir dir("prof");
  const auto good = dir.path() / "good.lprof";
  runtime::save_recording(sample_recording(), good);
  const std::string bytes = read_all(good);

  expect_file_error(dir.path() / "missing.lprof", "cannot open");
  const auto cut = dir.path() / "cut.lprof";
  write_all(cut, bytes.substr(0, bytes.size() - 7));
  expect_file_error(cut, "truncated");
  write_all(cut, bytes.substr(0, 20));
  expect_file_error(cut, "truncated");
  const auto foreign = dir.path() / "foreign.lprof";
  write_all(foreign, std::string("{\"traceEvents\": []}") + std::string(100, ' '));
  expect_file_error(foreign, "not a lema profile");
  const auto damaged = dir.path() / "damaged.lprof";
  std::string flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x5a;
  write_all(damaged, flipped);
  expect_file_error(damaged, "damaged");
  const auto other = dir.path() / "other.lprof";
  std::string v3 = bytes;
  v3[8] = 3;
  write_all(other, v3);
  expect_file_error(other, "version 3");
  // Version 1 had no unified-memory counters: refused as older, not as damaged.
  std::string v1 = bytes;
  v1[8] = 1;
  write_all(other, v1);
  expect_file_error(other, "older lema");
}

// Writes `value` over the bytes at `at` of a recorded file and, for a body field, fixes the
// checksum, so that only the forged count is wrong.
template <typename T>
std::string forge(std::string bytes, std::size_t at, T value) {
  std::memcpy(bytes.data() + at, &value, sizeof(T));
  if (at >= 64) {
    boost::crc_32_type crc;
    crc.process_bytes(bytes.data() + 64, bytes.size() - 64);
    const std::uint32_t sum = crc.checksum();
    std::memcpy(bytes.data() + 24, &sum, 4);
  }
  return bytes;
}

// Every count a profile holds is checked against the bytes left before anything is sized by it:
// a forged one is one named error, never std::bad_alloc or gigabytes allocated.
TEST(ProfileFile, ForgedCountsAreRefusedBeforeAllocating) {
  test::TempDir dir("prof");
  const auto good = dir.path() / "good.lprof";
  const Recording rec = sample_recording();
  runtime::save_recording(rec, good);
  const std::string bytes = read_all(good);
  // Where the fields are (see profile_file.hpp): the header's counts, then the body.
  const std::size_t kSources = 28, kEvents = 32, kCommand = 64 + 12;
  const std::size_t source0 = kCommand + 4 + rec.command.size();
  const std::size_t kind0 = source0 + 8;
  const std::size_t page_count0 = kind0 + 4 * 4 + 5 + 5 + 5 + 2 + 3 * 8;
  const std::size_t tensors0 = page_count0 + 8 + 2 * 8 + 14 * 8;
  const std::size_t name0 = tensors0 + 4 + 12;
  ASSERT_EQ(bytes.substr(kind0 + 4, 5), "pager");
  ASSERT_EQ(bytes.substr(name0 + 4, 25), "model.embed_tokens.weight");

  const auto bad = dir.path() / "forged.lprof";
  auto expect = [&](const std::string& forged, const std::string& what) {
    write_all(bad, forged);
    try {
      expect_file_error(bad, what);
    } catch (const std::bad_alloc&) {
      ADD_FAILURE() << what << ": std::bad_alloc";
    } catch (const std::length_error& e) {
      ADD_FAILURE() << what << ": " << e.what();
    }
  };
  expect(forge<std::uint64_t>(bytes, kEvents, 4'000'000'000), "event count 4000000000 needs");
  expect(forge<std::uint64_t>(bytes, kEvents, 4'000'000'000), "the file is corrupt or truncated");
  // 40 × this count wraps around to the bytes the 60 events really take.
  expect(forge<std::uint64_t>(bytes, kEvents, 60 + (std::uint64_t{1} << 61)), "event count");
  expect(forge<std::uint32_t>(bytes, kSources, 4'000'000'000), "source count 4000000000 needs");
  expect(forge<std::uint32_t>(bytes, kSources, 10'000'000), "source count 10000000 needs");
  expect(forge<std::uint32_t>(bytes, kCommand, 0xffffffff), "command length 4294967295 needs");
  expect(forge<std::uint32_t>(bytes, kind0, 1'000'000), "source 0 kind length 1000000 needs");
  expect(forge<std::uint32_t>(bytes, tensors0, 0xffffffff), "source 0 tensor count");
  expect(forge<std::uint32_t>(bytes, name0, 0x7fffffff), "source 0 tensor 0 name length");
  expect(forge<std::uint64_t>(bytes, page_count0, std::uint64_t{1} << 40), "source 0 page count");
  // A tensor reaching past its source's pages, or before the previous one's.
  expect(forge<std::uint32_t>(bytes, name0 - 8, 4'000'000'000), "source 0 tensor 0 pages");
  expect(forge<std::uint32_t>(bytes, name0 - 12, 7), "source 0 tensor 1 pages");
}

// The driver's events over unified memory and its counters travel like the pager's: published
// into the segment, drained, saved, loaded, and summarized per layer, in the text, the JSON and
// the Chrome trace.
TEST(ProfileFile, UnifiedMemoryEventsSurviveSegmentFileAndReport) {
  auto seg = ProfileSegment::create(options(unique_name("uvm"), 256));
  ProfileSourceInfo info = sample_info();
  info.uvm_counters = "on";
  auto pub = ProfilePublisher::open(seg, info);
  ASSERT_NE(pub, nullptr);
  runtime::PagerCounters counters;
  counters.add(counters.gpu_faults, 5);
  counters.add(counters.cpu_faults, 1);
  counters.add(counters.migrated_to_device_bytes, 3 * 64_KiB);
  counters.add(counters.migrated_to_host_bytes, 4096);
  // Pages 2-4 are layer 0's q_proj, 5-8 layer 1's down_proj (sample_info).
  pub->publish(Event{2000, EventKind::gpu_fault, 3, 1, 2, 700});
  pub->publish(Event{2100, EventKind::gpu_fault, 6, 1, 3, 900});
  pub->publish(Event{2200, EventKind::migrate_to_device, 2, 3, 3 * 64_KiB, 5000});
  pub->publish(Event{2300, EventKind::migrate_to_host, 7, 1, 4096, 800});
  pub->update(counters, 64_KiB);

  ProfileAttachment a = ProfileAttachment::attach(seg->name());
  Recording rec;
  rec.pid = static_cast<std::uint64_t>(::getpid());
  rec.command = "uvm";
  rec.sources = a.sources();
  a.drain(rec.events, true);
  ASSERT_EQ(rec.events.size(), 4u);
  test::TempDir dir("prof");
  runtime::save_recording(rec, dir.path() / "uvm.lprof");
  const Recording loaded = runtime::load_recording(dir.path() / "uvm.lprof");
  expect_equal(loaded, rec);
  ASSERT_EQ(loaded.sources.size(), 1u);
  EXPECT_EQ(loaded.sources[0].uvm_counters, "on");
  EXPECT_EQ(loaded.sources[0].counters.gpu_faults, 5u);
  EXPECT_EQ(loaded.sources[0].counters.migrated_to_host_bytes, 4096u);
  EXPECT_EQ(loaded.events[0].kind, EventKind::gpu_fault);
  EXPECT_EQ(loaded.events[2].kind, EventKind::migrate_to_device);
  EXPECT_EQ(loaded.events[2].page_count, 3u);
  EXPECT_EQ(loaded.events[3].kind, EventKind::migrate_to_host);

  const tools::ProfileSummary s = tools::summarize(loaded, 10);
  EXPECT_TRUE(s.unified_memory());
  EXPECT_EQ(s.counters.gpu_faults, 5u);
  EXPECT_EQ(s.counters.cpu_faults, 1u);
  EXPECT_EQ(s.counters.migrated_to_device_bytes, 3 * 64_KiB);
  std::map<std::string, std::uint64_t> by_layer;
  for (const auto& row : s.layers) by_layer[row.name] = row.gpu_faults;
  EXPECT_EQ(by_layer, (std::map<std::string, std::uint64_t>{{"layer 0", 2}, {"layer 1", 3}}));
  const std::string text = tools::format_summary(s);
  for (const char* want : {"uvm counters", "GPU page faults", "5 (CPU page faults 1)",
                           "192 KiB to the device", "GPU faults"})
    EXPECT_NE(text.find(want), std::string::npos) << want << " in\n" << text;
  const auto j = tools::summary_json(s);
  EXPECT_EQ(j["gpu_faults"].get<std::uint64_t>(), 5u);
  EXPECT_EQ(j["migrated_to_host_bytes"].get<std::uint64_t>(), 4096u);
  EXPECT_EQ(j["uvm_counters"].get<std::string>(), "on");
  std::ostringstream out;
  tools::write_chrome_trace(loaded, out);
  const auto trace = nlohmann::json::parse(out.str());
  std::map<std::string, int> names;
  for (const auto& e : trace["traceEvents"])
    if (e["ph"] == "X") ++names[e["name"].get<std::string>()];
  EXPECT_EQ(names["GPU fault"], 2);
  EXPECT_EQ(names["to device"], 1);
  EXPECT_EQ(names["to host"], 1);
  // A host pager's report stays as it was: no unified-memory lines.
  Recording host = sample_recording();
  for (auto& src : host.sources) src.uvm_counters.clear();
  EXPECT_EQ(tools::format_summary(tools::summarize(host, 10)).find("GPU"), std::string::npos);
}

// ---- renderings ----

TEST(ProfileReport, ChromeTraceHasTheRequiredKeys) {
  std::ostringstream out;
  tools::write_chrome_trace(sample_recording(), out);
  const auto j = nlohmann::json::parse(out.str());
  ASSERT_TRUE(j.contains("traceEvents"));
  std::map<std::string, int> phases;
  for (const auto& e : j["traceEvents"]) {
    for (const char* key : {"ph", "ts", "pid", "tid", "name"})
      ASSERT_TRUE(e.contains(key)) << key << " missing in " << e.dump();
    const std::string ph = e["ph"];
    ++phases[ph];
    if (ph == "X") {
      ASSERT_TRUE(e.contains("dur"));
      EXPECT_GE(e["dur"].get<double>(), 0.0);
      EXPECT_TRUE(e["args"].contains("page"));
    }
  }
  EXPECT_EQ(phases["X"], 30);  // 10 faults, 10 prefetches done, 10 stalls
  EXPECT_EQ(phases["i"], 10);  // evictions
  EXPECT_GT(phases["M"], 0);
  // Complete events on one track never overlap (Note [Trace lanes]).
  std::map<std::pair<std::uint64_t, int>, double> track_end;
  for (const auto& e : j["traceEvents"]) {
    if (e["ph"] != "X") continue;
    auto& end = track_end[{e["pid"].get<std::uint64_t>(), e["tid"].get<int>()}];
    EXPECT_GE(e["ts"].get<double>(), end);
    end = e["ts"].get<double>() + e["dur"].get<double>();
  }
}

TEST(ProfileReport, SvgHasTheTimelineElements) {
  std::ostringstream out;
  tools::write_svg(sample_recording(), out);
  const std::string svg = out.str();
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("<svg xmlns=\"http://www.w3.org/2000/svg\""), std::string::npos);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  for (const char* id :
       {"id=\"faults\"", "id=\"prefetches\"", "id=\"evictions\"", "id=\"budget\"",
        "id=\"resident\"", "id=\"legend\"", "time since start (s)", "page (address"})
    EXPECT_NE(svg.find(id), std::string::npos) << id;
  auto count = [&](const std::string& s) {
    std::size_t n = 0;
    for (std::size_t at = svg.find(s); at != std::string::npos; at = svg.find(s, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("<g"), count("</g>"));
  EXPECT_EQ(count("<text"), count("</text>"));
  EXPECT_EQ(count("<"), count(">") - count("&gt;"));
}

// Runs `body` in a child process whose address space is capped at `cap` more than it uses now:
// true when it returned normally.
template <typename Fn>
bool runs_within(std::uint64_t cap, Fn&& body) {
  const pid_t child = ::fork();
  if (child == 0) {
    std::uint64_t vm_kib = 0;
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
      if (line.rfind("VmSize:", 0) == 0) vm_kib = std::stoull(line.substr(7));
    const rlim_t limit = vm_kib * 1024 + cap;
    const struct rlimit rl { limit, limit };
    ::setrlimit(RLIMIT_AS, &rl);
    try {
      body();
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// A report's memory follows the tensors and events it holds, not the pages a source claims: a
// source of 2^32 pages (the most a loadable file may claim) is reported in a few MiB.
TEST(ProfileReport, MemoryFollowsTheTensorsNotThePageCount) {
  Recording rec = sample_recording();
  rec.sources[0].page_count = std::uint64_t{1} << 32;
  rec.sources[0].tensors.back().page_count = 0xfffffff0;
  for (std::uint32_t i = 0; i < 10; ++i)
    rec.events.push_back(
        ProfileEvent{9'000'000 + i, 1000, 64_KiB, 0xffffff00 + i, 1, EventKind::fault, 0});
  const tools::ProfileSummary plain = tools::summarize(sample_recording(), 10);
  EXPECT_TRUE(runs_within(256_MiB, [&] {
    const tools::ProfileSummary s = tools::summarize(rec, 10);
    std::ostringstream trace, svg;
    tools::write_chrome_trace(rec, trace);
    tools::write_svg(rec, svg);
    // lm_head holds the pages of the last 10 faults, besides its own in the sample.
    for (const tools::StallShare& t : s.tensors)
      if (t.name == "lm_head.weight" && t.faults >= 10) return;
    throw 1;
  }));
  // The same attribution as before for an ordinary source.
  ASSERT_FALSE(plain.layers.empty());
  ASSERT_FALSE(plain.tensors.empty());
}

// Pages of tensors: each page's tensors and group, the same whether found per page or per tensor.
TEST(ProfileReport, PageMapFindsEachPagesTensors) {
  ProfileSourceInfo src = sample_info();
  // Two small tensors sharing page 4 with the q projection, and an empty one.
  src.tensors = {{"model.embed_tokens.weight", 0, 2, -1},
                 {"model.layers.0.self_attn.q_proj.weight", 2, 3, 0},
                 {"model.layers.0.input_layernorm.weight", 4, 1, 0},
                 {"model.layers.1.post_attention_layernorm.weight", 4, 2, 1},
                 {"model.layers.1.mlp.down_proj.weight", 5, 4, 1},
                 {"empty", 9, 0, -1},
                 {"lm_head.weight", 9, 1, -1}};
  const tools::PageMap m(src);
  std::vector<std::uint32_t> on;
  const std::vector<std::vector<std::uint32_t>> want = {{0}, {0}, {1}, {1}, {1, 2, 3}, {3, 4},
                                                        {4}, {4}, {4}, {6}, {}};
  for (std::uint64_t p = 0; p < want.size(); ++p) {
    m.tensors_on(p, on);
    EXPECT_EQ(on, want[p]) << "page " << p;
  }
  auto label = [&](std::uint64_t p) {
    const std::int32_t g = m.group(p);
    return g < 0 ? std::string("-") : m.labels()[static_cast<std::size_t>(g)];
  };
  EXPECT_EQ(label(0), "embedding");
  EXPECT_EQ(label(4), "layer 1");  // the last layer on a shared page
  EXPECT_EQ(label(5), "layer 1");
  EXPECT_EQ(label(9), "head");
  EXPECT_EQ(label(10), "-");
  const auto bands = m.bands();
  ASSERT_EQ(bands.size(), 4u);
  EXPECT_EQ(bands[0].first, 0u);
  EXPECT_EQ(bands[1].first, 2u);
  EXPECT_EQ(bands[1].end, 4u);
  EXPECT_EQ(bands[2].first, 4u);
  EXPECT_EQ(bands[2].end, 9u);
  EXPECT_EQ(bands[3].end, 10u);
}

// ---- a real run ----

// Drives a Pager with profiling on (the process's segment, as LEMA_PROFILE makes it), collects
// it as `lema prof record` does, and checks that the report counts what the Pager counted.
TEST(ProfileReport, NumbersEqualThePagersCounters) {
  ::setenv(runtime::kProfileEnv, "unused-the-recorder-saves", 1);
  ::setenv(runtime::kProfileRecorderEnv, std::to_string(::getpid()).c_str(), 1);
  tools::ProfileCollector collector(static_cast<std::uint64_t>(::getpid()));
  test::ModelShape shape;
  shape.layers = 3;
  test::OpenedModel m(runtime::make_host_backend(64_KiB), shape, 64_KiB, "prof");
  runtime::PagerStats stats;
  std::atomic<bool> done{false};
  {
    runtime::PagerOptions opt;
    opt.budget_bytes = 6 * 64_KiB;
    opt.policy = runtime::PolicyKind::trace;
    // Room for every event of the run: the poller may be descheduled for long under a
    // sanitizer on a loaded machine, and the test is about the report's numbers, not about
    // losing events (SlowReaderLosesTheOldestAndCountsThem covers that).
    opt.event_capacity = 1u << 16;
    runtime::Pager pager(m.space, opt);
    std::thread poller([&] {
      while (!done.load()) {
        collector.poll();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
    const auto order = test::tensor_order(m.space.layout(), test::Order::layer, 1);
    for (int pass = 0; pass < 4; ++pass) {
      for (const auto* t : order) test::check_tensor(pager, m, *t, false);
      pager.mark_step();
    }
    pager.quiesce();
    stats = pager.stats();
    done = true;
    poller.join();
  }
  Recording rec = collector.finish();
  rec.start_ns = 1;
  rec.end_ns = runtime::now_ns();
  EXPECT_FALSE(ProfileAttachment::try_attach(ProfileSegment::name_for(::getpid())).has_value())
      << "the collector removes the segment";
  ASSERT_EQ(rec.sources.size(), 1u);
  ASSERT_EQ(rec.dropped, 0u);
  EXPECT_EQ(rec.sources[0].kind, "pager");
  EXPECT_EQ(rec.sources[0].tensors.size(), m.space.layout().tensors().size());

  test::TempDir dir("prof");
  runtime::save_recording(rec, dir.path() / "run.lprof");
  const Recording loaded = runtime::load_recording(dir.path() / "run.lprof");
  const tools::ProfileSummary s = tools::summarize(loaded, 5);
  EXPECT_GT(stats.faults, 0u);
  EXPECT_EQ(s.counters.faults, stats.faults);
  EXPECT_EQ(s.counters.hits, stats.hits);
  EXPECT_EQ(s.counters.bytes_read, stats.bytes_read);
  EXPECT_EQ(s.counters.evictions, stats.evictions);
  EXPECT_EQ(s.counters.stall_ns, stats.stall_ns);
  EXPECT_EQ(s.counters.prefetches_issued, stats.prefetches_issued);
  EXPECT_EQ(s.counters.prefetches_used, stats.prefetches_used);
  EXPECT_EQ(s.counters.prefetches_wasted, stats.prefetches_wasted);
  EXPECT_EQ(s.counters.peak_resident_bytes, stats.peak_resident_bytes);
  EXPECT_EQ(s.counters.budget_bytes, stats.budget_bytes);
  EXPECT_EQ(s.io_path, stats.io_path);
  // The events agree with the counters, and the trace they give is at least Belady's optimum.
  std::map<EventKind, std::uint64_t> kinds;
  std::uint64_t read = 0;
  for (const ProfileEvent& e : loaded.events) {
    ++kinds[e.kind];
    if (e.kind == EventKind::fault || e.kind == EventKind::prefetch_done) read += e.bytes;
  }
  EXPECT_EQ(kinds[EventKind::fault], stats.faults);
  EXPECT_EQ(kinds[EventKind::hit], stats.hits);
  EXPECT_EQ(kinds[EventKind::evict], stats.evictions);
  EXPECT_EQ(kinds[EventKind::prefetch_issued], stats.prefetches_issued);
  EXPECT_EQ(read, stats.bytes_read);
  EXPECT_EQ(s.accesses, stats.faults + stats.hits);
  EXPECT_EQ(s.run_fetches, stats.faults + stats.prefetches_issued);
  EXPECT_LE(s.belady_fetches, s.run_fetches);
  EXPECT_GT(s.belady_fetches, 0u);
  EXPECT_FALSE(s.layers.empty());
  EXPECT_LE(s.tensors.size(), 5u);
  const auto j = tools::summary_json(s);
  EXPECT_EQ(j["faults"].get<std::uint64_t>(), stats.faults);
  EXPECT_EQ(j["belady"]["belady_fetches"].get<std::uint64_t>(), s.belady_fetches);
}

}  // namespace
}  // namespace lema
