// VirtualCheckpoint: dtypes, ownership, written and read-only weights, and budget errors.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include <atomic>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/io/reader.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/torch/dtype_map.hpp"
#include "lema/torch/virtual_checkpoint.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {
namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

std::byte byte_at(std::uint64_t i) {
  return static_cast<std::byte>((i * 13 + 5) & 0xFF);
}

io::TensorToWrite pattern_tensor(std::string name, io::Dtype dtype,
                                 std::vector<std::int64_t> shape) {
  // BOOL holds 0 or 1; everything else any byte.
  const bool boolean = dtype == io::Dtype::BOOL;
  return {std::move(name), dtype, std::move(shape),
          [boolean](std::span<std::byte> out, std::uint64_t offset) {
            for (std::size_t i = 0; i < out.size(); ++i) {
              out[i] =
                  boolean ? static_cast<std::byte>((offset + i) % 3 == 0) : byte_at(offset + i);
            }
          }};
}

std::vector<std::byte> bytes_of(const at::Tensor& t) {
  const at::Tensor copy = t.clone();  // an op: the guard makes the weight resident for it
  const auto* p = static_cast<const std::byte*>(copy.data_ptr());
  return {p, p + copy.nbytes()};
}

std::vector<std::byte> expected_bytes(const io::TensorToWrite& t) {
  std::vector<std::byte> out(io::tensor_nbytes(t.dtype, t.shape));
  t.fill(out, 0);
  return out;
}

torch::Options guard_options(std::uint64_t budget = 8 * kMiB) {
  torch::Options options;
  options.budget_bytes = budget;
  return options;
}

