// The Reader conformance suite, run against every io path (io_uring with and without O_DIRECT,
// pread): bytes always equal the file, whatever the alignment, splitting, concurrency or injected
// faults; errors are ReadErrors naming the file and offset.
#include "lema/io/reader.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace fs = std::filesystem;
using lema::operator""_KiB;
using lema::operator""_MiB;

namespace lema::io {
namespace {

// ---- test data ---------------------------------------------------------------------------

std::byte pattern(std::uint32_t file, std::uint64_t i) {
  const std::uint64_t x = (i ^ (i >> 11) ^ (i >> 23)) * 31 + file * 101 + (i >> 8);
  return static_cast<std::byte>(x & 0xff);
}

void write_pattern_file(const fs::path& path, std::uint32_t file, std::uint64_t size) {
  std::vector<std::byte> data(size);
  for (std::uint64_t i = 0; i < size; ++i) data[i] = pattern(file, i);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(size));
  ASSERT_TRUE(out.good()) << path;
}

// Page-aligned memory with slack, so tests can place destinations at any misalignment.
class Buffer {
 public:
  explicit Buffer(std::uint64_t bytes)
      : mem_(
            static_cast<std::byte*>(std::aligned_alloc(4096, lema::align_up(bytes + 4096, 4096)))) {
    std::memset(mem_.get(), 0xEE, lema::align_up(bytes + 4096, 4096));
  }
  std::byte* at(std::uint64_t misalign) { return mem_.get() + misalign; }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> mem_;
};

// Returns the index of the first byte that differs from the file, or -1.
long long first_mismatch(const std::byte* dest, std::uint32_t file, std::uint64_t offset,
                         std::uint64_t length) {
  for (std::uint64_t i = 0; i < length; ++i)
    if (dest[i] != pattern(file, offset + i)) return static_cast<long long>(i);
  return -1;
}

// A directory on a real disk: O_DIRECT must be exercised, and /tmp may be tmpfs.
fs::path make_test_dir() {
  fs::path base = fs::path(LEMA_BINARY_DIR);
  struct statfs st {};
  if (::statfs("/var/tmp", &st) == 0 && st.f_type != 0x01021994 /* TMPFS_MAGIC */)
    base = "/var/tmp";
  std::string templ = (base / "lema_reader_test_XXXXXX").string();
  if (::mkdtemp(templ.data()) == nullptr)
    throw std::runtime_error("mkdtemp failed in " + base.string());
  return templ;
}

constexpr std::uint64_t kSizes[] = {10_MiB + 123, 3_MiB + 3 * 4096 + 7, 100};

// ---- fault injectors ---------------------------------------------------------------------

// Makes a seeded share of requests come back short, with EAGAIN, or with EINTR.
class FlakyDevice : public FaultInjector {
 public:
  std::optional<long> inject(std::uint32_t, std::uint64_t, std::uint64_t length) override {
    std::lock_guard lock(mutex_);
    switch (rng_() % 4) {
      case 0:
        ++eagain;
        return -EAGAIN;
      case 1:
        ++eintr;
        return -EINTR;
      case 2:
        if (length < 2) return std::nullopt;
        ++shorts;
        return static_cast<long>(1 + rng_() % (length - 1));
      default:
        return std::nullopt;
    }
  }
  std::atomic<int> eagain{0}, eintr{0}, shorts{0};

 private:
  std::mutex mutex_;
  std::mt19937_64 rng_{12345};
};

// Fails every request of `file` that covers byte `offset` with EIO.
class BadSector : public FaultInjector {
 public:
  BadSector(std::uint32_t file, std::uint64_t offset) : file_(file), offset_(offset) {}
  std::optional<long> inject(std::uint32_t file, std::uint64_t offset,
                             std::uint64_t length) override {
    if (file == file_ && offset <= offset_ && offset_ < offset + length) return -EIO;
    return std::nullopt;
  }

