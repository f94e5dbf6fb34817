// Torch's CPU allocator over a VmmResource (lema::torch::use_allocator): tensors several times
// the budget in total, computed on with ordinary ops, give the same bytes as with torch's own
// allocator, while the resident memory stays under the budget; the scope puts the previous
// allocator back, and tensors from the scope outlive it.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/torch/allocator.hpp"

namespace lema::torch {
namespace {

constexpr std::uint64_t kBudget = 8_MiB;

// Twelve 1 MiB... 4 MiB matrices, products and reductions: about 60 MiB allocated in all.
std::vector<at::Tensor> compute() {
  at::manual_seed(1234);
  std::vector<at::Tensor> xs;
  for (int i = 0; i < 12; ++i) xs.push_back(at::randn({1024, 1024}));
  std::vector<at::Tensor> out;
  at::Tensor acc = at::zeros({1024, 1024});
  for (int i = 0; i + 1 < 12; ++i) {
    at::Tensor y = at::mm(xs[i], xs[i + 1]).relu_() * 0.5 + xs[i];
    acc.add_(y);
    out.push_back(y.sum(1));
  }
  out.push_back(acc.clone());
  out.push_back(at::softmax(acc, 1).mean(0));
  return out;
}

TEST(VmmAllocator, TensorsBeyondTheBudgetComputeTheSame) {
  const std::vector<at::Tensor> expected = compute();
  c10::Allocator* before = c10::GetCPUAllocator();
  std::vector<at::Tensor> got;
  {
    allocator::VmmOptions options;
    options.budget_bytes = kBudget;
    options.capacity_bytes = 1_GiB;
    AllocatorScope scope = use_allocator(options);
    if (!scope.resource().memory().fault_fallback_reason().empty() ||
        scope.resource().memory().mode() != runtime::ResidencyMode::fault)
      GTEST_SKIP() << "userfaultfd unavailable: " << scope.resource().memory().fallback_reason();
    EXPECT_NE(c10::GetCPUAllocator(), before);
    got = compute();
    for (const at::Tensor& t : got) EXPECT_TRUE(scope.resource().contains(t.data_ptr()));
    const runtime::PagerStats s = scope.stats();
    EXPECT_LE(s.peak_resident_bytes, kBudget);
    EXPECT_GT(s.spilled_pages, 0u) << "the tensors never exceeded the budget";
  }
  EXPECT_EQ(c10::GetCPUAllocator(), before) << "the previous allocator was not restored";
  ASSERT_EQ(got.size(), expected.size());
  // Tensors from the scope outlive it and hold the same bytes as torch's own.
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(at::equal(got[i], expected[i])) << i;
  // A tensor allocated now comes from the previous allocator.
  at::Tensor after = at::ones({4});
  EXPECT_EQ(after.sum().item<float>(), 4.0f);
}

}  // namespace
}  // namespace lema::torch