std::string error_text(const std::function<void()>& body) {
  try {
    body();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(VirtualCheckpoint, EveryDtypeTorchHasMapsWithTheFileBytes) {
  TempDir dir("torch-dtypes");
  std::vector<io::TensorToWrite> tensors;
  std::vector<io::Dtype> mapped;
  for (int i = 0; i < io::kDtypeCount; ++i) {
    const auto dtype = static_cast<io::Dtype>(i);
    if (!torch::to_scalar_type(dtype)) continue;
    mapped.push_back(dtype);
    tensors.push_back(
        pattern_tensor(std::string("t.") + std::string(io::dtype_name(dtype)), dtype, {3, 5}));
  }
  ASSERT_GE(mapped.size(), 14u) << "F32 F16 BF16 F64 I64 I32 I16 I8 U8 BOOL F8 at least";
  std::vector<io::TensorToWrite> expected = tensors;
  io::write_safetensors(dir.path() / "m.safetensors", std::move(tensors));

  torch::VirtualCheckpoint checkpoint = torch::open(dir.path() / "m.safetensors", guard_options());
  for (std::size_t i = 0; i < mapped.size(); ++i) {
    const at::Tensor t = checkpoint.tensor(expected[i].name);
    EXPECT_EQ(t.scalar_type(), *torch::to_scalar_type(mapped[i])) << expected[i].name;
    EXPECT_EQ(t.sizes().vec(), (std::vector<std::int64_t>{3, 5})) << expected[i].name;
    EXPECT_EQ(bytes_of(t), expected_bytes(expected[i])) << expected[i].name;
  }
  EXPECT_EQ(checkpoint.named_tensors().size(), mapped.size());
}

TEST(VirtualCheckpoint, ADtypeTorchLacksIsRefusedAtOpenNamingTheTensor) {
  TempDir dir("torch-f4");
  std::vector<io::TensorToWrite> tensors;
  tensors.push_back(pattern_tensor("ok", io::Dtype::F32, {4}));
  tensors.push_back(pattern_tensor("packed.weight", io::Dtype::F4, {8}));
  io::write_safetensors(dir.path() / "m.safetensors", std::move(tensors));
  const std::string text =
      error_text([&] { torch::open(dir.path() / "m.safetensors", guard_options()); });
  EXPECT_NE(text.find("packed.weight"), std::string::npos) << text;
  EXPECT_NE(text.find("F4"), std::string::npos) << text;
}

// Options holds the runtime's options whole: the reader's settings reach the reads (here a
// fault injector failing every read, so the first load of a weight fails naming the file).
TEST(VirtualCheckpoint, ReaderSettingsReachTheReads) {
  TempDir dir("torch-reader");
  std::vector<io::TensorToWrite> tensors;
  tensors.push_back(pattern_tensor("w", io::Dtype::F32, {256}));
  io::write_safetensors(dir.path() / "m.safetensors", std::move(tensors));
  struct FailEveryRead : io::FaultInjector {
    std::optional<long> inject(std::uint32_t, std::uint64_t, std::uint64_t) override {
      return -EIO;
    }
  };
  torch::Options options = guard_options();
  options.reader.fault_injector = std::make_shared<FailEveryRead>();
  torch::VirtualCheckpoint checkpoint = torch::open(dir.path() / "m.safetensors", options);
  const std::string text = error_text([&] { (void)bytes_of(checkpoint.tensor("w")); });
  EXPECT_NE(text.find("m.safetensors"), std::string::npos) << text;
}

// A backend and a reader of the caller's own are used as given.
TEST(VirtualCheckpoint, OwnBackendAndReaderAreUsed) {
  TempDir dir("torch-own");
  std::vector<io::TensorToWrite> tensors;
  tensors.push_back(pattern_tensor("w", io::Dtype::F32, {256}));
  std::vector<io::TensorToWrite> expected = tensors;
  io::write_safetensors(dir.path() / "m.safetensors", std::move(tensors));
  torch::Options options = guard_options();
  auto backend = std::shared_ptr<runtime::Backend>(runtime::make_host_backend());
  options.backend = backend;
  std::atomic<int> readers{0};
  options.open_reader = [&](const std::vector<std::filesystem::path>& files) {
    ++readers;
    return io::Reader::open(files, io::ReaderOptions{});
  };
  torch::VirtualCheckpoint checkpoint = torch::open(dir.path() / "m.safetensors", options);
  EXPECT_EQ(bytes_of(checkpoint.tensor("w")), expected_bytes(expected[0]));
  EXPECT_EQ(readers.load(), 1);
  EXPECT_EQ(&checkpoint.mapped().pager()->space().backend(), backend.get());
}

// Note [Guard dispatch key]: a fallback another library registered on the guard's key first is
// named at open, not met as torch's registration error. In a child process: the key's fallback
// is process-wide.
TEST(VirtualCheckpointDeathTest, AnotherFallbackOnTheGuardKeyIsNamedAtOpen) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir dir("torch-key");
  std::vector<io::TensorToWrite> tensors;
  tensors.push_back(pattern_tensor("w", io::Dtype::F32, {16}));
  io::write_safetensors(dir.path() / "m.safetensors", std::move(tensors));
  const auto path = dir.path() / "m.safetensors";
  EXPECT_EXIT(
      {
        ::torch::Library other(::torch::Library::IMPL, "_",
                               c10::DispatchKey::TESTING_ONLY_GenericWrapper, __FILE__, __LINE__);
        other.fallback(::torch::CppFunction::makeFallthrough());
        const std::string text = error_text([&] { torch::open(path, guard_options()); });
        std::fprintf(stderr, "%s\n", text.c_str());
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "another library .*TESTING_ONLY_GenericWrapper");
}

class GuardedWeights : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<io::TensorToWrite> tensors;
    tensors.push_back(pattern_tensor("small.weight", io::Dtype::F32, {64, 64}));
    tensors.push_back(pattern_tensor("big.weight", io::Dtype::F32, {768, 1024}));  // 3 MiB
    io::write_safetensors(dir_.path() / "m.safetensors", std::move(tensors));
  }
  std::filesystem::path path() const { return dir_.path() / "m.safetensors"; }
  TempDir dir_{"torch-guard"};
};

TEST_F(GuardedWeights, AnOpWritingIntoAReadOnlyWeightFailsNamingIt) {
  for (const auto mode : {runtime::ResidencyMode::guard, runtime::ResidencyMode::fault}) {
  torch::Options options = guard_options();
  options.read_only = true;
  options.mode = mode;
  torch::VirtualCheckpoint checkpoint = torch::open(path(), options);
  at::Tensor w = checkpoint.tensor("small.weight");
  const std::vector<std::byte> before = bytes_of(w);

  for (const auto& write : std::vector<std::function<void()>>{
           [&] { w.add_(1); },
           [&] {
             w.copy_(at::zeros({64, 64}));
           },
           [&] { w.view({-1}).mul_(2); },  // through a view
           [&] {
             at::add_out(w, at::ones({64, 64}), at::ones({64, 64}));
           },  // an out= argument
       }) {
    const std::string text = error_text(write);
    EXPECT_NE(text.find("small.weight"), std::string::npos) << text;
    EXPECT_NE(text.find("read-only"), std::string::npos) << text;
  }
  EXPECT_EQ(bytes_of(w), before);
  // Reading still works, and so do ops producing new tensors.
  EXPECT_TRUE(at::equal(w * 1, w.clone()));
  }
}