 private:
  std::uint32_t file_;
  std::uint64_t offset_;
};

// ---- the suite ---------------------------------------------------------------------------

struct PathParam {
  IoKind kind;
  bool direct;
  const char* name;
};

class ReaderTest : public ::testing::TestWithParam<PathParam> {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(make_test_dir());
    for (std::uint32_t k = 0; k < std::size(kSizes); ++k) {
      files_.push_back(*dir_ / ("file" + std::to_string(k) + ".bin"));
      write_pattern_file(files_.back(), k, kSizes[k]);
    }
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*dir_, ec);
    delete dir_;
    files_.clear();
  }

  ReaderOptions options() const {
    ReaderOptions o;
    o.kind = GetParam().kind;
    o.direct = GetParam().direct;
    o.queue_depth = 4;
    o.request_bytes = 256_KiB;
    o.threads = 3;
    return o;
  }

  // Opens the path under test, or skips when this machine cannot run it.
  std::unique_ptr<Reader> open(ReaderOptions o, std::vector<fs::path> files = files_) {
    try {
      return Reader::open(std::move(files), std::move(o));
    } catch (const InvalidArgument& e) {
      if (GetParam().kind == IoKind::uring) return nullptr;
      throw;
    }
  }
#define OPEN_OR_SKIP(var, ...)  \
  auto var = open(__VA_ARGS__); \
  if (!var) GTEST_SKIP() << "io_uring is not available on this machine"

  static fs::path* dir_;
  static std::vector<fs::path> files_;
};

fs::path* ReaderTest::dir_ = nullptr;
std::vector<fs::path> ReaderTest::files_;

TEST_P(ReaderTest, ReportsItsPath) {
  OPEN_OR_SKIP(reader, options());
  const std::string path = reader->path_name();
  if (GetParam().kind == IoKind::pread) {
    EXPECT_EQ(path, "pread");
  } else if (GetParam().direct) {
    EXPECT_TRUE(path == "io_uring+O_DIRECT" || path == "io_uring") << path;
  } else {
    EXPECT_EQ(path, "io_uring");
  }
  EXPECT_EQ(reader->files(), files_);
}

TEST_P(ReaderTest, WholeFilesEqualTheirBytes) {
  OPEN_OR_SKIP(reader, options());
  std::vector<Buffer> buffers;
  std::vector<ReadRequest> batch;
  for (std::uint32_t k = 0; k < std::size(kSizes); ++k) {
    buffers.emplace_back(kSizes[k]);
    batch.push_back({k, 0, kSizes[k], buffers.back().at(0)});
  }
  reader->read(batch);
  for (std::uint32_t k = 0; k < std::size(kSizes); ++k)
    EXPECT_EQ(first_mismatch(buffers[k].at(0), k, 0, kSizes[k]), -1) << files_[k];
  const ReaderStats s = reader->stats();
  EXPECT_EQ(s.batches, 1u);
  EXPECT_EQ(s.bytes, kSizes[0] + kSizes[1] + kSizes[2]);
  EXPECT_GE(s.requests, (kSizes[0] + kSizes[1]) / (256_KiB));  // split into request_bytes pieces
  EXPECT_EQ(s.errors, 0u);
  if (reader->path_name() == "io_uring+O_DIRECT") {
    EXPECT_GT(s.direct_bytes, 0u);
  } else {
    EXPECT_EQ(s.direct_bytes, 0u);
  }
}

TEST_P(ReaderTest, UnalignedOffsetsLengthsAndDestinations) {
  OPEN_OR_SKIP(reader, options());
  std::mt19937_64 rng(7);
  struct Case {
    ReadRequest request;
    std::unique_ptr<Buffer> buffer;
  };
  std::vector<Case> cases;
  auto add = [&](std::uint32_t file, std::uint64_t offset, std::uint64_t length,
                 std::uint64_t misalign) {
    auto buffer = std::make_unique<Buffer>(length);
    cases.push_back({{file, offset, length, buffer->at(misalign)}, std::move(buffer)});
  };
  const std::uint64_t size0 = kSizes[0];
  add(0, 0, 1, 0);
  add(0, size0 - 1, 1, 4095);      // last byte
  add(0, size0 - 5000, 5000, 17);  // up to the end, unaligned tail
  add(0, 4095, 2, 1);              // straddles a block boundary
  add(0, 4096, 8192, 0);           // aligned everything
  add(0, 4096 + 100, 3_MiB, 100);  // same misalignment as the offset
  add(0, 4096 + 100, 3_MiB, 99);   // a different one
  add(1, 0, kSizes[1], 1);
  add(2, 3, 90, 5);
  for (int i = 0; i < 150; ++i) {
    const std::uint32_t file = static_cast<std::uint32_t>(rng() % 2);
    const std::uint64_t offset = rng() % kSizes[file];
    const std::uint64_t max_len = std::min<std::uint64_t>(kSizes[file] - offset, 1_MiB);
    add(file, offset, 1 + rng() % max_len, rng() % 4096);
  }
  std::vector<ReadRequest> batch;
  for (auto& c : cases) batch.push_back(c.request);
  reader->read(batch);
  for (const auto& c : cases) {
    const ReadRequest& r = c.request;
    EXPECT_EQ(first_mismatch(r.dest, r.file, r.offset, r.length), -1)
        << "file " << r.file << " offset " << r.offset << " length " << r.length;
  }
}

