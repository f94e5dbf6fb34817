// CUPTI's unified-memory counters over the managed backend, with the fake driver and the fake
// CUPTI: GPU faults and migrations at known addresses reach the pager whose range holds them,
// with their pages; records elsewhere reach no pager; a CUPTI that refuses leaves paging as it
// was; and the counters and events travel through the profiler to its report.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <vector>

#include "fake_cuda_control.hpp"
#include "fake_cupti_control.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/cuda_backend.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/profile.hpp"
#include "lema/runtime/profile_file.hpp"
#include "pager_fixture.hpp"
#include "prof_report.hpp"
#include "test_backends.hpp"
#include "uvm_counters.hpp"

namespace lema::test {
namespace {

using runtime::CudaBackendOptions;
using runtime::Event;
using runtime::EventKind;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PagerStats;

// CUpti_ActivityUnifiedMemoryCounterKind values (the test does not include <cupti.h>).
constexpr int kCpuPageFaultCount = 3;
constexpr int kGpuPageFault = 4;

/// The fake CUPTI: $LEMA_CUPTI_LIBRARY (ctest sets it), else the one built beside the tests.
std::string fake_cupti_path() {
  const char* env = std::getenv("LEMA_CUPTI_LIBRARY");
  return env != nullptr && *env != '\0' ? env : LEMA_FAKE_CUPTI_LIBRARY;
}

FakeCuptiControl& cupti() {
  static auto* control = new FakeCuptiControl(fake_cupti_path());
  return *control;
}

// The fake driver's controls (test_backends.hpp).
FakeCudaControl& driver() { return fake(); }

// The runtime loads what LEMA_CUPTI_LIBRARY names: the fake, also when the binary is run
// directly.
class FakeCuptiEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { ::setenv("LEMA_CUPTI_LIBRARY", fake_cupti_path().c_str(), 0); }
};
const auto* const kEnvironment = ::testing::AddGlobalTestEnvironment(new FakeCuptiEnvironment());

CudaBackendOptions managed_options() {
  CudaBackendOptions o = fake_options();
  o.granularity = kPage;
  return o;
}

// Sets a fake-CUPTI setting for the scope of a test.
class CuptiSetting {
 public:
  CuptiSetting(const char* key, long long value) : key_(key), old_(cupti().configure(key, value)) {}
  CuptiSetting(const CuptiSetting&) = delete;
  CuptiSetting& operator=(const CuptiSetting&) = delete;
  ~CuptiSetting() { cupti().configure(key_, old_); }

 private:
  const char* key_;
  long long old_;
};

std::vector<Event> events_of(const Pager& pager, EventKind kind) {
  std::vector<Event> out;
  for (const Event& e : pager.events().snapshot())
    if (e.kind == kind) out.push_back(e);
  return out;
}

PagerOptions small_budget() {
  PagerOptions opt;
  opt.budget_bytes = 3 * kPage;
  return opt;
}

// Every test leaves both fakes unmisused and, once its pagers are gone, CUPTI disabled with
// every buffer handed back.
class UvmCounters : public ::testing::Test {
 protected:
  void SetUp() override {
    cupti_misuses_ = cupti().misuse_count();
    driver_misuses_ = driver().misuse_count();
  }
  void TearDown() override {
    EXPECT_EQ(cupti().misuse_count(), cupti_misuses_) << cupti().last_misuse();
    EXPECT_EQ(driver().misuse_count(), driver_misuses_) << driver().last_misuse();
    EXPECT_FALSE(cupti().enabled()) << "CUPTI left enabled after the last pager";
    EXPECT_EQ(cupti().count("held"), 0u) << "a CUPTI buffer was never handed back";
    EXPECT_EQ(cupti().count("enables"), cupti().count("disables"));
  }

