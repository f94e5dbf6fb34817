// What each adaptor adds to the contract: the statistics' numbers, the limit's error and its
// numbers, the logging adaptor's CSV read back and replayed.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lema/allocator/allocation_log.hpp"
#include "lema/allocator/host_memory_resource.hpp"
#include "lema/allocator/limit_adaptor.hpp"
#include "lema/allocator/logging_adaptor.hpp"
#include "lema/allocator/statistics_adaptor.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator {
namespace {

std::unique_ptr<MemoryResource> host() {
  return std::make_unique<HostMemoryResource>();
}

// An upstream that has no memory at all, as an exhausted device would.
class EmptyResource final : public MemoryResource {
  void* do_allocate(std::size_t bytes, std::size_t) override {
    throw lema::OutOfMemory("empty resource: no room for " + std::to_string(bytes) + " bytes");
  }
  void do_deallocate(void*, std::size_t, std::size_t) noexcept override {}
};

// Fixed-size blocks on one LIFO shared by all threads: a block freed on one thread is the next
// one handed out on any thread, and the free yields right after giving it back, so a logger
// that wrote its free line after the block went back would be overtaken by the next allocate.
class SharedLifoResource final : public MemoryResource {
 public:
  static constexpr std::size_t kBlock = 64;
  explicit SharedLifoResource(std::size_t blocks) : storage_(blocks * kBlock) {
    for (std::size_t i = 0; i < blocks; ++i) free_.push_back(storage_.data() + i * kBlock);
  }

 private:
  void* do_allocate(std::size_t bytes, std::size_t) override {
    std::lock_guard lock(mutex_);
    if (bytes > kBlock || free_.empty()) throw lema::OutOfMemory("shared LIFO is empty");
    void* p = free_.back();
    free_.pop_back();
    return p;
  }
  void do_deallocate(void* p, std::size_t, std::size_t) noexcept override {
    {
      std::lock_guard lock(mutex_);
      free_.push_back(static_cast<unsigned char*>(p));
    }
    std::this_thread::yield();
  }
  std::mutex mutex_;
  std::vector<unsigned char> storage_;
  std::vector<unsigned char*> free_;
};

std::string temp_path(const std::string& name) {
  return (std::filesystem::path(::testing::TempDir()) /
          (name + "_" + std::to_string(::getpid()) + ".csv"))
      .string();
}

TEST(StatisticsAdaptor, CountsCurrentPeakAndAllocations) {
  StatisticsAdaptor mr(host());
  void* a = mr.allocate(100);
  void* b = mr.allocate(200, 64);
  mr.deallocate(a, 100);
  void* c = mr.allocate(50);
  EXPECT_EQ(mr.allocate(0), nullptr);  // reaches no resource, counts nothing
  const AllocationStats s = mr.stats();
  EXPECT_EQ(s.current_bytes, 250u);
  EXPECT_EQ(s.peak_bytes, 300u);
  EXPECT_EQ(s.current_count, 2u);
  EXPECT_EQ(s.allocation_count, 3u);
  mr.deallocate(b, 200, 64);
  mr.deallocate(c, 50);
  EXPECT_EQ(mr.stats().current_bytes, 0u);
  EXPECT_EQ(mr.stats().current_count, 0u);
  EXPECT_EQ(mr.stats().peak_bytes, 300u);
}

TEST(StatisticsAdaptor, ConcurrentCallersLeaveExactCounts) {
  StatisticsAdaptor mr(host());
  std::vector<void*> kept(4, nullptr);  // one block kept live per thread
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 1000; ++i) {
        void* p = mr.allocate(24);
        mr.deallocate(p, 24);
      }
      kept[t] = mr.allocate(8);
    });
  }
  for (auto& th : threads) th.join();
  const AllocationStats s = mr.stats();
  EXPECT_EQ(s.allocation_count, 4u * 1001u);
  EXPECT_EQ(s.current_bytes, 4u * 8u);
  EXPECT_EQ(s.current_count, 4u);
  EXPECT_LE(s.peak_bytes, 4u * (24u + 8u));
  for (void* p : kept) mr.deallocate(p, 8);
  EXPECT_EQ(mr.stats().current_bytes, 0u);
}

