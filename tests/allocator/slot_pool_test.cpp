// What SlotPool adds to the contract: few upstream allocations, slots reused, its own limit, and
// every chunk given back when it goes.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "lema/allocator/host_memory_resource.hpp"
#include "lema/allocator/limit_adaptor.hpp"
#include "lema/allocator/slot_pool.hpp"
#include "lema/allocator/statistics_adaptor.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::allocator {
namespace {

// Host memory that reports its live blocks to a counter the test keeps, so what the pool gave
// back can be checked after the pool (which owns it) is gone.
class CountingResource final : public MemoryResource {
 public:
  explicit CountingResource(std::atomic<int>& live, std::atomic<int>& calls)
      : live_(live), calls_(calls) {}

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    void* p = host_.allocate(bytes, alignment);
    live_.fetch_add(1);
    calls_.fetch_add(1);
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override {
    live_.fetch_sub(1);
    host_.deallocate(p, bytes, alignment);
  }
  HostMemoryResource host_;
  std::atomic<int>& live_;
  std::atomic<int>& calls_;
};

TEST(SlotPool, ManySlotsComeFromFewUpstreamAllocationsAllGivenBack) {
  std::atomic<int> live{0}, calls{0};
  {
    SlotPool pool(std::make_unique<CountingResource>(live, calls),
                  SlotPoolOptions{.slot_bytes = 64_KiB, .slots_per_chunk = 16});
    std::vector<void*> slots;
    for (int i = 0; i < 100; ++i) slots.push_back(pool.allocate(64_KiB, 4096));
    EXPECT_EQ(calls.load(), 7);  // ceil(100 / 16)
    EXPECT_EQ(pool.chunk_count(), 7u);
    EXPECT_EQ(std::set<void*>(slots.begin(), slots.end()).size(), 100u);
    for (void* p : slots) pool.deallocate(p, 64_KiB, 4096);
    EXPECT_EQ(pool.free_slots(), 7u * 16u);
    std::vector<void*> again;
    for (int i = 0; i < 112; ++i) again.push_back(pool.allocate(1));  // all from the free list
    EXPECT_EQ(calls.load(), 7);
    for (void* p : again) pool.deallocate(p, 1);
  }
  EXPECT_EQ(live.load(), 0);  // every chunk went back
}

// A slot never given back may still be read by a device: its chunk is leaked, not freed, and
// only the chunks whose every slot came back are returned to the upstream.
TEST(SlotPool, AChunkWithASlotStillOutIsLeakedTheOthersGivenBack) {
  std::atomic<int> live{0}, calls{0};
  void* kept = nullptr;
  {
    SlotPool pool(std::make_unique<CountingResource>(live, calls),
                  SlotPoolOptions{.slot_bytes = 4_KiB, .slots_per_chunk = 4});
    std::vector<void*> slots;
    for (int i = 0; i < 12; ++i) slots.push_back(pool.allocate(4_KiB, 4096));
    ASSERT_EQ(calls.load(), 3);
    kept = slots[5];  // in the second chunk
    for (void* p : slots) {
      if (p != kept) pool.deallocate(p, 4_KiB, 4096);
    }
  }
  EXPECT_EQ(live.load(), 1);   // the chunk holding the slot still out
  static_cast<unsigned char*>(kept)[0] = 1;  // still writable: its chunk was not freed (ASan)
  std::free(static_cast<unsigned char*>(kept) - 4_KiB);  // the chunk's start (slot 1 of chunk 2)
}

TEST(SlotPool, AFreedSlotIsTheNextHandedOut) {
  SlotPool pool(std::make_unique<HostMemoryResource>(),
                SlotPoolOptions{.slot_bytes = 4_KiB, .slots_per_chunk = 4});
  void* a = pool.allocate(100);
  void* b = pool.allocate(100);
  pool.deallocate(a, 100);
  EXPECT_EQ(pool.allocate(100), a);
  pool.deallocate(a, 100);
  pool.deallocate(b, 100);
}

TEST(SlotPool, RequestsThatDoNotFitASlotPassThrough) {
  std::atomic<int> live{0}, calls{0};
  SlotPool pool(std::make_unique<CountingResource>(live, calls),
                SlotPoolOptions{.slot_bytes = 4_KiB, .slots_per_chunk = 4});
  EXPECT_EQ(pool.slot_alignment(), 4096u);
  void* big = pool.allocate(4_KiB + 1);
  void* aligned = pool.allocate(64, 8192);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(aligned) % 8192, 0u);
  EXPECT_EQ(pool.chunk_count(), 0u);
  EXPECT_EQ(live.load(), 2);
  pool.deallocate(big, 4_KiB + 1);
  pool.deallocate(aligned, 64, 8192);
  EXPECT_EQ(live.load(), 0);
}

