// The LD_PRELOAD hook's event section of a profile file (Note [Preload event section]) and what
// `lema prof report` makes of it. The hook's own writing of the section is tested end to end in
// tests/python/test_preload.py.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "lema/base/units.hpp"
#include "lema/runtime/profile_file.hpp"
#include "prof_preload.hpp"
#include "runtime_fixture.hpp"

namespace lema {
namespace {

using runtime::PreloadCall;
using runtime::PreloadEvent;
using runtime::PreloadEvents;
using runtime::PreloadRoute;
using runtime::Recording;

PreloadEvent ev(std::uint64_t t, PreloadCall call, PreloadRoute route, std::uint64_t bytes,
                std::uint64_t address, std::int32_t result = 0, std::uint8_t flags = 0,
                std::uint32_t thread = 7) {
  PreloadEvent e;
  e.time_ns = t;
  e.call = call;
  e.route = route;
  e.bytes = bytes;
  e.address = address;
  e.result = result;
  e.flags = flags;
  e.thread = thread;
  return e;
}

Recording sample() {
  Recording rec;
  rec.pid = 11;
  rec.command = "train.py";
  rec.start_ns = 1000;
  rec.end_ns = 100000;
  PreloadEvents p;
  p.capacity = 64;
  p.dropped = 0;
  p.events = {
      ev(2000, PreloadCall::malloc, PreloadRoute::managed, 4_MiB, 0x1000),
      ev(3000, PreloadCall::malloc_async, PreloadRoute::passthrough, 4_KiB, 0x9000, 0, 0, 8),
      ev(4000, PreloadCall::malloc, PreloadRoute::refused, 64_MiB, 0, 2),
      ev(5000, PreloadCall::free, PreloadRoute::managed, 4_MiB, 0x1000),
      ev(6000, PreloadCall::free_async, PreloadRoute::passthrough, 0, 0x9000),
      // freed twice: the hook passed it through and could not tell; the events can
      ev(7000, PreloadCall::free, PreloadRoute::passthrough, 0, 0x9000, 1,
         runtime::kPreloadBadFree),
      ev(8000, PreloadCall::free, PreloadRoute::passthrough, 0, 0xdead, 1,
         runtime::kPreloadBadFree),
      ev(9000, PreloadCall::mem_get_info, PreloadRoute::budget, 60_MiB, 0),
  };
  rec.preload = p;
  return rec;
}

std::string read_all(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
void write_all(const std::filesystem::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << s;
}
std::uint64_t body_bytes(const std::string& file) {
  std::uint64_t n = 0;
  std::memcpy(&n, file.data() + 16, 8);
  return n;
}

TEST(PreloadEvents, RoundTripAfterTheBody) {
  test::TempDir dir("preload");
  const auto path = dir.path() / "hook.lprof";
  const Recording rec = sample();
  runtime::save_recording(rec, path);
  const Recording back = runtime::load_recording(path);
  ASSERT_TRUE(back.preload.has_value());
  EXPECT_EQ(back.preload->capacity, 64u);
  ASSERT_EQ(back.preload->events.size(), rec.preload->events.size());
  for (std::size_t i = 0; i < back.preload->events.size(); ++i) {
    const PreloadEvent &a = back.preload->events[i], &b = rec.preload->events[i];
    EXPECT_EQ(a.time_ns, b.time_ns);
    EXPECT_EQ(a.bytes, b.bytes);
    EXPECT_EQ(a.address, b.address);
    EXPECT_EQ(a.thread, b.thread);
    EXPECT_EQ(a.result, b.result);
    EXPECT_EQ(a.call, b.call);
    EXPECT_EQ(a.route, b.route);
    EXPECT_EQ(a.flags, b.flags);
  }
  // A file without the section (every file before it) has none, and is otherwise the same.
  Recording plain = rec;
  plain.preload.reset();
  runtime::save_recording(plain, path);
  const std::string bytes = read_all(path);
  EXPECT_EQ(bytes.size(), 64 + body_bytes(bytes));
  EXPECT_FALSE(runtime::load_recording(path).preload.has_value());
}

void expect_refused(const std::filesystem::path& path, const std::string& what) {
  try {
    runtime::load_recording(path);
    FAIL() << "loaded " << path;
  } catch (const runtime::ProfileFileError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(path.string(), 0), 0u) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

TEST(PreloadEvents, DamagedSectionsAreRefusedNamingTheFile) {
  test::TempDir dir("preload");
  const auto path = dir.path() / "hook.lprof";
  runtime::save_recording(sample(), path);
  const std::string good = read_all(path);
  const std::size_t at = 64 + body_bytes(good);

  std::string s = good;
  s[at + 48 + 8] ^= 0x40;  // a record's byte
  write_all(path, s);
  expect_refused(path, "preload event checksum");
  s = good;
  s[at] = 'X';  // not the section's magic
  write_all(path, s);
  expect_refused(path, "not the preload hook's event section");
  write_all(path, good.substr(0, good.size() - 3));
  expect_refused(path, "truncated");
  write_all(path, good + "xyz");
  expect_refused(path, "unread bytes after the preload events");
  s = good;
  const std::uint64_t huge = std::uint64_t{1} << 60;
  std::memcpy(s.data() + at + 16, &huge, 8);
  write_all(path, s);
  expect_refused(path, "preload event count");
  s = good;
  s[at + 8] = 2;  // version
  write_all(path, s);
  expect_refused(path, "version 2");
}

TEST(PreloadEvents, ReportPairsFreesWithTheirAllocations) {
  const Recording rec = sample();
  const tools::PreloadReport r = tools::summarize_preload(*rec.preload, rec.start_ns, 10);
  EXPECT_EQ(r.recorded, 8u);
  EXPECT_EQ(r.threads, 2u);
  EXPECT_TRUE(r.complete);
  EXPECT_EQ(r.peak_outstanding, 4_MiB + 4_KiB);
  EXPECT_DOUBLE_EQ(r.peak_at_s, 2e-6);
  EXPECT_EQ(r.outstanding_at_exit, 0u);
  EXPECT_EQ(r.refused_count, 1u);
  ASSERT_EQ(r.refused.size(), 1u);
  EXPECT_EQ(r.refused[0].bytes, 64_MiB);
  ASSERT_EQ(r.bad_free_count, 2u);
  EXPECT_EQ(r.bad_frees[0].what, "double free");
  EXPECT_EQ(r.bad_frees[1].address, 0xdeadu);
  EXPECT_NE(r.bad_frees[1].what, "double free");
  bool found = false;
  for (const tools::PreloadRow& row : r.rows)
    if (row.call == "cudaFreeAsync") {
      found = true;
      EXPECT_EQ(row.bytes, 4_KiB) << "the free carries its allocation's bytes";
    }
  EXPECT_TRUE(found);
  const nlohmann::json j = tools::preload_json(r);
  EXPECT_EQ(j["peak_outstanding_bytes"], 4_MiB + 4_KiB);
  EXPECT_EQ(j["timeline"].size(), 20u);
  EXPECT_NE(tools::format_preload(r).find("bad frees: 2"), std::string::npos);
}

}  // namespace
}  // namespace lema