TEST(StatisticsAdaptor, PeakNeverExceedsWhatTheUpstreamHeld) {
  // Two blocks exist; a block freed on one thread is at once handed out on another, so a count
  // taken back only after the block went back would see three live for a moment.
  StatisticsAdaptor mr(std::make_unique<SharedLifoResource>(2));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        void* p = nullptr;
        while (p == nullptr) {
          try {
            p = mr.allocate(SharedLifoResource::kBlock);
          } catch (const lema::OutOfMemory&) {
            std::this_thread::yield();  // both blocks live on other threads
          }
        }
        mr.deallocate(p, SharedLifoResource::kBlock);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_LE(mr.stats().peak_bytes, 2 * SharedLifoResource::kBlock);
  EXPECT_EQ(mr.stats().allocation_count, 8000u);
}

TEST(StatisticsAdaptor, NullUpstreamIsRejected) {
  EXPECT_THROW(StatisticsAdaptor(nullptr), InvalidArgument);
  EXPECT_THROW(LimitAdaptor(nullptr, 1_KiB), InvalidArgument);
  std::ostringstream out;
  EXPECT_THROW(LoggingAdaptor(nullptr, out), InvalidArgument);
}

TEST(LimitAdaptor, RefusalCarriesTheNumbersAndNamesThem) {
  LimitAdaptor mr(host(), 1024);
  void* a = mr.allocate(600);
  EXPECT_EQ(mr.used_bytes(), 600u);
  try {
    (void)mr.allocate(500);
    FAIL() << "an allocation over the limit succeeded";
  } catch (const OutOfMemory& e) {
    EXPECT_EQ(e.requested_bytes(), 500u);
    EXPECT_EQ(e.used_bytes(), 600u);
    EXPECT_EQ(e.limit_bytes(), 1024u);
    const std::string what = e.what();
    for (const char* number : {"500 bytes", "600 bytes", "1024 bytes", "raise the limit"}) {
      EXPECT_NE(what.find(number), std::string::npos) << what;
    }
  }
  EXPECT_EQ(mr.used_bytes(), 600u);                       // the refusal took nothing
  void* b = mr.allocate(424);                             // exactly to the limit is allowed
  EXPECT_THROW((void)mr.allocate(1), lema::OutOfMemory);  // the base type catches it too
  mr.deallocate(a, 600);
  mr.deallocate(b, 424);
  EXPECT_EQ(mr.used_bytes(), 0u);
}

TEST(LimitAdaptor, ARequestLargerThanTheLimitIsRefusedWithoutOverflow) {
  LimitAdaptor mr(host(), 1_MiB);
  EXPECT_THROW((void)mr.allocate(SIZE_MAX), OutOfMemory);
  EXPECT_EQ(mr.used_bytes(), 0u);
}

TEST(LimitAdaptor, RefusedAllocateLeavesStatisticsUnchanged) {
  auto limit = std::make_unique<LimitAdaptor>(host(), 4_KiB);
  StatisticsAdaptor stats(std::move(limit));
  void* a = stats.allocate(3_KiB);
  const AllocationStats before = stats.stats();
  EXPECT_THROW((void)stats.allocate(2_KiB), OutOfMemory);
  const AllocationStats after = stats.stats();
  EXPECT_EQ(after.current_bytes, before.current_bytes);
  EXPECT_EQ(after.peak_bytes, before.peak_bytes);
  EXPECT_EQ(after.current_count, before.current_count);
  EXPECT_EQ(after.allocation_count, before.allocation_count);
  stats.deallocate(a, 3_KiB);
}

TEST(LimitAdaptor, UpstreamFailureGivesTheReservationBack) {
  LimitAdaptor mr(std::make_unique<EmptyResource>(), 1_MiB);
  EXPECT_THROW((void)mr.allocate(4_KiB), lema::OutOfMemory);
  EXPECT_EQ(mr.used_bytes(), 0u);
}