 private:
  std::uint64_t cupti_misuses_ = 0;
  std::uint64_t driver_misuses_ = 0;
};

// First: the process's profile segment is made once, by the first pager, if LEMA_PROFILE is set
// then (ctest runs each test in a process of its own).
TEST_F(UvmCounters, ProfileCarriesTheDriversCountersToTheReport) {
  ::setenv(runtime::kProfileEnv, "unused-the-recorder-saves", 1);
  ::setenv(runtime::kProfileRecorderEnv, std::to_string(::getpid()).c_str(), 1);
  tools::ProfileCollector collector(static_cast<std::uint64_t>(::getpid()));
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm-prof");
  PagerStats stats;
  {
    Pager pager(m.space, small_budget());
    for (const auto* t : tensor_order(m.space.layout(), Order::layer, 0))
      check_tensor(pager, m, *t, false);
    ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(1) + 10, 3));
    ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(4), 2));
    ASSERT_TRUE(cupti().emit_migration(true, m.space.page_address(2), 2 * kPage));
    ASSERT_TRUE(cupti().emit_migration(false, m.space.page_address(6), kPage));
    pager.mark_step();
    collector.poll();
    stats = pager.stats();
  }
  runtime::Recording rec = collector.finish();
  ::unsetenv(runtime::kProfileEnv);
  ::unsetenv(runtime::kProfileRecorderEnv);
  ASSERT_EQ(rec.sources.size(), 1u);
  EXPECT_EQ(rec.sources[0].uvm_counters, "on");
  ASSERT_EQ(stats.gpu_faults, 5u);

  TempDir dir("uvm-prof");
  runtime::save_recording(rec, dir.path() / "run.lprof");
  const runtime::Recording loaded = runtime::load_recording(dir.path() / "run.lprof");
  const auto& c = loaded.sources.at(0).counters;
  EXPECT_EQ(c.gpu_faults, stats.gpu_faults);
  EXPECT_EQ(c.migrated_to_device_bytes, stats.migrated_to_device_bytes);
  EXPECT_EQ(c.migrated_to_host_bytes, stats.migrated_to_host_bytes);
  EXPECT_EQ(c.uvm_counters, "on");
  std::map<EventKind, std::vector<runtime::ProfileEvent>> by_kind;
  for (const auto& e : loaded.events) by_kind[e.kind].push_back(e);
  ASSERT_EQ(by_kind[EventKind::gpu_fault].size(), 2u);
  EXPECT_EQ(
      by_kind[EventKind::gpu_fault][0].first_page + by_kind[EventKind::gpu_fault][1].first_page,
      1u + 4u);
  ASSERT_EQ(by_kind[EventKind::migrate_to_device].size(), 1u);
  EXPECT_EQ(by_kind[EventKind::migrate_to_device][0].first_page, 2u);
  EXPECT_EQ(by_kind[EventKind::migrate_to_device][0].page_count, 2u);
  ASSERT_EQ(by_kind[EventKind::migrate_to_host].size(), 1u);
  EXPECT_EQ(by_kind[EventKind::migrate_to_host][0].first_page, 6u);

  const tools::ProfileSummary s = tools::summarize(loaded, 50);
  EXPECT_TRUE(s.unified_memory());
  EXPECT_EQ(s.counters.gpu_faults, 5u);
  std::uint64_t by_layer = 0;
  for (const auto& row : s.layers) by_layer += row.gpu_faults;
  EXPECT_EQ(by_layer, 5u) << "every GPU fault is attributed to the layer of its page";
  const std::string text = tools::format_summary(s);
  EXPECT_NE(text.find("GPU page faults"), std::string::npos) << text;
  const auto j = tools::summary_json(s);
  EXPECT_EQ(j["gpu_faults"].get<std::uint64_t>(), 5u);
  EXPECT_EQ(j["migrated_to_device_bytes"].get<std::uint64_t>(), 2 * kPage);
  std::ostringstream trace;
  tools::write_chrome_trace(loaded, trace);
  const auto t = nlohmann::json::parse(trace.str());
  int gpu = 0, migrations = 0;
  for (const auto& e : t["traceEvents"]) {
    gpu += e["name"] == "GPU fault";
    migrations += e["name"] == "to device" || e["name"] == "to host";
  }
  EXPECT_EQ(gpu, 2);
  EXPECT_EQ(migrations, 2);
}

