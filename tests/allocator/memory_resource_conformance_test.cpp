// The contract every MemoryResource keeps (memory_resource.hpp), checked on every resource and
// on stacks of adaptors over it: one suite, parameterized by how the stack is made.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lema/allocator/host_memory_resource.hpp"
#include "lema/allocator/limit_adaptor.hpp"
#include "lema/allocator/logging_adaptor.hpp"
#include "lema/allocator/slot_pool.hpp"
#include "lema/allocator/statistics_adaptor.hpp"
#include "lema/allocator/vmm_resource.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/pinned_host_pool.hpp"
#ifdef LEMA_TEST_DEVICE_VMM
#include "fake_cuda_control.hpp"
#include "lema/allocator/cuda/device_vmm_resource.hpp"
#endif

namespace lema::allocator {
namespace {

// A resource under test and whatever it logs into, destroyed resource first.
struct Stack {
  std::unique_ptr<std::ostringstream> log = std::make_unique<std::ostringstream>();
  std::unique_ptr<MemoryResource> mr;
};

struct Case {
  std::string name;
  std::function<Stack()> make;
  friend void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }
};

std::unique_ptr<MemoryResource> host() {
  return std::make_unique<HostMemoryResource>();
}

constexpr std::uint64_t kLimit = 1_GiB;  // room for every test below

[[maybe_unused]] VmmOptions vmm_options() {  // unused under TSan
  VmmOptions o;
  o.budget_bytes = 8_MiB;
  o.capacity_bytes = 2 * kLimit;
  return o;
}

#ifdef LEMA_FAKE_CUDA_DRIVER
runtime::CudaBackendOptions fake_driver() {
  runtime::CudaBackendOptions o;
  o.driver_library = LEMA_FAKE_CUDA_DRIVER;
  return o;
}
#endif

std::vector<Case> cases() {
  return {
      {"Host", [] { return Stack{.mr = host()}; }},
      {"Statistics", [] { return Stack{.mr = std::make_unique<StatisticsAdaptor>(host())}; }},
      {"Limit", [] { return Stack{.mr = std::make_unique<LimitAdaptor>(host(), kLimit)}; }},
      // Pages under a budget smaller than what the tests allocate at once (Note [One budget]).
      {"Vmm", [] { return Stack{.mr = std::make_unique<VmmResource>(vmm_options())}; }},
      {"Logging",
       [] {
         Stack s;
         s.mr = std::make_unique<LoggingAdaptor>(host(), *s.log);
         return s;
       }},
      {"LimitOverStatisticsOverLogging",
       [] {
         Stack s;
         s.mr = std::make_unique<LimitAdaptor>(
             std::make_unique<StatisticsAdaptor>(std::make_unique<LoggingAdaptor>(host(), *s.log)),
             kLimit);
         return s;
       }},
      // Slots of 16 KiB: the suite's small blocks take slots, its larger ones pass through.
      {"SlotPool",
       [] {
         return Stack{.mr = std::make_unique<SlotPool>(
                          host(), SlotPoolOptions{.slot_bytes = 16_KiB, .slots_per_chunk = 32})};
       }},
      {"StatisticsOverSlotPoolOverLogging",
       [] {
         Stack s;
         s.mr = std::make_unique<StatisticsAdaptor>(std::make_unique<SlotPool>(
             std::make_unique<LoggingAdaptor>(host(), *s.log),
             SlotPoolOptions{.slot_bytes = 4_KiB, .slots_per_chunk = 64}));
         return s;
       }},
      {"StatisticsOverLimit",
       [] {
         return Stack{.mr = std::make_unique<StatisticsAdaptor>(
                          std::make_unique<LimitAdaptor>(host(), kLimit))};
       }},
#ifdef LEMA_FAKE_CUDA_DRIVER
      // Pinned host memory and the pinned staging pool, over the fake driver.
      {"PinnedHost", [] { return Stack{.mr = runtime::make_pinned_host_resource(fake_driver())}; }},
      {"PinnedHostPool",
       [] {
         return Stack{.mr = runtime::make_pinned_host_pool(
                          SlotPoolOptions{.slot_bytes = 16_KiB, .slots_per_chunk = 32},
                          fake_driver())};
       }},
      {"LimitOverStatisticsOverPinnedHostPool",
       [] {
         return Stack{.mr = std::make_unique<LimitAdaptor>(
                          std::make_unique<StatisticsAdaptor>(runtime::make_pinned_host_pool(
                              SlotPoolOptions{.slot_bytes = 4_KiB, .slots_per_chunk = 64},
                              fake_driver())),
                          kLimit)};
       }},
#endif
#if defined(LEMA_FAKE_CUDA_DRIVER) && defined(LEMA_TEST_DEVICE_VMM)
      // Device memory from the driver's virtual memory management, over the fake driver (whose
      // device memory the host can touch). Each block takes a 2 MiB granule, so the fake gets
      // room for the suite's 512 live blocks.
      {"DeviceVmm",
       [] {
         static test::FakeCudaControl control(LEMA_FAKE_CUDA_DRIVER);
         control.configure("memory", static_cast<long long>(4_GiB));
         return Stack{.mr = std::make_unique<cuda::DeviceVmmResource>(
                          cuda::DeviceVmmOptions{.driver_library = LEMA_FAKE_CUDA_DRIVER})};
       }},
      {"StatisticsOverDeviceVmm",
       [] {
         static test::FakeCudaControl control(LEMA_FAKE_CUDA_DRIVER);
         control.configure("memory", static_cast<long long>(4_GiB));
         return Stack{.mr = std::make_unique<StatisticsAdaptor>(
                          std::make_unique<cuda::DeviceVmmResource>(cuda::DeviceVmmOptions{
                              .driver_library = LEMA_FAKE_CUDA_DRIVER, .budget_bytes = 2_GiB}))};
       }},
#endif
  };
}

class MemoryResourceConformance : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { stack_ = GetParam().make(); }
  MemoryResource& mr() { return *stack_.mr; }

