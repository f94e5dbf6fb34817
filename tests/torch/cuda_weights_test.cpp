// Weights on the GPU (label gpu; skips where torch sees no GPU), kept each way of GpuMemory: ops
// read the file's bytes under a quarter budget (the whole model for plain unified memory),
// results and gradients equal those over ordinary CUDA tensors, and with the host cache tier
// later passes read nothing from the files.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <ostream>
#include <string>
#include <vector>

#include "lema/io/safetensors_writer.hpp"
#include "lema/torch/virtual_checkpoint.hpp"
#include "runtime_fixture.hpp"

namespace lema::runtime {
// Test names and failure messages show the way by name.
inline void PrintTo(GpuMemory memory, std::ostream* os) { *os << gpu_memory_name(memory); }
}  // namespace lema::runtime

namespace lema::test {
namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
constexpr int kWeights = 8;
constexpr std::int64_t kRows = 1024, kCols = 1024;  // 4 MiB of F32 each

class CudaWeights : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!at::globalContext().hasCUDA()) GTEST_SKIP() << "torch sees no CUDA device";
    std::vector<io::TensorToWrite> tensors;
    for (int i = 0; i < kWeights; ++i) {
      tensors.push_back({"model.layers." + std::to_string(i) + ".mlp.up_proj.weight",
                         io::Dtype::F32,
                         {kRows, kCols},
                         [i](std::span<std::byte> out, std::uint64_t offset) {
                           // Small floats: every 4-byte group is a finite F32.
                           for (std::size_t k = 0; k < out.size(); ++k)
                             out[k] = static_cast<std::byte>(
                                 (offset + k) % 4 == 3 ? 0x3c : ((offset + k) * 7 + i) & 0xff);
                         }});
    }
    io::write_safetensors(dir_.path() / "m.safetensors", std::move(tensors));
  }
  std::filesystem::path path() const { return dir_.path() / "m.safetensors"; }
  std::string name(int i) const { return "model.layers." + std::to_string(i) + ".mlp.up_proj.weight"; }
  TempDir dir_{"torch-cuda"};
};

torch::Options on_gpu(std::uint64_t budget, std::uint64_t host_cache = 0,
                      runtime::GpuMemory memory = runtime::GpuMemory::vmm) {
  torch::Options o;
  o.budget_bytes = memory == runtime::GpuMemory::unified ? 64 * kMiB : budget;
  o.device = c10::Device(c10::kCUDA, 0);
  o.host_cache_bytes = host_cache;
  o.gpu_memory = memory;
  return o;
}

// The paged side of each test, once per way of keeping the weights.
class CudaWeightsEachWay : public CudaWeights,
                           public ::testing::WithParamInterface<runtime::GpuMemory> {
 protected:
  torch::VirtualCheckpoint open_paged() { return torch::open(path(), on_gpu(8 * kMiB, 0, GetParam())); }
  // Plain unified memory holds the whole model; the others stay under the quarter budget.
  void expect_budget(const torch::VirtualCheckpoint& paged) {
    if (GetParam() == runtime::GpuMemory::unified) {
      EXPECT_EQ(paged.stats().evictions, 0u);
    } else {
      EXPECT_LE(paged.stats().peak_resident_bytes, 8 * kMiB);
      EXPECT_GT(paged.stats().evictions, 0u);
    }
  }
};

torch::Options on_host(std::uint64_t budget) {
  torch::Options o;
  o.budget_bytes = budget;
  return o;
}

TEST_P(CudaWeightsEachWay, OpsUnderAQuarterBudgetEqualOrdinaryCudaTensors) {
  torch::VirtualCheckpoint paged = open_paged();
  torch::VirtualCheckpoint host = torch::open(path(), on_host(64 * kMiB));
  const at::Tensor x = at::randn({64, kCols}, at::TensorOptions().device(at::kCUDA).dtype(at::kFloat));
  for (int pass = 0; pass < 3; ++pass) {
    for (int i = 0; i < kWeights; ++i) {
      const at::Tensor w = paged.tensor(name(i));
      ASSERT_TRUE(w.is_cuda());
      const at::Tensor reference = host.tensor(name(i)).clone().to(at::kCUDA);
      EXPECT_TRUE(at::equal(w.cpu(), reference.cpu())) << name(i) << ", pass " << pass;
      EXPECT_TRUE(at::allclose(x.mm(w.t()), x.mm(reference.t()), 1e-5, 1e-5)) << name(i);
    }
  }
  EXPECT_GT(paged.stats().faults, 0u);
  expect_budget(paged);
}

TEST_P(CudaWeightsEachWay, BackwardThroughPagedWeightsGivesTheSameGradients) {
  torch::VirtualCheckpoint paged = open_paged();
  torch::VirtualCheckpoint host = torch::open(path(), on_host(64 * kMiB));
  auto grads = [&](auto weight) {
    at::Tensor a = at::ones({kCols}, at::TensorOptions().device(at::kCUDA)).requires_grad_(true);
    const at::Tensor x = at::linspace(-1, 1, 32 * kCols, at::TensorOptions().device(at::kCUDA))
                             .reshape({32, kCols});
    at::Tensor h = x;
    for (int i = 0; i < kWeights; ++i) h = at::tanh((h * a).mm(weight(i).t()) * 1e-3);
    h.sum().backward();
    return a.grad().cpu();
  };
  const at::Tensor got = grads([&](int i) { return paged.tensor(name(i)); });
  const at::Tensor want = grads([&](int i) { return host.tensor(name(i)).clone().to(at::kCUDA); });
  EXPECT_TRUE(at::allclose(got, want, 1e-5, 1e-6));
  expect_budget(paged);
}

INSTANTIATE_TEST_SUITE_P(Ways, CudaWeightsEachWay,
                         ::testing::Values(runtime::GpuMemory::vmm, runtime::GpuMemory::managed,
                                           runtime::GpuMemory::unified),
                         [](const auto& info) {
                           return std::string(runtime::gpu_memory_name(info.param));
                         });

TEST_F(CudaWeights, WithTheHostCacheLaterPassesReadNothing) {
  torch::VirtualCheckpoint paged = torch::open(path(), on_gpu(8 * kMiB, 64 * kMiB));
  auto pass = [&] {
    for (int i = 0; i < kWeights; ++i) (void)paged.tensor(name(i)).sum().item<float>();
  };
  pass();
  const auto first = paged.stats();
  pass();
  pass();
  const auto later = paged.stats();
  EXPECT_EQ(later.bytes_read, first.bytes_read);
  EXPECT_GT(later.host_cache_hits, first.host_cache_hits);
}

}  // namespace
}  // namespace lema::test