TEST(LimitAdaptor, ConcurrentCallersNeverPassTheLimitTogether) {
  constexpr std::uint64_t kLimit = 64_KiB;
  auto stats_owned = std::make_unique<StatisticsAdaptor>(host());
  StatisticsAdaptor& stats = *stats_owned;
  LimitAdaptor mr(std::move(stats_owned), kLimit);
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::uniform_int_distribution<std::size_t> size(1, 16_KiB);
      std::vector<std::pair<void*, std::size_t>> live;
      for (int i = 0; i < 2000; ++i) {
        const std::size_t bytes = size(rng);
        try {
          live.push_back({mr.allocate(bytes), bytes});
        } catch (const OutOfMemory&) {
          refused.fetch_add(1);
        }
        if (live.size() > 12) {  // more than the limit holds, even on one thread alone
          mr.deallocate(live.front().first, live.front().second);
          live.erase(live.begin());
        }
      }
      for (auto& [p, bytes] : live) mr.deallocate(p, bytes);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_GT(refused.load(), 0);  // the limit was reached, so it was tested
  EXPECT_LE(stats.stats().peak_bytes, kLimit);
  EXPECT_EQ(mr.used_bytes(), 0u);
}

// A workload with frees between allocations, so the peak is not just the sum.
void run_workload(MemoryResource& mr) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::size_t> size(1, 32_KiB);
  std::uniform_int_distribution<int> shift(0, 6);
  std::vector<std::pair<void*, std::pair<std::size_t, std::size_t>>> live;
  for (int i = 0; i < 500; ++i) {
    const std::size_t bytes = size(rng);
    const std::size_t alignment = std::size_t{1} << shift(rng);
    live.push_back({mr.allocate(bytes, alignment), {bytes, alignment}});
    if (i % 3 == 2) {
      const std::size_t k = rng() % live.size();
      mr.deallocate(live[k].first, live[k].second.first, live[k].second.second);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
    }
  }
  for (auto& [p, sa] : live) mr.deallocate(p, sa.first, sa.second);
}

TEST(LoggingAdaptor, LogParsesBackAndReplaysToTheSamePeak) {
  const std::string path = temp_path("alloc_log_replay");
  std::uint64_t peak = 0;
  {
    StatisticsAdaptor mr(std::make_unique<LoggingAdaptor>(host(), path));
    run_workload(mr);
    peak = mr.stats().peak_bytes;
    EXPECT_EQ(mr.stats().current_bytes, 0u);
  }
  std::ifstream in(path);
  const std::vector<AllocationRecord> records = read_allocation_log(in, path);
  ASSERT_EQ(records.size(), 1000u);  // 500 allocations, 500 frees
  EXPECT_EQ(records.front().action, AllocationRecord::Action::allocate);
  EXPECT_EQ(records.front().thread, static_cast<std::uint64_t>(::gettid()));
  for (std::size_t i = 1; i < records.size(); ++i) {
    EXPECT_LE(records[i - 1].time_ns, records[i].time_ns);
  }
  StatisticsAdaptor target(host());
  const ReplayResult replay = replay_allocation_log(records, target);
  EXPECT_EQ(replay.allocations, 500u);
  EXPECT_EQ(replay.frees, 500u);
  EXPECT_EQ(replay.live_at_end, 0u);
  EXPECT_EQ(target.stats().peak_bytes, peak);
  EXPECT_EQ(target.stats().current_bytes, 0u);
  std::filesystem::remove(path);
}