 private:
  Stack stack_;
};

void fill(void* p, std::size_t bytes, unsigned char value) {
  std::memset(p, value, bytes);
}

bool holds(const void* p, std::size_t bytes, unsigned char value) {
  const auto* c = static_cast<const unsigned char*>(p);
  return std::all_of(c, c + bytes, [&](unsigned char b) { return b == value; });
}

TEST_P(MemoryResourceConformance, HonoursEveryAlignmentFrom1To4096) {
  for (std::size_t alignment = 1; alignment <= 4096; alignment *= 2) {
    for (std::size_t bytes : {std::size_t{1}, std::size_t{7}, alignment, 3 * alignment + 1}) {
      void* p = mr().allocate(bytes, alignment);
      ASSERT_NE(p, nullptr) << bytes << " bytes, alignment " << alignment;
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % alignment, 0u)
          << bytes << " bytes, alignment " << alignment;
      fill(p, bytes, 0xA5);  // the whole block is writable (ASan checks the bounds)
      EXPECT_TRUE(holds(p, bytes, 0xA5));
      mr().deallocate(p, bytes, alignment);
    }
  }
}

TEST_P(MemoryResourceConformance, ManyLiveBlocksAreDistinctAndDoNotOverlap) {
  std::mt19937 rng(13);
  std::uniform_int_distribution<std::size_t> size(1, 64_KiB);
  struct Block {
    unsigned char* p;
    std::size_t bytes;
  };
  std::vector<Block> blocks;
  for (int i = 0; i < 512; ++i) {
    const std::size_t bytes = size(rng);
    auto* p = static_cast<unsigned char*>(mr().allocate(bytes));
    fill(p, bytes, static_cast<unsigned char>(i));
    blocks.push_back({p, bytes});
  }
  // Each block still holds its own pattern: no later block was placed over it.
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    EXPECT_TRUE(holds(blocks[i].p, blocks[i].bytes, static_cast<unsigned char>(i))) << i;
  }
  std::vector<Block> sorted = blocks;
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.p < b.p; });
  for (std::size_t i = 1; i < sorted.size(); ++i) {
    EXPECT_LE(sorted[i - 1].p + sorted[i - 1].bytes, sorted[i].p) << "blocks overlap";
  }
  for (auto& b : blocks) mr().deallocate(b.p, b.bytes);
}

TEST_P(MemoryResourceConformance, ZeroBytesGivesNullAndNullDeallocateIsANoOp) {
  EXPECT_EQ(mr().allocate(0), nullptr);
  EXPECT_EQ(mr().allocate(0, 64), nullptr);
  mr().deallocate(nullptr, 0);
  mr().deallocate(nullptr, 128, 64);
}

TEST_P(MemoryResourceConformance, IsEqualIsReflexive) {
  EXPECT_TRUE(mr().is_equal(mr()));
}

TEST_P(MemoryResourceConformance, AlignmentNotAPowerOfTwoThrowsInvalidArgument) {
  for (std::size_t alignment :
       {std::size_t{0}, std::size_t{3}, std::size_t{24}, std::size_t{4097}}) {
    try {
      void* p = mr().allocate(64, alignment);
      mr().deallocate(p, 64, alignment);
      ADD_FAILURE() << "alignment " << alignment << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("alignment " + std::to_string(alignment)),
                std::string::npos)
          << e.what();
    }
  }
}

TEST_P(MemoryResourceConformance, FourThreadsAllocateAndFreeConcurrently) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 2000;
  std::vector<std::thread> threads;
  std::vector<int> corrupted(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      std::uniform_int_distribution<std::size_t> size(1, 8_KiB);
      std::uniform_int_distribution<int> shift(0, 8);
      std::vector<std::pair<void*, std::pair<std::size_t, std::size_t>>> live;
      for (int i = 0; i < kRounds; ++i) {
        const std::size_t bytes = size(rng);
        const std::size_t alignment = std::size_t{8} << shift(rng);
        void* p = mr().allocate(bytes, alignment);
        if (reinterpret_cast<std::uintptr_t>(p) % alignment != 0) ++corrupted[t];
        fill(p, bytes, static_cast<unsigned char>(t + 1));
        live.push_back({p, {bytes, alignment}});
        if (live.size() > 16 || (i % 3 == 0)) {  // free some, keep some live across rounds
          auto [q, sa] = live.front();
          if (!holds(q, sa.first, static_cast<unsigned char>(t + 1))) ++corrupted[t];
          mr().deallocate(q, sa.first, sa.second);
          live.erase(live.begin());
        }
      }
      for (auto& [q, sa] : live) {
        if (!holds(q, sa.first, static_cast<unsigned char>(t + 1))) ++corrupted[t];
        mr().deallocate(q, sa.first, sa.second);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(corrupted[t], 0) << "thread " << t;
}

INSTANTIATE_TEST_SUITE_P(Stacks, MemoryResourceConformance, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace lema::allocator
