#include "lema/runtime/events.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace lema::test {
namespace {

using runtime::Event;
using runtime::EventKind;
using runtime::EventRing;

TEST(EventRing, KeepsEventsInOrderUntilFull) {
  EventRing ring(5);  // rounded up to 8
  EXPECT_EQ(ring.capacity(), 8u);
  for (std::uint32_t i = 0; i < 6; ++i) ring.record(Event{i, EventKind::fault, i, 1, i * 10, 7});
  auto events = ring.snapshot();
  ASSERT_EQ(events.size(), 6u);
  for (std::uint32_t i = 0; i < 6; ++i) {
    EXPECT_EQ(events[i].time_ns, i);
    EXPECT_EQ(events[i].first_page, i);
    EXPECT_EQ(events[i].bytes, i * 10);
    EXPECT_EQ(events[i].kind, EventKind::fault);
  }
  EXPECT_EQ(ring.dropped(), 0u);
}

TEST(EventRing, OverwritesTheOldestAndCountsThem) {
  EventRing ring(4);
  for (std::uint32_t i = 0; i < 10; ++i) ring.record(Event{i, EventKind::evict, i, 1, 0, 0});
  EXPECT_EQ(ring.recorded(), 10u);
  EXPECT_EQ(ring.dropped(), 6u);
  auto events = ring.snapshot();
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events.front().first_page, 6u);
  EXPECT_EQ(events.back().first_page, 9u);
  EXPECT_EQ(events.back().kind, EventKind::evict);
  EXPECT_EQ(runtime::event_kind_name(EventKind::prefetch_done), "prefetch_done");
}

TEST(EventRing, ConcurrentWritersAndAReaderSeeOnlyWholeEvents) {
  EventRing ring(64);
  std::atomic<bool> stop{false};
  std::vector<std::thread> writers;
  for (std::uint32_t w = 0; w < 3; ++w) {
    writers.emplace_back([&, w] {
      for (std::uint32_t i = 0; i < 20000; ++i) {
        // Every field derived from one value, so a torn event would be visible.
        const std::uint64_t v = (std::uint64_t{w} << 32) | i;
        ring.record(Event{v, EventKind::hit, static_cast<runtime::PageId>(v), 1, v, v});
      }
    });
  }
  std::thread reader([&] {
    while (!stop) {
      for (const Event& e : ring.snapshot()) {
        ASSERT_EQ(e.bytes, e.time_ns);
        ASSERT_EQ(e.duration_ns, e.time_ns);
        ASSERT_EQ(e.first_page, static_cast<runtime::PageId>(e.time_ns));
      }
    }
  });
  for (auto& t : writers) t.join();
  stop = true;
  reader.join();
  EXPECT_EQ(ring.recorded(), 60000u);
  EXPECT_EQ(ring.dropped(), 60000u - 64u);
  // A writer lapped onto a slot still being written drops its event: at most 64 remain.
  EXPECT_LE(ring.snapshot().size(), 64u);
  EXPECT_GT(ring.snapshot().size(), 0u);
}

}  // namespace
}  // namespace lema::test