TEST(LoggingAdaptor, ConcurrentLogIsASerialOrderThatReplays) {
  std::ostringstream out;
  {
    LoggingAdaptor mr(std::make_unique<SharedLifoResource>(8), out);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        for (int i = 0; i < 2000; ++i) {
          void* p = mr.allocate(SharedLifoResource::kBlock);
          mr.deallocate(p, SharedLifoResource::kBlock);
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_TRUE(mr.good());
  }
  std::istringstream in(out.str());
  const auto records = read_allocation_log(in);
  ASSERT_EQ(records.size(), 16000u);
  HostMemoryResource target;
  const ReplayResult replay = replay_allocation_log(records, target);  // throws on a bad order
  EXPECT_EQ(replay.frees, 8000u);
}

TEST(LoggingAdaptor, LogSurvivesACrashOfTheProcess) {
  const std::string path = temp_path("alloc_log_crash");
  const pid_t child = ::fork();
  ASSERT_NE(child, -1);
  if (child == 0) {
    auto* mr = new LoggingAdaptor(host(), path);  // never destroyed: the process dies first
    (void)mr->allocate(4096, 4096);
    (void)mr->allocate(100);
    ::_exit(0);  // no destructors, no stream flush: as a crash
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  std::ifstream in(path);
  const auto records = read_allocation_log(in, path);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].bytes, 4096u);
  EXPECT_EQ(records[0].alignment, 4096u);
  EXPECT_EQ(records[0].pointer % 4096, 0u);
  EXPECT_EQ(records[1].bytes, 100u);
  std::filesystem::remove(path);
}

TEST(LoggingAdaptor, UnopenablePathIsNamed) {
  const std::string path = "/nonexistent-dir/alloc.csv";
  try {
    LoggingAdaptor mr(host(), path);
    FAIL() << "opened " << path;
  } catch (const SystemError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

struct BrokenLog {
  const char* name;
  const char* text;
  const char* says;
};

TEST(AllocationLog, BrokenFilesAreRefusedNamingTheLine) {
  const std::string h = std::string(LoggingAdaptor::kHeader) + "\n";
  const std::vector<BrokenLog> cases = {
      {"no header", "1,2,allocate,0x10,8,8\n", "line 1: the header"},
      {"few columns", "1,2,allocate,0x10\n", "line 2: expected 6 comma-separated columns, got 4"},
      {"many columns", "1,2,allocate,0x10,8,8,9\n", "line 2: expected 6"},
      {"bad action", "1,2,grab,0x10,8,8\n", "line 2: action is 'grab'"},
      {"pointer not hex", "1,2,free,16,8,8\n", "line 2: pointer is '16'"},
      {"bytes not a number", "1,2,allocate,0x10,8k,8\n", "line 2: column bytes is '8k'"},
      {"alignment", "1,2,allocate,0x10,8,12\n", "line 2: alignment 12 is not a power of two"},
  };
  for (const auto& c : cases) {
    std::istringstream in(std::string(c.name) == std::string("no header") ? c.text : h + c.text);
    try {
      (void)read_allocation_log(in, "trace.csv");
      ADD_FAILURE() << c.name << ": accepted";
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(std::string("trace.csv ") + c.says), std::string::npos)
          << c.name << ": " << what;
    }
  }
}

TEST(AllocationLog, ReplayRefusesAFreeOfAPointerNeverAllocatedAndLeaksNothing) {
  using A = AllocationRecord::Action;
  const std::vector<AllocationRecord> records = {
      {.action = A::allocate, .pointer = 0x1000, .bytes = 64, .alignment = 16},
      {.action = A::free, .pointer = 0x2000, .bytes = 64, .alignment = 16},
  };
  StatisticsAdaptor target(host());
  try {
    (void)replay_allocation_log(records, target);
    FAIL() << "replayed a free of a pointer never allocated";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("record 2 (pointer 0x2000)"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(target.stats().current_bytes, 0u);  // the block record 1 made was freed
}

TEST(AllocationLog, ReplayFreesWhatTheLogLeftLive) {
  using A = AllocationRecord::Action;
  const std::vector<AllocationRecord> records = {
      {.action = A::allocate, .pointer = 0x1000, .bytes = 64, .alignment = 16},
  };
  StatisticsAdaptor target(host());
  EXPECT_EQ(replay_allocation_log(records, target).live_at_end, 1u);
  EXPECT_EQ(target.stats().current_bytes, 0u);
}

}  // namespace
}  // namespace lema::allocator
