// A Pager over the cuda backend and the fake driver, with driver errors injected where nothing can
// throw them (Note [Device errors without a caller]): releasing a lease, dropping one, retiring
// copies, teardown. The process goes on (a CudaError escaping a noexcept path would end it in
// std::terminate), and what the device may still read is kept instead of reused or freed. Also a
// lease acquired for a queue and dropped without release is released on that queue (Note
// [Dropped leases]).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fake_cuda_control.hpp"
#include "lema/runtime/pager.hpp"
#include "pager_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::Fence;
using runtime::Lease;
using runtime::PageId;
using runtime::Pager;
using runtime::PagerBroken;
using runtime::PagerOptions;
using runtime::Queue;

constexpr int kInvalidHandle = 400;  // CUDA_ERROR_INVALID_HANDLE, as a sticky error would fail

// One model on the fake device with 64 KiB pages, a pool of three pages, no prefetcher (so every
// driver call under test comes from the test's own thread), and a compute stream of the test's.
class PagerDeviceErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    before_ = fake().live_handles();
    granularity_ = fake().configure("granularity", static_cast<long long>(kPage));
    model_.emplace(make_fake_cuda_backend(), small_model(), kPage, "device-errors");
    PagerOptions opt;
    opt.budget_bytes = 3 * kPage;
    opt.prefetch = false;
    pager_.emplace(model_->space, opt);
    compute_ = fake().test_stream(nullptr, 1);
  }
  void TearDown() override {
    pager_.reset();
    fake().hold(compute_, false);
    fake().fail("cuEventQuery", 0, 0);
    fake().fail("cuEventSynchronize", 0, 0);
    fake().fail("cuEventRecord", 0, 0);
    // What a broken pager leaked stays mapped when the reservation is given back: the fake
    // reports that as misuse, which must not abort here.
    if (leaks_) fake().configure("strict", 0);
    model_.reset();
    fake().test_stream(compute_, 0);
    if (!leaks_) {
      EXPECT_EQ(fake().live_handles(), before_ + kept_)
          << "driver handles left behind, or freed although the device may still read them";
    }
    fake().configure("strict", 1);
    fake().configure("granularity", granularity_);
  }

  const std::byte* address(PageId p) const { return model_->space.page_address(p); }
  // A kernel reading page `p` is enqueued on the compute stream and held there: what is
  // recorded on the stream after it does not complete until unhold().
  void kernel_reads(PageId p) {
    fake().hold(compute_, true);
    ASSERT_EQ(fake().touch(compute_, address(p), kPage), 0);
  }
  void unhold() {
    fake().hold(compute_, false);
    model_->backend->wait_fence(record_on_compute());
  }
  Fence record_on_compute() { return model_->backend->record_fence(Queue{compute_}); }
  // The page holds its bytes of the file.
  void expect_file_bytes(PageId p) {
    for (const auto& t : model_->space.layout().tensors()) {
      const std::uint64_t lo = p * kPage, hi = lo + kPage;
      const std::uint64_t a = std::max(lo, t.offset), b = std::min(hi, t.offset + t.nbytes);
      if (a >= b) continue;
      EXPECT_EQ(std::memcmp(address(p) + (a - lo),
                            model_->expected.at(t.name).data() + (a - t.offset), b - a),
                0)
          << t.name << " in page " << p;
    }
  }

  long long granularity_ = 0;
  std::optional<OpenedModel> model_;
  std::optional<Pager> pager_;
  void* compute_ = nullptr;
  std::uint64_t before_ = 0;
  bool leaks_ = false;      // the test makes the pager leak its pool: handles are not counted
  std::uint64_t kept_ = 0;  // handles the test expects kept for good
};

// Note [Dropped leases]: the kernels of a lease acquired for a queue may still run when it is
// dropped; its chunk is not reused until the queue passed the point of the drop.
TEST_F(PagerDeviceErrors, ADroppedLeaseIsReleasedOnTheQueueItWasAcquiredFor) {
  {
    Lease lease = pager_->acquire_pages({1, 1}, Queue{compute_});
    kernel_reads(1);
  }
  EXPECT_EQ(pager_->evict({1, 1}), 0u)
      << "the page was given back while a kernel on its queue had yet to read it";
  unhold();
  EXPECT_EQ(pager_->evict({1, 1}), 1u);
  // A lease for the host is released at once when dropped.
  { Lease lease = pager_->acquire_pages({2, 1}); }
  EXPECT_EQ(pager_->evict({2, 1}), 1u);
}