TEST_P(ReaderTest, ConcurrentBatchesFromSeveralThreads) {
  OPEN_OR_SKIP(reader, options());
  constexpr int kThreads = 4, kBatchesPerThread = 12, kRequestsPerBatch = 5;
  constexpr int kBatches = kThreads * kBatchesPerThread;
  std::vector<std::atomic<int>> calls(kBatches);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<std::vector<std::unique_ptr<Buffer>>> buffers(kBatchesPerThread);
      std::vector<std::vector<ReadRequest>> batches(kBatchesPerThread);
      std::vector<ReadTicket> tickets;
      for (int b = 0; b < kBatchesPerThread; ++b) {
        for (int i = 0; i < kRequestsPerBatch; ++i) {
          const std::uint32_t file = static_cast<std::uint32_t>(rng() % 3);
          const std::uint64_t offset = rng() % kSizes[file];
          const std::uint64_t length =
              1 + rng() % std::min<std::uint64_t>(kSizes[file] - offset, 700_KiB);
          buffers[b].push_back(std::make_unique<Buffer>(length));
          batches[b].push_back(
              {file, offset, length, buffers[b].back()->at(rng() % 2 ? 0 : rng() % 4096)});
        }
        const int id = t * kBatchesPerThread + b;
        tickets.push_back(reader->submit(batches[b], [&calls, &failures, id](std::exception_ptr e) {
          calls[id].fetch_add(1);
          if (e) failures.fetch_add(1);
        }));
      }
      for (int b = 0; b < kBatchesPerThread; ++b) {
        tickets[b].wait();
        EXPECT_TRUE(tickets[b].ready());
        EXPECT_EQ(calls[t * kBatchesPerThread + b].load(), 1);  // ran before wait() returned
        for (const ReadRequest& r : batches[b])
          EXPECT_EQ(first_mismatch(r.dest, r.file, r.offset, r.length), -1)
              << "file " << r.file << " offset " << r.offset << " length " << r.length;
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kBatches; ++i) EXPECT_EQ(calls[i].load(), 1) << "batch " << i;
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(reader->stats().batches, static_cast<std::uint64_t>(kBatches));
}

TEST_P(ReaderTest, EmptyBatchCompletesAndCallsBackOnce) {
  OPEN_OR_SKIP(reader, options());
  int calls = 0;
  ReadTicket t = reader->submit({}, [&](std::exception_ptr e) {
    ++calls;
    EXPECT_FALSE(e);
  });
  t.wait();
  EXPECT_TRUE(t.ready());
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(ReadTicket().ready());
}

TEST_P(ReaderTest, DestructionFinishesSubmittedBatches) {
  std::vector<ReadTicket> tickets;
  Buffer buffer(kSizes[0]);
  std::atomic<int> calls{0};
  {
    OPEN_OR_SKIP(reader, options());
    for (std::uint64_t off = 0; off < kSizes[0]; off += 1_MiB) {
      const std::uint64_t len = std::min<std::uint64_t>(1_MiB, kSizes[0] - off);
      tickets.push_back(reader->submit({{0, off, len, buffer.at(0) + off}},
                                       [&](std::exception_ptr) { calls.fetch_add(1); }));
    }
  }
  for (auto& t : tickets) {
    EXPECT_TRUE(t.ready());
    t.wait();
  }
  EXPECT_EQ(calls.load(), static_cast<int>(tickets.size()));
  EXPECT_EQ(first_mismatch(buffer.at(0), 0, 0, kSizes[0]), -1);
}

