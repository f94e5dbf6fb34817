// Weights on a GPU kept three ways (GpuMemory), opened as a MappedCheckpoint over the fake
// driver: the bytes are the file's, managed memory is steered by the pager under the budget,
// plain unified memory is loaded once and left to the driver, and bad settings are refused.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>

#include "fake_cuda_control.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/cuda_backend.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "runtime_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::GpuMemory;
using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;

// Two layers of 2 MiB pages: 30 MiB, enough pages for a budget well below the model.
ModelShape gpu_model() {
  ModelShape m;
  m.layers = 2;
  m.hidden = 1_MiB + 13;
  m.embed = 3_MiB + 7;
  return m;
}

MappedCheckpointOptions on_gpu(GpuMemory memory, std::uint64_t budget) {
  MappedCheckpointOptions o;
  o.cuda_device = 0;
  o.gpu_memory = memory;
  o.budget_bytes = budget;
  return o;
}

// Reads every tensor through the checkpoint and compares it with the bytes written.
void expect_file_bytes(MappedCheckpoint& m) {
  for (const io::TensorInfo& t : m.checkpoint().tensors()) {
    std::uint64_t at = 0;
    bool same = true;
    m.read_tensor(t.name, [&](const std::byte* p, std::uint64_t n) {
      for (std::uint64_t i = 0; i < n && same; ++i) same = p[i] == pattern_byte(t.name, at + i);
      at += n;
    });
    EXPECT_TRUE(same) << t.name;
    EXPECT_EQ(at, t.nbytes) << t.name;
  }
}

TEST(GpuMemory, NamesParseBack) {
  for (GpuMemory m : {GpuMemory::vmm, GpuMemory::managed, GpuMemory::unified})
    EXPECT_EQ(runtime::parse_gpu_memory(runtime::gpu_memory_name(m)), m);
  EXPECT_FALSE(runtime::parse_gpu_memory("uvm").has_value());
}

TEST(GpuMemory, ManagedWeightsAreTheFileBytesUnderTheBudget) {
  TempDir dir("gpu-managed");
  const auto path = write_model(dir.path(), gpu_model());
  const std::uint64_t before = fake().live_handles();
  const std::uint64_t to_device = fake().prefetches(true);
  {
    auto m = MappedCheckpoint::open(path, on_gpu(GpuMemory::managed, 4 * 2_MiB));
    for (int pass = 0; pass < 2; ++pass) expect_file_bytes(*m);
    const auto st = m->stats();
    EXPECT_LE(st.peak_resident_bytes, 4 * 2_MiB);
    EXPECT_GT(st.evictions, 0u);
    // Every page the pager made resident was sent to the device ahead of use.
    EXPECT_GE(fake().prefetches(true) - to_device, st.faults);
  }
  EXPECT_EQ(fake().live_handles(), before);
}

TEST(GpuMemory, UnifiedWeightsAreLoadedOnceAndLeftToTheDriver) {
  TempDir dir("gpu-unified");
  const auto path = write_model(dir.path(), gpu_model());
  const std::uint64_t before = fake().live_handles();
  const std::uint64_t to_device = fake().prefetches(true);
  const std::uint64_t to_host = fake().prefetches(false);
  {
    auto m = MappedCheckpoint::open(
        path, on_gpu(GpuMemory::unified, std::numeric_limits<std::uint64_t>::max()));
    for (int pass = 0; pass < 3; ++pass) expect_file_bytes(*m);
    const auto st = m->stats();
    // Each page was read from the files once and stays: the driver, not the pager, pages.
    EXPECT_EQ(st.evictions, 0u);
    EXPECT_EQ(st.faults, m->layout().page_count());
    EXPECT_EQ(st.budget_bytes, m->layout().virtual_bytes());
    EXPECT_EQ(fake().prefetches(true), to_device);
    EXPECT_EQ(fake().prefetches(false), to_host);
  }
  EXPECT_EQ(fake().live_handles(), before);
}

TEST(GpuMemory, UnifiedRefusesABudgetSmallerThanTheModel) {
  TempDir dir("gpu-unified-budget");
  const auto path = write_model(dir.path(), gpu_model());
  try {
    MappedCheckpoint::open(path, on_gpu(GpuMemory::unified, 4 * 2_MiB));
    FAIL() << "a budget below the model was accepted for plain unified memory";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("whole model"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("unlimited"), std::string::npos) << e.what();
  }
}

TEST(GpuMemory, ManagedOrUnifiedWithoutAGpuIsRefused) {
  TempDir dir("gpu-no-device");
  const auto path = write_model(dir.path(), gpu_model());
  MappedCheckpointOptions o;
  o.budget_bytes = 8 * 2_MiB;
  o.gpu_memory = GpuMemory::managed;
  EXPECT_THROW(MappedCheckpoint::open(path, o), InvalidArgument);
}

TEST(GpuMemory, HostCacheOverHostVisibleGpuMemoryIsRefused) {
  TempDir dir("gpu-cache");
  const auto path = write_model(dir.path(), gpu_model());
  auto o = on_gpu(GpuMemory::managed, 8 * 2_MiB);
  o.host_cache_bytes = 8 * 2_MiB;
  try {
    MappedCheckpoint::open(path, o);
    FAIL() << "a host cache over managed memory was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("host cache"), std::string::npos) << e.what();
  }
}

TEST(GpuMemory, DeviceMemoryIsTheDriversFreeAndTotal) {
  runtime::CudaBackendOptions o;
  o.driver_library = fake_cuda_driver_path();
  const auto memory = runtime::cuda_device_memory(o);
  EXPECT_GT(memory.total_bytes, 0u);
  EXPECT_LE(memory.free_bytes, memory.total_bytes);
  o.device = 7;
  EXPECT_THROW(runtime::cuda_device_memory(o), runtime::CudaUnavailable);
}

}  // namespace
}  // namespace lema::test