// The same for a lease assigned over.
TEST_F(PagerDeviceErrors, ALeaseAssignedOverIsReleasedOnItsQueue) {
  Lease lease = pager_->acquire_pages({1, 1}, Queue{compute_});
  kernel_reads(1);
  lease = pager_->acquire_pages({2, 1});
  EXPECT_EQ(pager_->evict({1, 1}), 0u);
  unhold();
  EXPECT_EQ(pager_->evict({1, 1}), 1u);
  pager_->release(std::move(lease));
}

// release(): the query of the last-use fence fails. The pages are unpinned, the fence is kept
// as if still running, and the next check asks the device again.
TEST_F(PagerDeviceErrors, AFailedQueryOfTheLastUseAtReleaseKeepsThePagesUntilItCompleted) {
  Lease lease = pager_->acquire_pages({1, 1}, Queue{compute_});
  kernel_reads(1);
  const Fence used = record_on_compute();
  fake().fail("cuEventQuery", 1, kInvalidHandle);
  pager_->release(std::move(lease), used);
  EXPECT_EQ(pager_->evict({1, 1}), 0u) << "a chunk was reused whose last use is not known over";
  unhold();
  EXPECT_EQ(pager_->evict({1, 1}), 1u);
  // Nothing else is affected.
  Lease again = pager_->acquire_pages({1, 2});
  expect_file_bytes(1);
  expect_file_bytes(2);
  pager_->release(std::move(again));
}

// A lease for a queue dropped while its last use cannot be recorded: the pages stay pinned for
// good, acquires are refused with the error that broke the pager, and teardown leaves the pages
// mapped (a kernel may still read them) and leaks the pool instead of freeing it under them.
TEST_F(PagerDeviceErrors, ADroppedLeaseWhoseLastUseCannotBeRecordedBreaksThePager) {
  leaks_ = true;
  {
    Lease lease = pager_->acquire_pages({1, 1}, Queue{compute_});
    kernel_reads(1);
    fake().fail("cuEventRecord", 1, kInvalidHandle);
  }
  try {
    (void)pager_->acquire_pages({2, 1});
    ADD_FAILURE() << "a broken pager served an acquire";
  } catch (const PagerBroken& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cuEventRecord"), std::string::npos) << what;
    EXPECT_NE(what.find("open it again"), std::string::npos) << what;
  }
  EXPECT_TRUE(pager_->is_resident(1));
  EXPECT_EQ(pager_->evict({1, 1}), 0u);
  pager_.reset();
  EXPECT_EQ(fake().query_mapped(address(1)), FakeMapping::read)
      << "teardown unmapped a page a kernel may still read";
}

// ~Pager: waiting for a page's last use fails. The page stays mapped, and teardown goes on.
TEST_F(PagerDeviceErrors, TeardownThatCannotWaitForALastUseLeavesThePageMapped) {
  leaks_ = true;
  Lease lease = pager_->acquire_pages({1, 1}, Queue{compute_});
  Lease other = pager_->acquire_pages({2, 1});
  kernel_reads(1);
  pager_->release(std::move(lease), record_on_compute());
  pager_->release(std::move(other));
  // Page 2's fences are complete: teardown waits for nothing there.
  EXPECT_EQ(pager_->evict({2, 1}), 1u);
  fake().fail("cuEventSynchronize", 1, kInvalidHandle);
  pager_.reset();
  EXPECT_EQ(fake().query_mapped(address(1)), FakeMapping::read);
}

// A copy's completion cannot be asked at the end of a fill: the fill goes on, and the page is
// the file's once the acquire returns.
TEST_F(PagerDeviceErrors, AFailedQueryOfACopyWhileFillingIsNotFatal) {
  fake().fail("cuEventQuery", 1, kInvalidHandle);
  Lease lease = pager_->acquire_pages({1, 2});
  expect_file_bytes(1);
  expect_file_bytes(2);
  pager_->release(std::move(lease));
}

// ~Pager: neither the query nor the wait of a copy still listed works. Its staging memory is
// kept (leaked), the pages, whose copies the host saw complete, are unmapped.
TEST_F(PagerDeviceErrors, TeardownThatCannotConfirmACopyKeepsItsHostMemory) {
  {
    // The copies stay listed in flight: held when the acquire ends, they are not retired.
    fake().configure("hold_backend", 1);
    Lease lease = pager_->acquire_pages({1, 1}, Queue{compute_});
    fake().configure("hold_backend", 0);
    pager_->release(std::move(lease));
  }
  pager_->release(pager_->acquire_pages({1, 1}));  // waits for the copy on the host
  fake().fail("cuEventQuery", 1, kInvalidHandle);
  fake().fail("cuEventSynchronize", 1, kInvalidHandle);
  pager_.reset();
  EXPECT_EQ(fake().query_mapped(address(1)), FakeMapping::reserved);
  kept_ = 1;  // the staging buffer of that copy, checked in TearDown
}

}  // namespace
}  // namespace lema::test