TEST_F(UvmCounters, FaultsAndMigrationsInTheRangeAreCountedWithTheirPages) {
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm");
  ASSERT_GE(m.pages(), 8u);
  Pager pager(m.space, small_budget());
  ASSERT_EQ(pager.stats().uvm_counters, "on");
  EXPECT_TRUE(cupti().enabled());
  EXPECT_TRUE(cupti().counter_configured(kGpuPageFault));
  for (const auto* t : tensor_order(m.space.layout(), Order::random, 5))
    check_tensor(pager, m, *t, false);
  const PagerStats before = pager.stats();

  const std::uint64_t t0 = runtime::now_ns();
  ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(3) + 100, 2));
  ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(5) + kPage - 1, 1));
  // Two and a half pages from page 2: pages 2, 3 and 4.
  ASSERT_TRUE(cupti().emit_migration(true, m.space.page_address(2), 5 * kPage / 2));
  ASSERT_TRUE(cupti().emit_migration(false, m.space.page_address(6), 4096));
  const bool cpu = cupti().counter_configured(kCpuPageFaultCount);
  EXPECT_EQ(cupti().emit_cpu_fault(m.space.page_address(7)), cpu);
  pager.mark_step();  // delivers what CUPTI holds
  const std::uint64_t t1 = runtime::now_ns();

  const PagerStats st = pager.stats();
  EXPECT_EQ(st.gpu_faults - before.gpu_faults, 3u);
  EXPECT_EQ(st.migrated_to_device_bytes - before.migrated_to_device_bytes, 5 * kPage / 2);
  EXPECT_EQ(st.migrated_to_host_bytes - before.migrated_to_host_bytes, 4096u);
  EXPECT_EQ(st.cpu_faults - before.cpu_faults, cpu ? 1u : 0u);
  // The pager's own counters are untouched by the driver's.
  EXPECT_EQ(st.faults, before.faults);
  EXPECT_EQ(st.bytes_read, before.bytes_read);

  std::map<runtime::PageId, std::uint64_t> faults_by_page;
  for (const Event& e : events_of(pager, EventKind::gpu_fault)) {
    faults_by_page[e.first_page] += e.bytes;
    EXPECT_EQ(e.page_count, 1u);
    // CUPTI's clock is not the steady clock: the times are converted.
    EXPECT_GE(e.time_ns + 1'000'000'000, t0);
    EXPECT_LE(e.time_ns, t1 + 1'000'000'000);
    EXPECT_GT(e.duration_ns, 0u);
  }
  EXPECT_EQ(faults_by_page, (std::map<runtime::PageId, std::uint64_t>{{3, 2}, {5, 1}}));
  const auto to_device = events_of(pager, EventKind::migrate_to_device);
  ASSERT_EQ(to_device.size(), 1u);
  EXPECT_EQ(to_device[0].first_page, 2u);
  EXPECT_EQ(to_device[0].page_count, 3u);
  EXPECT_EQ(to_device[0].bytes, 5 * kPage / 2);
  const auto to_host = events_of(pager, EventKind::migrate_to_host);
  ASSERT_EQ(to_host.size(), 1u);
  EXPECT_EQ(to_host[0].first_page, 6u);
  EXPECT_EQ(to_host[0].page_count, 1u);
}

TEST_F(UvmCounters, RecordsOutsideTheRangeReachNoPager) {
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage,
                "uvm-outside");
  Pager pager(m.space, small_budget());
  const std::byte* begin = m.space.base();
  const std::byte* end = m.space.base() + m.pages() * kPage;
  const runtime::UvmCounterTotals before = runtime::uvm_counter_totals();
  std::vector<std::byte> elsewhere(4096);
  ASSERT_TRUE(cupti().emit_gpu_faults(elsewhere.data(), 5));
  ASSERT_TRUE(cupti().emit_gpu_faults(end, 1));  // one past the last page
  ASSERT_TRUE(cupti().emit_gpu_faults(begin - 1, 1));
  ASSERT_TRUE(cupti().emit_migration(true, end + kPage, 4 * kPage));
  ASSERT_TRUE(cupti().emit_migration(false, begin - 2 * kPage, 2 * kPage));  // ends at the base
  // Straddling the start: only the part inside is the pager's, on page 0.
  ASSERT_TRUE(cupti().emit_migration(true, begin - 4096, 4096 + kPage));
  pager.mark_step();
  const PagerStats st = pager.stats();
  EXPECT_EQ(st.gpu_faults, 0u);
  EXPECT_EQ(st.migrated_to_host_bytes, 0u);
  EXPECT_EQ(st.migrated_to_device_bytes, kPage);
  EXPECT_TRUE(events_of(pager, EventKind::gpu_fault).empty());
  const auto in = events_of(pager, EventKind::migrate_to_device);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].first_page, 0u);
  EXPECT_EQ(in[0].page_count, 1u);
  const runtime::UvmCounterTotals after = runtime::uvm_counter_totals();
  EXPECT_EQ(after.records - before.records, 6u);
  EXPECT_EQ(after.outside - before.outside, 5u) << "records in no range are counted";
  EXPECT_EQ(after.delivered - before.delivered, 1u);
}

