// Step time of the LoRA training loop (tests/torch/support) over plain tensors, over a guard-mode
// checkpoint that holds every weight, and under a quarter budget (guard, and fault where
// userfaultfd is allowed). Prints the median step time of each and the ratios.
//
//   torch_step_bench [hidden] [intermediate] [layers] [tokens per sequence] [steps] [threads]
//                    [policy: lru|trace]
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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

  const double plain = median_step_ms(config, lema::test::read_weights_fully(path), steps);
  std::printf("plain tensors:              %9.2f ms/step\n", plain);

  auto run = [&](const char* label, std::uint64_t budget, lema::runtime::ResidencyMode mode) {
    lema::torch::Options options;
    options.budget_bytes = budget;
    options.mode = mode;
    options.policy = *policy;
    lema::torch::VirtualCheckpoint checkpoint = lema::torch::open(path, options);
    if (checkpoint.mode() != mode) {
      std::printf("%-27s skipped: %s\n", label, checkpoint.fallback_reason().c_str());
      return;
    }
    const double ms =
        median_step_ms(config, as_map(checkpoint), steps, [&] { checkpoint.mark_step(); });
    const auto s = checkpoint.stats();
    std::printf(
        "%-27s %9.2f ms/step  %.3fx plain  (budget %.1f MiB, faults %lu, hits %lu, "
        "stall %.1f ms)\n",
        label, ms, ms / plain, static_cast<double>(budget) / (1 << 20),
        static_cast<unsigned long>(s.faults), static_cast<unsigned long>(s.hits),
        static_cast<double>(s.stall_ns) / 1e6);
  };
  // Everything fits (twice the weights covers page padding between groups): the guard alone.
  run("guard, fully resident:", 2 * bytes, lema::runtime::ResidencyMode::guard);
  run("guard, quarter budget:", bytes / 4, lema::runtime::ResidencyMode::guard);
  run("fault, quarter budget:", bytes / 4, lema::runtime::ResidencyMode::fault);
  // Again at the end: how much the machine's load moved the baseline meanwhile.
  std::printf("plain tensors, again:       %9.2f ms/step\n",
              median_step_ms(config, lema::test::read_weights_fully(path), steps));
  return 0;
}
