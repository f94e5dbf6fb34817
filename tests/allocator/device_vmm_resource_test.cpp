// DeviceVmmResource over the fake CUDA driver: mapping and budget, driver failures, stream-
// ordered frees, pause/resume of tags, and bad frees.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "lema/allocator/cuda/device_vmm_resource.hpp"
#include "lema/allocator/limit_adaptor.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "test_backends.hpp"

namespace lema::allocator::cuda {
namespace {

using test::fake;
using test::FakeMapping;

constexpr std::uint64_t kGranule = 2_MiB;  // the fake's default granularity
constexpr int kInvalidValue = 1;           // CUDA_ERROR_INVALID_VALUE
constexpr int kOutOfMemory = 2;            // CUDA_ERROR_OUT_OF_MEMORY

DeviceVmmOptions options(std::uint64_t budget) {
  return {.driver_library = test::fake_cuda_driver_path(), .budget_bytes = budget};
}

// Device memory in use, as the fake driver counts it (cuMemGetInfo through its table).
std::uint64_t device_used() {
  using GetInfo = int (*)(std::size_t*, std::size_t*);
  static GetInfo fn = [] {
    void* lib = ::dlopen(test::fake_cuda_driver_path().c_str(), RTLD_NOW | RTLD_LOCAL);
    using Get = int (*)(const char*, void**, int, unsigned long long, int*);
    void* sym = nullptr;
    int status = 0;
    auto get = reinterpret_cast<Get>(::dlsym(lib, "cuGetProcAddress_v2"));
    get("cuMemGetInfo", &sym, 13000, 0, &status);
    return reinterpret_cast<GetInfo>(sym);
  }();
  std::size_t free = 0, total = 0;
  EXPECT_EQ(fn(&free, &total), 0);
  return total - free;
}

// Polls until the resource has no pending free (the fake's stream must be running).
void drain(DeviceVmmResource& mr) {
  for (int i = 0; i < 10000 && mr.usage().pending_bytes > 0; ++i) {
    mr.reclaim();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ASSERT_EQ(mr.usage().pending_bytes, 0u) << "a pending free never completed";
}

// A compute stream of the test's own, destroyed at the end.
class TestStream {
 public:
  TestStream() : s_(fake().test_stream(nullptr, 1)) {}
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  ~TestStream() {
    fake().hold(s_, false);
    fake().test_stream(s_, 0);
  }
  void* get() const { return s_; }

 private:
  void* s_;
};

class DeviceVmmTest : public test::FakeDriverTest {
 protected:
  void SetUp() override {
    FakeDriverTest::SetUp();
    handles_ = fake().live_handles();
  }
  void TearDown() override {
    EXPECT_EQ(fake().live_handles(), handles_) << "driver handles leaked";
    FakeDriverTest::TearDown();
  }

 private:
  std::uint64_t handles_ = 0;
};

TEST_F(DeviceVmmTest, BlocksAreMappedReadWriteAtGranulesAndUnmappedOnFree) {
  DeviceVmmResource mr(options(8 * kGranule));
  EXPECT_EQ(mr.granularity(), kGranule);
  const std::uint64_t before = device_used();
  void* a = mr.allocate(1);
  void* b = mr.allocate(kGranule + 1);
  EXPECT_EQ(fake().query_mapped(a), FakeMapping::read_write);
  EXPECT_EQ(fake().query_mapped(static_cast<char*>(b) + 2 * kGranule - 1), FakeMapping::read_write);
  EXPECT_EQ(mr.usage().mapped_bytes, 3 * kGranule);
  EXPECT_EQ(device_used() - before, 3 * kGranule);
  mr.deallocate(a, 1);
  mr.deallocate(b, kGranule + 1);
  EXPECT_EQ(fake().query_mapped(a), FakeMapping::reserved);
  EXPECT_EQ(device_used(), before);
  EXPECT_EQ(mr.usage().mapped_bytes, 0u);
}

TEST_F(DeviceVmmTest, OverBudgetThrowsOutOfMemoryWithTheNumbersAndChangesNothing) {
  DeviceVmmResource mr(options(3 * kGranule));
  void* a = mr.allocate(2 * kGranule);
  try {
    mr.allocate(kGranule + 1);
    ADD_FAILURE() << "an allocation over the budget succeeded";
  } catch (const allocator::OutOfMemory& e) {
    EXPECT_EQ(e.requested_bytes(), 2 * kGranule);
    EXPECT_EQ(e.used_bytes(), 2 * kGranule);
    EXPECT_EQ(e.limit_bytes(), 3 * kGranule);
  }
  EXPECT_EQ(mr.usage().mapped_bytes, 2 * kGranule);
  void* b = mr.allocate(kGranule);  // what fits still does
  mr.deallocate(b, kGranule);
  mr.deallocate(a, 2 * kGranule);
}

TEST_F(DeviceVmmTest, DriverFailuresUndoEverythingAndTheNextAllocationWorks) {
  DeviceVmmResource mr(options(8 * kGranule));
  const std::uint64_t handles = fake().live_handles();
  for (const char* entry : {"cuMemCreate", "cuMemMap", "cuMemSetAccess"}) {
    fake().fail(entry, 1, kInvalidValue);
    EXPECT_THROW(mr.allocate(100), runtime::CudaError) << entry;
    EXPECT_EQ(fake().live_handles(), handles) << entry;
    EXPECT_EQ(mr.usage().mapped_bytes, 0u) << entry;
  }
  fake().fail("cuMemCreate", 1, kOutOfMemory);
  EXPECT_THROW(mr.allocate(100), lema::OutOfMemory);
  void* p = mr.allocate(100);
  EXPECT_EQ(fake().query_mapped(p), FakeMapping::read_write);
  mr.deallocate(p, 100);
}

// Note [Stream-ordered frees]: memory freed on a stream with work pending on it is neither
// unmapped (the fake counts unmapping memory a pending kernel uses as misuse) nor handed out
// again before the event recorded at the free completes, and no stream is synchronized.
TEST_F(DeviceVmmTest, StreamFreeIsNotReusedBeforeItsEventCompletes) {
  TestStream stream;
  DeviceVmmResource mr(options(8 * kGranule));
  void* a = mr.allocate(4096);
  fake().hold(stream.get(), true);
  ASSERT_EQ(fake().touch(stream.get(), a, 4096), 0);  // a kernel still to run on a
  const std::uint64_t records = fake().calls("cuEventRecord");
  const std::uint64_t syncs = fake().calls("cuStreamSynchronize");
  EXPECT_EQ(mr.deallocate_on_stream(a, 4096, stream.get()), ReleaseStatus::released);
  EXPECT_EQ(fake().calls("cuEventRecord"), records + 1);
  void* b = mr.allocate(4096);
  EXPECT_NE(b, a);
  EXPECT_EQ(fake().query_mapped(a), FakeMapping::read_write);  // still backed for the kernel
  EXPECT_EQ(mr.reclaim(), 0u);
  EXPECT_EQ(mr.usage().pending_bytes, kGranule);
  fake().hold(stream.get(), false);
  drain(mr);
  EXPECT_EQ(fake().calls("cuStreamSynchronize"), syncs);
  EXPECT_EQ(fake().query_mapped(a), FakeMapping::reserved);
  void* c = mr.allocate(4096);
  EXPECT_EQ(c, a);  // the lowest addresses again, now that the event completed
  mr.deallocate(b, 4096);
  mr.deallocate(c, 4096);
}

TEST_F(DeviceVmmTest, FullBudgetWaitsForThePendingFreeInsteadOfFailing) {
  TestStream stream;
  DeviceVmmResource mr(options(kGranule));
  void* a = mr.allocate(4096);
  fake().hold(stream.get(), true);
  ASSERT_EQ(fake().touch(stream.get(), a, 4096), 0);
  mr.deallocate_on_stream(a, 4096, stream.get());
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    fake().hold(stream.get(), false);
  });
  void* b = mr.allocate(4096);  // waits for the event, then reuses the memory
  release.join();
  EXPECT_EQ(b, a);
  mr.deallocate(b, 4096);
}

TEST_F(DeviceVmmTest, FullRangeWaitsForThePendingFreeThatHoldsAddresses) {
  TestStream stream;
  DeviceVmmOptions o = options(3 * kGranule);
  o.reserve_bytes = 3 * kGranule;
  DeviceVmmResource mr(o);
  void* w = nullptr;
  {
    ScopedTag tag("weights");
    w = mr.allocate(kGranule);
  }
  mr.pause("weights");  // its granule of addresses stays taken
  void* b = mr.allocate(2 * kGranule);
  fake().hold(stream.get(), true);
  ASSERT_EQ(fake().touch(stream.get(), b, 4096), 0);
  mr.deallocate_on_stream(b, 2 * kGranule, stream.get());
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    fake().hold(stream.get(), false);
  });
  void* c = nullptr;
  try {
    c = mr.allocate(kGranule);  // the budget has room; the range only once b is released
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  release.join();
  EXPECT_EQ(c, b);
  mr.deallocate(c, kGranule);
  mr.deallocate(w, kGranule);
}