TEST_F(UvmCounters, RefusedCountersLeavePagingAsItWas) {
  CuptiSetting refuse("refuse", 1);
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage,
                "uvm-refused");
  Pager pager(m.space, small_budget());
  const PagerStats first = pager.stats();
  EXPECT_NE(first.uvm_counters, "on");
  EXPECT_NE(first.uvm_counters.find("CUPTI_ERROR_NOT_SUPPORTED"), std::string::npos)
      << first.uvm_counters;
  EXPECT_NE(first.uvm_counters.find("cuptiActivityConfigureUnifiedMemoryCounter"),
            std::string::npos)
      << first.uvm_counters;
  EXPECT_FALSE(cupti().enabled());
  for (int pass = 0; pass < 2; ++pass)
    for (const auto* t : tensor_order(m.space.layout(), Order::layer, 0))
      check_tensor(pager, m, *t, false);
  EXPECT_FALSE(cupti().emit_gpu_faults(m.space.page_address(1), 1))
      << "CUPTI collects nothing while its counters are off";
  pager.mark_step();
  const PagerStats st = pager.stats();
  EXPECT_EQ(st.gpu_faults, 0u);
  EXPECT_GT(st.faults, 0u);
  EXPECT_GT(st.evictions, 0u);
  EXPECT_LE(st.peak_resident_bytes, 3 * kPage);
  EXPECT_EQ(st.uvm_counters, first.uvm_counters);
}

TEST_F(UvmCounters, MissingLibraryIsNamedInTheReason) {
  const std::string saved = fake_cupti_path();
  ::setenv("LEMA_CUPTI_LIBRARY", "/nonexistent/libcupti.so.13", 1);
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage,
                "uvm-missing");
  std::string status;
  {
    Pager pager(m.space, small_budget());
    for (const auto* t : tensor_order(m.space.layout(), Order::reverse, 0))
      check_tensor(pager, m, *t, false);
    status = pager.stats().uvm_counters;
  }
  ::setenv("LEMA_CUPTI_LIBRARY", saved.c_str(), 1);
  EXPECT_NE(status.find("/nonexistent/libcupti.so.13"), std::string::npos) << status;
  EXPECT_NE(status.find("LEMA_CUPTI_LIBRARY"), std::string::npos) << status;
}

TEST_F(UvmCounters, TurnedOffByTheEnvironment) {
  ::setenv("LEMA_UVM_COUNTERS", "0", 1);
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm-off");
  Pager pager(m.space, small_budget());
  const std::string status = pager.stats().uvm_counters;
  ::unsetenv("LEMA_UVM_COUNTERS");
  EXPECT_NE(status.find("LEMA_UVM_COUNTERS"), std::string::npos) << status;
  EXPECT_FALSE(cupti().enabled());
}

TEST_F(UvmCounters, CpuFaultsRefusedAloneLeaveTheOthersOn) {
  CuptiSetting refuse("refuse_cpu_faults", 1);
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage,
                "uvm-nocpu");
  Pager pager(m.space, small_budget());
  EXPECT_EQ(pager.stats().uvm_counters, "on");
  EXPECT_FALSE(cupti().counter_configured(kCpuPageFaultCount));
  EXPECT_FALSE(runtime::uvm_counter_totals().cpu_faults);
  EXPECT_FALSE(cupti().emit_cpu_fault(m.space.page_address(0)));
  ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(0), 1));
  EXPECT_EQ(pager.stats().gpu_faults, 1u);
}

TEST_F(UvmCounters, HostBackendHasNoUnifiedMemory) {
  OpenedModel m(runtime::make_host_backend(kPage), small_model(), kPage, "uvm-host");
  Pager pager(m.space, small_budget());
  EXPECT_EQ(pager.stats().uvm_counters, "");
  EXPECT_FALSE(cupti().enabled());
}

