// Opens a checkpoint under a budget and sums every weight as an ordinary at::Tensor.
//   sum_weights MODEL_DIR BUDGET_BYTES
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "lema/torch/virtual_checkpoint.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR BUDGET_BYTES\n", argv[0]);
    return 2;
  }
  try {
    lema::torch::Options options;
    options.budget_bytes = std::strtoull(argv[2], nullptr, 10);
    lema::torch::VirtualCheckpoint checkpoint = lema::torch::open(argv[1], options);
    double total = 0;
    for (const auto& [name, weight] : checkpoint.named_tensors()) {
      total += weight.to(at::kDouble).sum().item<double>();
    }
    const auto stats = checkpoint.stats();
    std::printf("sum %.17g peak_resident_bytes %llu budget_bytes %llu\n", total,
                static_cast<unsigned long long>(stats.peak_resident_bytes),
                static_cast<unsigned long long>(stats.budget_bytes));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