TEST_P(ReaderTest, ShortReadsEagainAndEintrStillGiveExactBytes) {
  auto flaky = std::make_shared<FlakyDevice>();
  ReaderOptions o = options();
  o.fault_injector = flaky;
  OPEN_OR_SKIP(reader, o);
  Buffer whole(kSizes[0]), part(2_MiB), tail(kSizes[1]);
  reader->read({{0, 0, kSizes[0], whole.at(0)},
                {0, 12345, 2_MiB, part.at(12345 % 4096)},
                {1, 0, kSizes[1], tail.at(3)}});
  EXPECT_EQ(first_mismatch(whole.at(0), 0, 0, kSizes[0]), -1);
  EXPECT_EQ(first_mismatch(part.at(12345 % 4096), 0, 12345, 2_MiB), -1);
  EXPECT_EQ(first_mismatch(tail.at(3), 1, 0, kSizes[1]), -1);
  const ReaderStats s = reader->stats();
  EXPECT_GT(flaky->shorts.load(), 0);
  EXPECT_GE(s.short_reads, static_cast<std::uint64_t>(flaky->shorts.load()));
  EXPECT_EQ(s.retries, static_cast<std::uint64_t>(flaky->eagain.load() + flaky->eintr.load()));
  EXPECT_GT(s.retries, 0u);
  EXPECT_EQ(s.errors, 0u);
}

TEST_P(ReaderTest, InjectedEioIsAReadErrorNamingFileAndOffset) {
  const std::uint64_t bad = 5_MiB + 77;
  ReaderOptions o = options();
  o.fault_injector = std::make_shared<BadSector>(0, bad);
  OPEN_OR_SKIP(reader, o);
  Buffer buffer(kSizes[0]);
  std::exception_ptr seen;
  int calls = 0;
  ReadTicket t = reader->submit({{0, 0, kSizes[0], buffer.at(0)}}, [&](std::exception_ptr e) {
    ++calls;
    seen = e;
  });
  try {
    t.wait();
    FAIL() << "expected a ReadError";
  } catch (const ReadError& e) {
    EXPECT_EQ(e.code(), EIO);
    EXPECT_EQ(e.file(), files_[0].string());
    EXPECT_LE(e.offset(), bad);
    EXPECT_LT(bad, e.offset() + e.length());
    const std::string what = e.what();
    EXPECT_NE(what.find(files_[0].string()), std::string::npos) << what;
    EXPECT_NE(what.find("offset " + std::to_string(e.offset())), std::string::npos) << what;
  }
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(seen);
  EXPECT_GE(reader->stats().errors, 1u);

  // The reader stays usable for reads that avoid the bad sector.
  reader->read({{0, 0, 1_MiB, buffer.at(0)}});
  EXPECT_EQ(first_mismatch(buffer.at(0), 0, 0, 1_MiB), -1);
}

TEST_P(ReaderTest, FileTruncatedAfterOpenIsAnEndOfFileError) {
  const fs::path path = *dir_ / (std::string("shrinking_") + GetParam().name + ".bin");
  write_pattern_file(path, 0, 1_MiB + 100);
  OPEN_OR_SKIP(reader, options(), {path});
  ASSERT_EQ(::truncate(path.c_str(), 300_KiB + 5), 0);
  Buffer buffer(1_MiB + 100);
  try {
    reader->read({{0, 0, 1_MiB + 100, buffer.at(0)}});
    FAIL() << "expected a ReadError";
  } catch (const ReadError& e) {
    EXPECT_EQ(e.code(), 0);
    EXPECT_EQ(e.file(), path.string());
    const std::string what = e.what();
    EXPECT_NE(what.find("end of file"), std::string::npos) << what;
    // The file is blamed, with both sizes: it changed under the reader.
    EXPECT_NE(what.find("changed under us"), std::string::npos) << what;
    EXPECT_NE(what.find(std::to_string(1_MiB + 100) + " bytes when opened and is now " +
                        std::to_string(300_KiB + 5) + " bytes"),
              std::string::npos)
        << what;
  }
  // What is still there reads fine.
  reader->read({{0, 0, 300_KiB + 5, buffer.at(1)}});
  EXPECT_EQ(first_mismatch(buffer.at(1), 0, 0, 300_KiB + 5), -1);
}

TEST_P(ReaderTest, ReadPastTheEndOfAnUnchangedFileSaysItIsShorterThanItsHeaderSays) {
  const fs::path path = *dir_ / (std::string("short_") + GetParam().name + ".bin");
  write_pattern_file(path, 0, 300_KiB + 5);
  OPEN_OR_SKIP(reader, options(), {path});
  Buffer buffer(1_MiB);
  try {
    reader->read({{0, 0, 1_MiB, buffer.at(0)}});
    FAIL() << "expected a ReadError";
  } catch (const ReadError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("shorter than its header says"), std::string::npos) << what;
    EXPECT_EQ(what.find("changed under us"), std::string::npos) << what;
  }
}

