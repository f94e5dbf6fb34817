// Step time of the reference LoRA trainer (lema::trainer, AdamW, activation checkpointing) on one
// model, three ways in the same process, interleaved in rounds so each ratio is taken against
// the plain run of the same round:
//   plain      the model over tensors read fully into memory: libtorch alone, no LEMA;
//   unlimited  over a guard-mode VirtualCheckpoint holding every page (the guard's cost);
//   budget     over a guard-mode VirtualCheckpoint with the given budget (paging's cost);
//   no fallback the budget run without the guard's fault fallback (what arming it costs);
//   huge       the same over a pool of huge pages, where the system has enough free.
//
//   train_step_bench MODEL_DIR BUDGET [seq_len 128] [batch 2] [steps per round 3] [rounds 3]
//                    [threads 0: torch's default] [policy trace]
//
// Prints the median step time of each, tokens/s, the ratios and the pager's counters.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/torch/virtual_checkpoint.hpp"
#include "lema/trainer/llama_model.hpp"
#include "lema/trainer/trainer.hpp"
#include "lema/trainer/weights.hpp"

namespace {

namespace fs = std::filesystem;
using namespace lema;

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x.empty() ? 0.0 : x[x.size() / 2];
}

struct Variant {
  std::string label;
  std::optional<lema::torch::VirtualCheckpoint> checkpoint;
  std::unique_ptr<trainer::LlamaModel> model;
  std::unique_ptr<trainer::Trainer> trainer;
  std::vector<double> step_s, ratios;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s MODEL_DIR BUDGET [seq_len] [batch] [steps/round] [rounds] [threads] "
                 "[policy]\n",
                 argv[0]);
    return 2;
  }
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  const fs::path dir = argv[1];
  const std::uint64_t budget = parse_size(argv[2], "BUDGET");
  const std::int64_t seq_len = arg(3, 128), batch = arg(4, 2);
  const int steps = static_cast<int>(arg(5, 3)), rounds = static_cast<int>(arg(6, 3));
  if (arg(7, 0) > 0) at::set_num_threads(static_cast<int>(arg(7, 0)));
  const auto policy = runtime::parse_policy(argc > 8 ? argv[8] : "trace");
  if (!policy) {
    std::fprintf(stderr, "policy must be lru or trace\n");
    return 2;
  }

  const trainer::ModelConfig config = trainer::ModelConfig::from_hf_dir(dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  const runtime::Layout layout = runtime::Layout::plan(ckpt, std::uint64_t{2} << 20);
  const fs::path scratch = fs::temp_directory_path() / ("train_step_bench." + std::to_string(::getpid()));

  // Enough synthetic sequences that no round repeats data.
  const std::int64_t sequences = static_cast<std::int64_t>(rounds) * steps * batch + 1;
  std::vector<std::uint32_t> tokens(static_cast<std::size_t>(sequences * seq_len));
  std::mt19937_64 rng(7);
  for (auto& t : tokens) t = static_cast<std::uint32_t>(rng() % config.vocab_size);

  const bool huge = runtime::huge_page_pool().available * (std::uint64_t{2} << 20) >= budget;
  std::vector<Variant> variants(huge ? 5 : 4);
  variants[0].label = "plain libtorch";
  variants[1].label = "LEMA, unlimited";
  variants[2].label = "LEMA, budget " + format_size(budget);
  variants[3].label = "LEMA, budget, no fallback";  // the guard's fault fallback off: its cost
  if (huge) variants[4].label = "LEMA, budget, huge pages";
  for (std::size_t i = 0; i < variants.size(); ++i) {
    Variant& v = variants[i];
    trainer::LlamaModelOptions options;
    options.seed = 1;
    if (i == 0) {
      v.model = std::make_unique<trainer::LlamaModel>(config, trainer::read_tensors(dir), options);
    } else {
      lema::torch::Options o;
      o.budget_bytes = i == 1 ? layout.virtual_bytes() : budget;
      o.policy = *policy;
      o.huge_pages = i == 4;
      o.fault_fallback = i != 3;
      v.checkpoint.emplace(lema::torch::open(dir, o));
      v.model = std::make_unique<trainer::LlamaModel>(config, trainer::lookup_in(*v.checkpoint),
                                                      options);
    }
    trainer::TrainOptions t;
    t.steps = 1'000'000;
    t.batch = batch;
    t.seq_len = seq_len;
    t.lr = 1e-3;
    t.seed = 1;
    t.out_dir = scratch / std::to_string(i);
    v.trainer = std::make_unique<trainer::Trainer>(
        *v.model, trainer::TokenBatches(tokens, "synthetic", seq_len, batch, 1), t,
        trainer::RunIdentity{"bench", dir.string(), options.lora});
    v.trainer->step();  // warm-up: first-touch allocations, the trace policy's first step
    if (v.checkpoint) v.checkpoint->mark_step();
  }

  std::printf("model %s: %ld layers, hidden %ld, %s of weights; %ld x %ld tokens per step, %d "
              "threads, %d rounds of %d steps, policy %s\n",
              dir.c_str(), static_cast<long>(config.num_hidden_layers),
              static_cast<long>(config.hidden_size), format_size(layout.tensor_bytes()).c_str(),
              static_cast<long>(batch), static_cast<long>(seq_len), at::get_num_threads(), rounds,
              steps, argc > 8 ? argv[8] : "trace");
  for (int round = 0; round < rounds; ++round) {
    double plain = 0;
    for (std::size_t i = 0; i < variants.size(); ++i) {
      Variant& v = variants[i];
      std::vector<double> times;
      for (int s = 0; s < steps; ++s) {
        times.push_back(v.trainer->step().step_time_s);
        if (v.checkpoint) v.checkpoint->mark_step();
      }
      const double m = median(times);
      v.step_s.push_back(m);
      if (i == 0) plain = m;
      v.ratios.push_back(m / plain);
    }
  }
  for (const Variant& v : variants) {
    const double s = median(v.step_s);
    std::printf("%-24s %8.3f s/step %8.0f tokens/s  %.3fx plain (rounds %.3f..%.3f)",
                v.label.c_str(), s, static_cast<double>(batch * seq_len) / s, median(v.ratios),
                *std::min_element(v.ratios.begin(), v.ratios.end()),
                *std::max_element(v.ratios.begin(), v.ratios.end()));
    if (v.checkpoint) {
      const auto st = v.checkpoint->stats();
      std::printf("  faults %lu, read %s, stall %.2f s, prefetches %lu used / %lu wasted, peak %s",
                  static_cast<unsigned long>(st.faults), format_size(st.bytes_read).c_str(),
                  static_cast<double>(st.stall_ns) * 1e-9,
                  static_cast<unsigned long>(st.prefetches_used),
                  static_cast<unsigned long>(st.prefetches_wasted),
                  format_size(st.peak_resident_bytes).c_str());
    }
    std::printf("\n");
  }
  std::error_code ec;
  fs::remove_all(scratch, ec);
  return 0;
}