TEST_F(DeviceVmmTest, PauseReleasesPhysicalMemoryAndResumeMapsTheSameAddresses) {
  DeviceVmmResource mr(options(16 * kGranule));
  std::vector<void*> weights;
  {
    ScopedTag tag("weights");
    weights.push_back(mr.allocate(kGranule));
    weights.push_back(mr.allocate(3 * kGranule));
  }
  void* kv = nullptr;
  {
    ScopedTag tag("kv");
    kv = mr.allocate(kGranule);
  }
  void* plain = mr.allocate(100);
  EXPECT_EQ(current_tag(), "");
  const std::uint64_t used = device_used();

  mr.pause("weights");
  EXPECT_TRUE(mr.paused("weights"));
  EXPECT_EQ(used - device_used(), 4 * kGranule);
  EXPECT_EQ(mr.usage().paused_bytes, 4 * kGranule);
  EXPECT_EQ(mr.usage().mapped_bytes, 2 * kGranule);
  for (void* p : weights) EXPECT_EQ(fake().query_mapped(p), FakeMapping::reserved);
  EXPECT_EQ(fake().query_mapped(kv), FakeMapping::read_write);
  EXPECT_EQ(fake().query_mapped(plain), FakeMapping::read_write);

  // Other allocations do not take the paused addresses.
  void* other = mr.allocate(kGranule);
  for (void* p : weights) EXPECT_NE(other, p);
  mr.deallocate(other, kGranule);

  mr.resume("weights");
  EXPECT_FALSE(mr.paused("weights"));
  EXPECT_EQ(device_used(), used);
  for (void* p : weights) EXPECT_EQ(fake().query_mapped(p), FakeMapping::read_write);
  std::memset(weights[1], 7, 3 * kGranule);  // the whole block is backed again

  mr.deallocate(weights[0], kGranule);
  mr.deallocate(weights[1], 3 * kGranule);
  mr.deallocate(kv, kGranule);
  mr.deallocate(plain, 100);
}