// The default keeps writes: an in-place op on a weight, then its page evicted by reading the
// other page under a budget of one page, reads back as written (Note [Dirty pages] in the
// runtime). big.weight spans pages 0 and 1, small.weight lies in page 1.
TEST_F(GuardedWeights, AnInPlaceOpOnAWeightIsKeptAcrossEviction) {
  for (const auto mode : {runtime::ResidencyMode::guard, runtime::ResidencyMode::fault}) {
    torch::Options options = guard_options(2 * kMiB);
    options.mode = mode;
    torch::VirtualCheckpoint checkpoint = torch::open(path(), options);
    at::Tensor w = checkpoint.tensor("small.weight");
    const at::Tensor doubled = w.clone() * 2;
    w.mul_(2);
    w.view({-1}).narrow(0, 0, 8).add_(1);  // through a view too
    doubled.view({-1}).narrow(0, 0, 8).add_(1);
    const at::Tensor page0 = checkpoint.tensor("big.weight").view({-1}).narrow(0, 0, 256 * 1024);
    for (int round = 0; round < 2; ++round) (void)at::sum(page0);
    EXPECT_GE(checkpoint.stats().dirty_evictions, 1u) << runtime::residency_mode_name(mode);
    EXPECT_TRUE(at::equal(w, doubled)) << runtime::residency_mode_name(mode);
  }
  // The file is untouched: a fresh checkpoint reads its bytes.
  torch::Options options = guard_options();
  options.read_only = true;
  const at::Tensor fresh = torch::open(path(), options).tensor("small.weight");
  std::vector<std::byte> want(64 * 64 * 4);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = byte_at(i);
  EXPECT_EQ(bytes_of(fresh), want);
}

TEST_F(GuardedWeights, TensorsOutliveTheCheckpointObject) {
  at::Tensor w;
  at::Tensor view;
  {
    torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options());
    w = checkpoint.tensor("big.weight");
    view = checkpoint.tensor("small.weight").t();
  }
  const std::vector<std::byte> bytes = bytes_of(w);
  ASSERT_EQ(bytes.size(), 768u * 1024 * 4);
  for (std::size_t i = 0; i < bytes.size(); i += 4099) ASSERT_EQ(bytes[i], byte_at(i)) << i;
  EXPECT_EQ(view.size(0), 64);
  EXPECT_TRUE(at::equal(view.t().clone(), view.t()));
}

TEST_F(GuardedWeights, ABudgetTooSmallForOneOpNamesTheOpTheTensorsAndTheSizes) {
  torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options(2 * kMiB));
  const at::Tensor big = checkpoint.tensor("big.weight");
  const std::string text = error_text([&] { (void)at::sum(big); });
  EXPECT_NE(text.find("aten::sum"), std::string::npos) << text;
  EXPECT_NE(text.find("big.weight"), std::string::npos) << text;
  EXPECT_NE(text.find("3 MiB"), std::string::npos) << text;
  EXPECT_NE(text.find("2 MiB"), std::string::npos) << text;
  // A piece of the tensor that fits still works.
  EXPECT_NO_THROW((void)at::sum(big.narrow(0, 0, 16)));
  EXPECT_LE(checkpoint.stats().peak_resident_bytes, 2 * kMiB);
}

