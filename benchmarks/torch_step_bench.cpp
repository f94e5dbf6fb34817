// Step time of the LoRA training loop (tests/torch/support) over plain tensors, over a guard-mode
// checkpoint that holds every weight, and under a quarter budget (guard, and fault where
// userfaultfd is allowed). Prints the median step time of each and the ratios.
//
//   torch_step_bench [hidden] [intermediate] [layers] [tokens per sequence] [steps] [threads]
//                    [policy: lru|trace] [rounds]
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "lema/torch/virtual_checkpoint.hpp"
#include "runtime_fixture.hpp"
#include "support/llama_lora.hpp"

namespace {

using lema::test::LlamaConfig;
using lema::test::Weights;
using Clock = std::chrono::steady_clock;

double median_step_ms(const LlamaConfig& config, const Weights& weights, int steps,
                      const std::function<void()>& on_step = {}) {
  std::vector<double> times;
  Clock::time_point last{};
  lema::test::train_lora(config, weights, steps + 1, [&] {
    const Clock::time_point now = Clock::now();
    if (last != Clock::time_point{}) {
      times.push_back(std::chrono::duration<double, std::milli>(now - last).count());
    }
    last = now;
    if (on_step) on_step();
  });
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

Weights as_map(const lema::torch::VirtualCheckpoint& checkpoint) {
  Weights out;
  for (auto& [name, t] : checkpoint.named_tensors()) out[name] = t;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  LlamaConfig config;
  config.hidden = arg(1, 512);
  config.intermediate = arg(2, 1024);
  config.layers = arg(3, 3);
  config.seq = arg(4, 16);
  config.heads = std::max<std::int64_t>(1, config.hidden / 64);
  const int steps = static_cast<int>(arg(5, 5));
  const int threads = static_cast<int>(arg(6, 1));
  const int rounds = static_cast<int>(std::max(1L, arg(8, 5)));
  at::set_num_threads(threads);
  const auto policy = lema::runtime::parse_policy(argc > 7 ? argv[7] : "lru");
  if (!policy) {
    std::fprintf(stderr, "unknown policy '%s' (lru or trace)\n", argv[7]);
    return 2;
  }

  lema::test::TempDir dir("torch-bench");
  const auto path = dir.path() / "model.safetensors";
  const Weights weights = lema::test::make_llama_weights(config, 7);
  const std::uint64_t bytes = lema::test::weight_bytes(weights);
  lema::test::write_weights(path, weights);
  std::printf(
      "model: hidden %ld, intermediate %ld, layers %ld, %ld tokens x %ld, %.1f MiB f32 "
      "(largest layer matrix %.1f MiB); %d threads, median of %d steps, policy %s\n",
      static_cast<long>(config.hidden), static_cast<long>(config.intermediate),
      static_cast<long>(config.layers), static_cast<long>(config.seq),
      static_cast<long>(config.batch), static_cast<double>(bytes) / (1 << 20),
      static_cast<double>(config.hidden * config.intermediate * 4) / (1 << 20), threads, steps,
      argc > 7 ? argv[7] : "lru");

  // Variants run in rounds, interleaved, and each ratio is taken against the plain run of the
  // same round: on a shared machine the load moves by tens of percent within a minute, which a
  // start-and-end baseline cannot separate from the overhead being measured.
  struct Variant {
    std::string label;
    std::uint64_t budget;
    lema::runtime::ResidencyMode mode;
    std::optional<lema::torch::VirtualCheckpoint> checkpoint = {};
    Weights weights = {};
    std::vector<double> ms = {}, ratios = {};
  };
  std::vector<Variant> variants;
  // Everything fits (twice the weights covers page padding between groups): the guard alone.
  variants.push_back({"guard, fully resident", 2 * bytes, lema::runtime::ResidencyMode::guard});
  variants.push_back({"guard, quarter budget", bytes / 4, lema::runtime::ResidencyMode::guard});
  variants.push_back({"fault, quarter budget", bytes / 4, lema::runtime::ResidencyMode::fault});
  for (Variant& v : variants) {
    lema::torch::Options options;
    options.budget_bytes = v.budget;
    options.mode = v.mode;
    options.policy = *policy;
    v.checkpoint.emplace(lema::torch::open(path, options));
    if (v.checkpoint->mode() != v.mode) {
      std::printf("%-23s skipped: %s\n", v.label.c_str(), v.checkpoint->fallback_reason().c_str());
      v.checkpoint.reset();
      continue;
    }
    v.weights = as_map(*v.checkpoint);
  }
  const Weights plain_weights = lema::test::read_weights_fully(path);
  std::vector<double> plain_ms;
  for (int round = 0; round < rounds; ++round) {
    const double plain = median_step_ms(config, plain_weights, steps);
    plain_ms.push_back(plain);
    for (Variant& v : variants) {
      if (!v.checkpoint) continue;
      const double ms =
          median_step_ms(config, v.weights, steps, [&] { v.checkpoint->mark_step(); });
      v.ms.push_back(ms);
      v.ratios.push_back(ms / plain);
    }
  }
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x.empty() ? 0.0 : x[x.size() / 2];
  };
  auto spread = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x.empty() ? std::pair{0.0, 0.0} : std::pair{x.front(), x.back()};
  };
  const auto [plain_lo, plain_hi] = spread(plain_ms);
  std::printf("%-23s %9.2f ms/step (rounds %.2f..%.2f)\n", "plain tensors", median(plain_ms),
              plain_lo, plain_hi);
  for (const Variant& v : variants) {
    if (!v.checkpoint) continue;
    const auto s = v.checkpoint->stats();
    const auto [lo, hi] = spread(v.ratios);
    std::printf(
        "%-23s %9.2f ms/step  %.3fx plain (median of %d rounds, %.3f..%.3f)  budget %.1f MiB, "
        "faults %lu, hits %lu, prefetches %lu used / %lu wasted, stall %.1f ms\n",
        v.label.c_str(), median(v.ms), median(v.ratios), rounds, lo, hi,
        static_cast<double>(v.budget) / (1 << 20), static_cast<unsigned long>(s.faults),
        static_cast<unsigned long>(s.hits), static_cast<unsigned long>(s.prefetches_used),
        static_cast<unsigned long>(s.prefetches_wasted), static_cast<double>(s.stall_ns) / 1e6);
  }
  return 0;
}