TEST_F(DeviceVmmTest, PauseKeepingContentsRestoresTheBytes) {
  DeviceVmmResource mr(options(8 * kGranule));
  void* p = nullptr;
  {
    ScopedTag tag("weights");
    p = mr.allocate(2 * kGranule);
  }
  std::vector<unsigned char> pattern(2 * kGranule);
  for (std::size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<unsigned char>(i * 31);
  std::memcpy(p, pattern.data(), pattern.size());  // the fake's device memory is host memory
  mr.pause("weights", /*keep_contents=*/true);
  EXPECT_EQ(fake().query_mapped(p), FakeMapping::reserved);
  mr.resume("weights");
  EXPECT_EQ(std::memcmp(p, pattern.data(), pattern.size()), 0);
  mr.deallocate(p, 2 * kGranule);
}

TEST_F(DeviceVmmTest, PauseAndResumeMisuseGiveInvalidArgumentNamingTheTag) {
  DeviceVmmResource mr(options(8 * kGranule));
  auto expect_invalid = [](auto&& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_invalid([&] { mr.pause("nope"); }, "'nope', which no allocation carries");
  expect_invalid([&] { mr.pause(""); }, "empty tag");
  void* p = nullptr;
  {
    ScopedTag tag("weights");
    p = mr.allocate(10);
  }
  expect_invalid([&] { mr.resume("weights"); }, "'weights', which is not paused");
  mr.pause("weights");
  expect_invalid([&] { mr.pause("weights"); }, "already paused");
  {
    ScopedTag tag("weights");
    expect_invalid([&] { mr.allocate(10); }, "'weights', which is paused");
  }
  // A paused block may be freed: its addresses go, nothing is unmapped twice.
  mr.deallocate(p, 10);
  mr.resume("weights");  // nothing left to map; the tag is live again
  EXPECT_FALSE(mr.paused("weights"));
}

TEST_F(DeviceVmmTest, ResumeOverBudgetThrowsAndStaysPaused) {
  DeviceVmmResource mr(options(2 * kGranule));
  void* w = nullptr;
  {
    ScopedTag tag("weights");
    w = mr.allocate(2 * kGranule);
  }
  mr.pause("weights");
  void* other = mr.allocate(kGranule);
  EXPECT_THROW(mr.resume("weights"), allocator::OutOfMemory);
  EXPECT_TRUE(mr.paused("weights"));
  EXPECT_EQ(fake().query_mapped(w), FakeMapping::reserved);
  mr.deallocate(other, kGranule);
  mr.resume("weights");
  EXPECT_EQ(fake().query_mapped(w), FakeMapping::read_write);
  mr.deallocate(w, 2 * kGranule);
}

TEST_F(DeviceVmmTest, FreeOfAnUnknownPointerIsOneLineAndNoCrash) {
  DeviceVmmResource mr(options(4 * kGranule));
  void* p = mr.allocate(64);
  mr.deallocate(p, 64);
  ::testing::internal::CaptureStderr();
  mr.deallocate(p, 64);  // double free
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("not a live allocation"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_EQ(mr.deallocate_on_stream(p, 64, nullptr), ReleaseStatus::unknown_pointer);
  void* q = mr.allocate(64);
  EXPECT_EQ(mr.deallocate_on_stream(q, 65, nullptr), ReleaseStatus::size_mismatch);
  drain(mr);
}

TEST_F(DeviceVmmTest, ReserveSmallerThanBudgetIsRefused) {
  DeviceVmmOptions o = options(8 * kGranule);
  o.reserve_bytes = 2 * kGranule;
  EXPECT_THROW(DeviceVmmResource{o}, InvalidArgument);
}

}  // namespace
}  // namespace lema::allocator::cuda