TEST_F(GuardedWeights, ABudgetErrorCountsThePagesSpannedAndGivesTheSmallestBudgetThatWorks) {
  torch::Options options = guard_options(2 * kMiB);
  options.setting_names = {.budget = "--budget", .page_size = "--page-size"};
  torch::VirtualCheckpoint checkpoint = torch::open(path(), options);
  const at::Tensor big = checkpoint.tensor("big.weight");
  const runtime::TensorAddress address = checkpoint.mapped().tensor("big.weight");
  const std::uint32_t pages =
      checkpoint.mapped().pager()->space().pages_of(address.data, address.nbytes).count;
  ASSERT_GE(pages, 2u);  // 3 MiB in 2 MiB pages
  const std::uint64_t smallest = pages * 2 * kMiB;
  const std::string text = error_text([&] { (void)at::sum(big); });
  EXPECT_NE(text.find("they span " + std::to_string(pages) + " pages of 2 MiB (" +
                      std::to_string(2 * pages) +
                      " MiB) but the budget holds 1 page (2 MiB); the smallest budget that works "
                      "is " + std::to_string(2 * pages) + " MiB (" + std::to_string(smallest) +
                      " bytes): raise the budget (--budget) to at least that"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.find("page size"), std::string::npos) << text;  // 2 MiB is the minimum
  EXPECT_EQ(text.find('\n'), std::string::npos) << text;
  // The budget it gives is enough for the op.
  torch::VirtualCheckpoint enough = torch::open(path(), guard_options(smallest));
  EXPECT_NO_THROW((void)at::sum(enough.tensor("big.weight")));
  // With pages above the backend's granularity, a smaller page size is offered down to it.
  options.page_size = 4 * kMiB;
  options.setting_names = {};
  EXPECT_NE(error_text([&] { (void)torch::open(path(), options); })
                .find("the smallest budget that works is 4 MiB (4194304 bytes): raise the budget "
                      "(budget_bytes) to at least that, or lower the page size (page_size; its "
                      "minimum is 2 MiB)"),
            std::string::npos);
}

TEST_F(GuardedWeights, BackwardOnAutogradThreadsSeesResidentWeights) {
  torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options(4 * kMiB));
  const at::Tensor w = checkpoint.tensor("small.weight");
  const at::Tensor plain = w.clone();
  at::Tensor x1 = at::ones({4, 64}).requires_grad_();
  at::Tensor x2 = at::ones({4, 64}).requires_grad_();
  at::linear(x1, w).square().sum().backward();
  at::linear(x2, plain).square().sum().backward();
  EXPECT_TRUE(at::equal(x1.grad(), x2.grad()));
}

TEST_F(GuardedWeights, OpsOnSeveralThreadsShareTheBudget) {
  // Two pages: each thread's op needs the big weight's two pages or the small one's one.
  torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options(4 * kMiB));
  const at::Tensor big = checkpoint.tensor("big.weight");
  const at::Tensor small = checkpoint.tensor("small.weight");
  const at::Tensor big_sum = at::sum(big.clone());
  const at::Tensor small_sum = at::sum(small.clone());
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        const bool use_big = (i + t) % 2 == 0;
        const at::Tensor got = at::sum(use_big ? big : small);
        if (!at::equal(got, use_big ? big_sum : small_sum)) ++mismatches;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_LE(checkpoint.stats().peak_resident_bytes, 4 * kMiB);
}

TEST_F(GuardedWeights, PrefetchLoadsPagesAndStatsCountThem) {
  torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options());
  EXPECT_EQ(checkpoint.stats().bytes_read, 0u);
  const std::vector<std::string> names = {"big.weight"};
  checkpoint.prefetch(names);
  EXPECT_GE(checkpoint.stats().bytes_read, 768u * 1024 * 4);
  const std::uint64_t faults = checkpoint.stats().faults;
  (void)at::sum(checkpoint.tensor("big.weight"));
  EXPECT_EQ(checkpoint.stats().faults, faults) << "prefetched pages are hits";
}

TEST_F(GuardedWeights, EvictFreesTheTensorsPagesAndTheBytesComeBack) {
  torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options());
  const std::vector<std::string> names = {"big.weight"};
  const at::Tensor expected = checkpoint.tensor("big.weight").clone();
  const std::uint64_t resident = checkpoint.stats().resident_bytes;
  ASSERT_GT(resident, 0u);
  const std::size_t evicted = checkpoint.evict(names);
  EXPECT_GT(evicted, 0u);
  EXPECT_EQ(checkpoint.stats().resident_bytes, resident - evicted * checkpoint.stats().page_size);
  EXPECT_EQ(checkpoint.stats().evictions, evicted);
  const std::uint64_t faults = checkpoint.stats().faults;
  EXPECT_TRUE(at::equal(checkpoint.tensor("big.weight").clone(), expected));
  EXPECT_GT(checkpoint.stats().faults, faults) << "evicted pages are read again";
}