TEST(SlotPool, SlotAlignmentIsTheLowestBitOfTheSlotSize) {
  auto pool_of = [](std::size_t slot) {
    return SlotPool(std::make_unique<HostMemoryResource>(),
                    SlotPoolOptions{.slot_bytes = slot, .slots_per_chunk = 1});
  };
  EXPECT_EQ(pool_of(100).slot_alignment(), 4u);
  EXPECT_EQ(pool_of(3 * 1024).slot_alignment(), 1024u);
  EXPECT_EQ(pool_of(2_MiB).slot_alignment(), 4096u);
}

TEST(SlotPool, MaxChunksRefusesWithTheNumbers) {
  SlotPool pool(std::make_unique<HostMemoryResource>(),
                SlotPoolOptions{.slot_bytes = 1_KiB, .slots_per_chunk = 2, .max_chunks = 2});
  std::vector<void*> slots;
  for (int i = 0; i < 4; ++i) slots.push_back(pool.allocate(1_KiB));
  try {
    (void)pool.allocate(512);
    FAIL() << "a fifth slot came from a pool of four";
  } catch (const OutOfMemory& e) {
    EXPECT_EQ(e.requested_bytes(), 512u);
    EXPECT_EQ(e.used_bytes(), 4_KiB);
    EXPECT_EQ(e.limit_bytes(), 4_KiB);
  }
  pool.deallocate(slots.back(), 1_KiB);
  slots.back() = pool.allocate(512);  // a returned slot serves again
  for (void* p : slots) pool.deallocate(p, 1_KiB);
}

TEST(SlotPool, BadOptionsAreNamed) {
  auto host = [] { return std::make_unique<HostMemoryResource>(); };
  EXPECT_THROW(SlotPool(host(), SlotPoolOptions{.slot_bytes = 0, .slots_per_chunk = 4}),
               InvalidArgument);
  EXPECT_THROW(SlotPool(host(), SlotPoolOptions{.slot_bytes = 4096, .slots_per_chunk = 0}),
               InvalidArgument);
  try {
    SlotPool(host(), SlotPoolOptions{.slot_bytes = SIZE_MAX / 2, .slots_per_chunk = 3});
    FAIL() << "an overflowing chunk was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("slots_per_chunk"), std::string::npos) << e.what();
  }
  EXPECT_THROW(SlotPool(nullptr, SlotPoolOptions{.slot_bytes = 64, .slots_per_chunk = 1}),
               InvalidArgument);
}

TEST(SlotPool, FourThreadsGrowingAtOnceTakeNoExtraChunk) {
  std::atomic<int> live{0}, calls{0};
  constexpr std::size_t kPerThread = 64;
  {
    SlotPool pool(std::make_unique<CountingResource>(live, calls),
                  SlotPoolOptions{.slot_bytes = 256, .slots_per_chunk = 32});
    std::vector<std::thread> threads;
    std::vector<std::vector<void*>> held(4);
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (std::size_t i = 0; i < kPerThread; ++i) held[t].push_back(pool.allocate(256));
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(calls.load(), 8);  // 256 slots, 32 a chunk: no chunk taken twice
    for (auto& v : held) {
      for (void* p : v) pool.deallocate(p, 256);
    }
  }
  EXPECT_EQ(live.load(), 0);
}

}  // namespace
}  // namespace lema::allocator
