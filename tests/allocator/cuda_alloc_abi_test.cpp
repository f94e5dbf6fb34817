// liblema_cuda_alloc.so through its C ABI, as PyTorch and ctypes use it: dlopen, dlsym, calls,
// over the fake CUDA driver ($LEMA_CUDA_DRIVER). Bad input gives one line on stderr, never a
// crash.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "lema/cuda_alloc.h"
#include "test_backends.hpp"

namespace {

using lema::test::fake;
using lema::test::FakeMapping;

constexpr long long kGranule = 2 << 20;

// The library's entry points, looked up by name as CUDAPluggableAllocator and ctypes do.
struct Abi {
  void* lib = nullptr;
  decltype(&lema_alloc) alloc = nullptr;
  decltype(&lema_free) free = nullptr;
  decltype(&lema_set_tag) set_tag = nullptr;
  decltype(&lema_pause) pause = nullptr;
  decltype(&lema_pause_keeping_contents) pause_keeping = nullptr;
  decltype(&lema_resume) resume = nullptr;
  decltype(&lema_usage) usage = nullptr;
  decltype(&lema_last_error) last_error = nullptr;

  template <typename F>
  void bind(F& f, const char* name) {
    f = reinterpret_cast<F>(::dlsym(lib, name));
  }
  Abi() {
    // The budget is read when device 0's resource is made, on the first allocation.
    ::setenv("LEMA_ALLOC_BUDGET", "16MiB", 1);
    ::setenv("LEMA_CUDA_DRIVER", lema::test::fake_cuda_driver_path().c_str(), 0);
    lib = ::dlopen(LEMA_CUDA_ALLOC_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return;
    bind(alloc, "lema_alloc");
    bind(free, "lema_free");
    bind(set_tag, "lema_set_tag");
    bind(pause, "lema_pause");
    bind(pause_keeping, "lema_pause_keeping_contents");
    bind(resume, "lema_resume");
    bind(usage, "lema_usage");
    bind(last_error, "lema_last_error");
  }
};

Abi& abi() {
  static Abi a;
  return a;
}

unsigned long long mapped(int device = 0) {
  unsigned long long out[4] = {};
  abi().usage(device, out);
  return out[0];
}

// stderr of `f`, and how many lines it has.
template <typename F>
std::string captured(F&& f) {
  ::testing::internal::CaptureStderr();
  f();
  return ::testing::internal::GetCapturedStderr();
}
long lines(const std::string& s) {
  return std::count(s.begin(), s.end(), '\n');
}

class CudaAllocAbi : public lema::test::FakeDriverTest {
 protected:
  void SetUp() override {
    FakeDriverTest::SetUp();
    ASSERT_NE(abi().lib, nullptr) << ::dlerror();
  }
};

TEST_F(CudaAllocAbi, ExportsEveryEntryPoint) {
  EXPECT_NE(abi().alloc, nullptr);
  EXPECT_NE(abi().free, nullptr);
  EXPECT_NE(abi().set_tag, nullptr);
  EXPECT_NE(abi().pause, nullptr);
  EXPECT_NE(abi().pause_keeping, nullptr);
  EXPECT_NE(abi().resume, nullptr);
  EXPECT_NE(abi().usage, nullptr);
  EXPECT_NE(abi().last_error, nullptr);
}

TEST_F(CudaAllocAbi, AllocatesDeviceMemoryAndReusesItAfterAStreamFree) {
  void* p = abi().alloc(1000, 0, nullptr);
  ASSERT_NE(p, nullptr) << abi().last_error();
  EXPECT_EQ(fake().query_mapped(p), FakeMapping::read_write);
  std::memset(p, 1, 1000);
  const unsigned long long held = mapped();
  EXPECT_GE(held, static_cast<unsigned long long>(kGranule));
  abi().free(p, 1000, 0, nullptr);  // the default stream has no work: the event completes
  void* q = abi().alloc(1000, 0, nullptr);
  EXPECT_EQ(q, p);
  EXPECT_EQ(mapped(), held);
  abi().free(q, 1000, 0, nullptr);
}

TEST_F(CudaAllocAbi, SizeZeroGivesNullSilentlyAndNegativeSizesOneLine) {
  EXPECT_TRUE(captured([] { EXPECT_EQ(abi().alloc(0, 0, nullptr), nullptr); }).empty());
  const std::string err = captured([] { EXPECT_EQ(abi().alloc(-5, 0, nullptr), nullptr); });
  EXPECT_NE(err.find("size -5 on device 0 is negative"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  EXPECT_NE(std::string(abi().last_error()).find("negative"), std::string::npos);
}

TEST_F(CudaAllocAbi, UnknownAndDoubleFreesAreOneLineEachAndChangeNothing) {
  void* p = abi().alloc(4096, 0, nullptr);
  ASSERT_NE(p, nullptr);
  const unsigned long long held = mapped();
  int local = 0;
  std::string err = captured([&] { abi().free(&local, 4, 0, nullptr); });
  EXPECT_NE(err.find("not a live allocation"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  EXPECT_EQ(mapped(), held);
  abi().free(p, 4096, 0, nullptr);
  err = captured([&] { abi().free(p, 4096, 0, nullptr); });  // double free
  EXPECT_NE(err.find("double free"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  err = captured([&] { abi().free(p, -1, 0, nullptr); });
  EXPECT_EQ(lines(err), 1) << err;
  err = captured([&] { abi().free(p, 4096, 7, nullptr); });  // a device never used
  EXPECT_NE(err.find("device 7"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  EXPECT_TRUE(captured([] { abi().free(nullptr, 0, 0, nullptr); }).empty());
}

TEST_F(CudaAllocAbi, OverTheBudgetGivesNullWithTheNumbers) {
  void* a = abi().alloc(10 << 20, 0, nullptr);
  ASSERT_NE(a, nullptr) << abi().last_error();
  void* b = nullptr;
  const std::string err = captured([&] { b = abi().alloc(8 << 20, 0, nullptr); });
  EXPECT_EQ(b, nullptr);
  EXPECT_NE(err.find("exceeds the limit of 16 MiB"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  abi().free(a, 10 << 20, 0, nullptr);
}

TEST_F(CudaAllocAbi, BadDeviceOrSettingGivesNullNamingIt) {
  std::string err = captured([] { EXPECT_EQ(abi().alloc(64, 99, nullptr), nullptr); });
  EXPECT_NE(err.find("device 99"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  lema::test::FakeSetting two("devices", 2);
  ::setenv("LEMA_ALLOC_BUDGET", "lots", 1);
  err = captured([] { EXPECT_EQ(abi().alloc(64, 1, nullptr), nullptr); });
  ::setenv("LEMA_ALLOC_BUDGET", "16MiB", 1);
  EXPECT_NE(err.find("LEMA_ALLOC_BUDGET"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
}

TEST_F(CudaAllocAbi, PauseAndResumeATagKeepTheAddresses) {
  ASSERT_EQ(abi().set_tag("weights"), 0);
  void* w = abi().alloc(3 << 20, 0, nullptr);
  ASSERT_EQ(abi().set_tag(nullptr), 0);
  void* plain = abi().alloc(100, 0, nullptr);
  ASSERT_NE(w, nullptr);
  ASSERT_NE(plain, nullptr);
  const unsigned long long held = mapped();
  std::memset(w, 9, 3 << 20);

  ASSERT_EQ(abi().pause_keeping("weights"), 0) << abi().last_error();
  EXPECT_EQ(mapped(), held - 2 * kGranule);
  EXPECT_EQ(fake().query_mapped(w), FakeMapping::reserved);
  EXPECT_EQ(fake().query_mapped(plain), FakeMapping::read_write);
  ASSERT_EQ(abi().resume("weights"), 0) << abi().last_error();
  EXPECT_EQ(fake().query_mapped(w), FakeMapping::read_write);
  EXPECT_EQ(static_cast<unsigned char*>(w)[(3 << 20) - 1], 9);  // kept contents
  EXPECT_EQ(mapped(), held);

  ASSERT_EQ(abi().pause("weights"), 0);
  ASSERT_EQ(abi().resume("weights"), 0);
  EXPECT_EQ(fake().query_mapped(w), FakeMapping::read_write);

  std::string err = captured([] { EXPECT_EQ(abi().pause("nope"), -1); });
  EXPECT_NE(err.find("'nope'"), std::string::npos) << err;
  EXPECT_EQ(lines(err), 1) << err;
  err = captured([] { EXPECT_EQ(abi().resume("weights"), -1); });
  EXPECT_NE(err.find("not paused"), std::string::npos) << err;
  EXPECT_NE(std::string(abi().last_error()).find("not paused"), std::string::npos);
  err = captured([] { EXPECT_EQ(abi().pause(nullptr), -1); });
  EXPECT_EQ(lines(err), 1) << err;
  abi().free(w, 3 << 20, 0, nullptr);
  abi().free(plain, 100, 0, nullptr);
}

}  // namespace