// Six 2 MiB tensors; the pool holds exactly t0's and t2's pages. Demoting t2 makes loading t4
// evict t2's pages, not the older t0's.
TEST(DemoteHint, DemotedTensorsPagesGoBeforeOlderOnesAndTheBytesStayRight) {
  TempDir dir("torch-demote");
  std::vector<io::TensorToWrite> tensors;
  for (int i = 0; i < 6; ++i) {
    tensors.push_back(pattern_tensor("t" + std::to_string(i), io::Dtype::F32, {512, 1024}));
  }
  io::write_safetensors(dir.path() / "m.safetensors", std::move(tensors));
  const auto pages = [](torch::VirtualCheckpoint& c, const std::string& name) {
    const runtime::TensorAddress t = c.mapped().tensor(name);
    return c.mapped().pager()->space().pages_of(t.data, t.nbytes);
  };
  std::uint64_t page_size = 0;
  std::size_t room = 0;
  {
    torch::VirtualCheckpoint probe = torch::open(dir.path() / "m.safetensors", guard_options());
    page_size = probe.mapped().pager()->space().page_size();
    room = pages(probe, "t0").count + pages(probe, "t2").count;
    ASSERT_GE(pages(probe, "t2").first, pages(probe, "t0").first + pages(probe, "t0").count);
    ASSERT_GE(pages(probe, "t4").first, pages(probe, "t2").first + pages(probe, "t2").count);
  }
  torch::VirtualCheckpoint checkpoint =
      torch::open(dir.path() / "m.safetensors", guard_options(room * page_size));
  runtime::Pager* pager = checkpoint.mapped().pager();
  ASSERT_EQ(pager->chunk_count(), room);
  const auto resident = [&](const std::string& name) {
    const runtime::PageRange r = pages(checkpoint, name);
    std::size_t n = 0;
    for (runtime::PageId p = r.first; p < r.first + r.count; ++p) n += pager->is_resident(p);
    return n;
  };
  const at::Tensor expected = checkpoint.tensor("t2").clone();
  checkpoint.evict(checkpoint.names());
  const std::vector<std::string> t0 = {"t0"}, t2 = {"t2"}, t4 = {"t4"};
  checkpoint.prefetch(t0);
  checkpoint.prefetch(t2);
  EXPECT_EQ(checkpoint.demote(t2), pages(checkpoint, "t2").count);
  EXPECT_EQ(resident("t2"), pages(checkpoint, "t2").count) << "a hint, not an eviction";
  checkpoint.prefetch(t4);
  EXPECT_EQ(resident("t0"), pages(checkpoint, "t0").count) << "older, but not demoted";
  EXPECT_EQ(resident("t2"), 0u);
  EXPECT_TRUE(at::equal(checkpoint.tensor("t2").clone(), expected));
}

TEST_F(GuardedWeights, UnsupportedDevicesAndACudaDeviceWithoutAGpuAreRefused) {
  torch::Options options = guard_options();
  options.device = c10::Device(c10::kMeta);
  std::string text = error_text([&] { torch::open(path(), options); });
  EXPECT_NE(text.find("use the CPU or a CUDA device"), std::string::npos) << text;
  if (at::globalContext().hasCUDA()) GTEST_SKIP() << "this machine has a GPU";
  options.device = c10::Device(c10::kCUDA, 0);
  text = error_text([&] { torch::open(path(), options); });
  EXPECT_NE(text.find("sees no CUDA device"), std::string::npos) << text;
}

TEST_F(GuardedWeights, AHostCacheOverHostMemoryIsRefused) {
  torch::Options options = guard_options();
  options.host_cache_bytes = 8 * kMiB;
  const std::string text = error_text([&] { torch::open(path(), options); });
  EXPECT_NE(text.find("host cache"), std::string::npos) << text;
}

TEST_F(GuardedWeights, AnUnknownNameIsRefusedNamingIt) {
  torch::VirtualCheckpoint checkpoint = torch::open(path(), guard_options());
  EXPECT_THROW(checkpoint.tensor("nope.weight"), InvalidArgument);
}

}  // namespace
}  // namespace lema::test