TEST_P(ReaderTest, BadRequestsAreRejectedAtSubmit) {
  OPEN_OR_SKIP(reader, options());
  std::byte b[8];
  EXPECT_THROW(reader->submit({{7, 0, 8, b}}), InvalidArgument);
  EXPECT_THROW(reader->submit({{0, 0, 8, nullptr}}), InvalidArgument);
  EXPECT_THROW(reader->submit({{0, ~std::uint64_t{0} - 2, 8, b}}), InvalidArgument);
}

TEST_P(ReaderTest, MissingFileIsASystemError) {
  EXPECT_THROW(Reader::open({*dir_ / "does_not_exist.bin"}, options()), SystemError);
}

INSTANTIATE_TEST_SUITE_P(Paths, ReaderTest,
                         ::testing::Values(PathParam{IoKind::uring, true, "uring_direct"},
                                           PathParam{IoKind::uring, false, "uring_buffered"},
                                           PathParam{IoKind::pread, true, "pread_direct"},
                                           PathParam{IoKind::pread, false, "pread_buffered"}),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- choice of path ----------------------------------------------------------------------

class LemaIoEnv : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = make_test_dir();
    file_ = dir_ / "small.bin";
    write_pattern_file(file_, 0, 5000);
    if (const char* v = std::getenv("LEMA_IO")) saved_ = v;
  }
  void TearDown() override {
    if (saved_)
      ::setenv("LEMA_IO", saved_->c_str(), 1);
    else
      ::unsetenv("LEMA_IO");
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path dir_, file_;
  std::optional<std::string> saved_;
};

TEST_F(LemaIoEnv, PreadIsHonoured) {
  ::setenv("LEMA_IO", "pread", 1);
  auto reader = Reader::open({file_});
  EXPECT_EQ(reader->path_name(), "pread");
  Buffer b(5000);
  reader->read({{0, 0, 5000, b.at(3)}});
  EXPECT_EQ(first_mismatch(b.at(3), 0, 0, 5000), -1);
}

TEST_F(LemaIoEnv, UringIsHonoured) {
  ::setenv("LEMA_IO", "uring", 1);
  std::unique_ptr<Reader> reader;
  try {
    reader = Reader::open({file_});
  } catch (const InvalidArgument& e) {
    GTEST_SKIP() << "io_uring is not available: " << e.what();
  }
  EXPECT_EQ(reader->path_name().rfind("io_uring", 0), 0u) << reader->path_name();
}

TEST_F(LemaIoEnv, ExplicitKindWinsOverTheEnvironment) {
  ::setenv("LEMA_IO", "uring", 1);
  ReaderOptions o;
  o.kind = IoKind::pread;
  EXPECT_EQ(Reader::open({file_}, o)->path_name(), "pread");
}

TEST_F(LemaIoEnv, AutomaticPicksAWorkingPath) {
  ::unsetenv("LEMA_IO");
  auto reader = Reader::open({file_});
  Buffer b(5000);
  reader->read({{0, 0, 5000, b.at(0)}});
  EXPECT_EQ(first_mismatch(b.at(0), 0, 0, 5000), -1);
}

TEST_F(LemaIoEnv, InvalidValueIsRejectedWithTheAcceptedOnes) {
  ::setenv("LEMA_IO", "mmap", 1);
  try {
    Reader::open({file_});
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("LEMA_IO"), std::string::npos) << what;
    EXPECT_NE(what.find("mmap"), std::string::npos) << what;
    EXPECT_NE(what.find("uring"), std::string::npos) << what;
    EXPECT_NE(what.find("pread"), std::string::npos) << what;
  }
}

TEST(ReaderOptionsTest, OutOfRangeOptionsAreInvalidArguments) {
  ReaderOptions o;
  o.kind = IoKind::pread;
  o.request_bytes = 1000;
  EXPECT_THROW(Reader::open(std::vector<fs::path>{}, o), InvalidArgument);
  o.request_bytes = 1_MiB;
  o.queue_depth = 0;
  EXPECT_THROW(Reader::open(std::vector<fs::path>{}, o), InvalidArgument);
}

}  // namespace
}  // namespace lema::io