TEST_F(UvmCounters, TwoPagersEachSeeOnlyTheirOwnRange) {
  OpenedModel a(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm-a");
  OpenedModel b(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm-b");
  const std::uint64_t starts = runtime::uvm_counter_totals().starts;
  Pager pa(a.space, small_budget());
  Pager pb(b.space, small_budget());
  EXPECT_EQ(runtime::uvm_counter_totals().starts, starts + 1) << "one collector for both";
  ASSERT_EQ(pa.stats().uvm_counters, "on");
  ASSERT_EQ(pb.stats().uvm_counters, "on");
  ASSERT_TRUE(cupti().emit_gpu_faults(a.space.page_address(1), 4));
  ASSERT_TRUE(cupti().emit_gpu_faults(b.space.page_address(2), 7));
  ASSERT_TRUE(cupti().emit_migration(true, a.space.page_address(3), kPage));
  ASSERT_TRUE(cupti().emit_migration(true, b.space.page_address(0), 3 * kPage));
  pa.mark_step();
  const PagerStats sa = pa.stats(), sb = pb.stats();
  EXPECT_EQ(sa.gpu_faults, 4u);
  EXPECT_EQ(sb.gpu_faults, 7u);
  EXPECT_EQ(sa.migrated_to_device_bytes, kPage);
  EXPECT_EQ(sb.migrated_to_device_bytes, 3 * kPage);
  const auto fa = events_of(pa, EventKind::gpu_fault);
  const auto fb = events_of(pb, EventKind::gpu_fault);
  ASSERT_EQ(fa.size(), 1u);
  ASSERT_EQ(fb.size(), 1u);
  EXPECT_EQ(fa[0].first_page, 1u);
  EXPECT_EQ(fb[0].first_page, 2u);
  // A third pager over a's range would count a's records twice: it is refused, with the reason.
  const std::string refused = Pager(a.space, small_budget()).stats().uvm_counters;
  EXPECT_NE(refused.find("already counted"), std::string::npos) << refused;
  EXPECT_EQ(pa.stats().uvm_counters, "on");
}

// The pager's destructor flushes before its range goes: records completed before it count for
// it, not as outside. Then CUPTI stops with the last pager and starts again with the next.
TEST_F(UvmCounters, LastRecordsReachThePagerAndCuptiStopsWithIt) {
  CuptiSetting on_flush_only("period_us", 0);
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm-stop");
  const runtime::UvmCounterTotals before = runtime::uvm_counter_totals();
  {
    Pager pager(m.space, small_budget());
    ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(2), 1));
    EXPECT_EQ(cupti().count("pending"), 1u) << "held by CUPTI until a flush";
  }
  const runtime::UvmCounterTotals after = runtime::uvm_counter_totals();
  EXPECT_EQ(after.delivered - before.delivered, 1u);
  EXPECT_EQ(after.outside, before.outside);
  EXPECT_FALSE(after.running);
  EXPECT_FALSE(cupti().enabled());
  EXPECT_FALSE(cupti().emit_gpu_faults(m.space.page_address(2), 1));
  Pager next(m.space, small_budget());
  EXPECT_EQ(next.stats().uvm_counters, "on");
  EXPECT_EQ(runtime::uvm_counter_totals().starts, after.starts + 1);
  ASSERT_TRUE(cupti().emit_gpu_faults(m.space.page_address(2), 1));
  EXPECT_EQ(next.stats().gpu_faults, 1u);
}

// CUPTI's thread delivers while pagers come and go and others read their stats: every record is
// either given to the pager that was subscribed, or counted outside; nothing is lost, nothing
// reaches a pager that is gone (the sanitizers watch the latter).
TEST_F(UvmCounters, DeliveriesRaceWithPagersComingAndGoing) {
  CuptiSetting fast("period_us", 50);
  OpenedModel m(runtime::make_managed_backend(managed_options()), small_model(), kPage, "uvm-race");
  const runtime::UvmCounterTotals before = runtime::uvm_counter_totals();
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> emitted{0};
  Pager anchor(m.space, small_budget());  // keeps CUPTI running between the others
  OpenedModel other(runtime::make_managed_backend(managed_options()), small_model(), kPage,
                    "uvm-race-b");
  std::thread emitter([&] {
    for (std::uint64_t i = 0; !stop.load(); ++i) {
      const auto& target = i % 2 == 0 ? m : other;
      if (cupti().emit_gpu_faults(target.space.page_address(i % target.pages()), 1)) ++emitted;
      if (i % 16 == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  });
  std::uint64_t counted = 0;
  for (int round = 0; round < 40; ++round) {
    Pager p(other.space, small_budget());
    check_tensor(p, other, other.space.layout().tensors()[round % 4], false);
    counted += p.stats().gpu_faults;
  }
  stop = true;
  emitter.join();
  anchor.mark_step();
  const runtime::UvmCounterTotals after = runtime::uvm_counter_totals();
  const std::uint64_t anchor_faults = anchor.stats().gpu_faults;
  EXPECT_GT(emitted.load(), 0u);
  EXPECT_EQ(after.records - before.records, emitted.load());
  EXPECT_EQ(after.delivered + after.outside - before.delivered - before.outside, emitted.load());
  EXPECT_LE(counted + anchor_faults, after.delivered - before.delivered);
  EXPECT_GT(anchor_faults, 0u);
}

}  // namespace
}  // namespace lema::test
