// The property the plugin exists for: an unmodified libtorch training loop over weights of a
// VirtualCheckpoint, under a budget of a quarter of the weights, computes exactly what it
// computes over weights loaded fully into memory.
#include <ATen/Parallel.h>
#include <ATen/ops/equal.h>
#include <gtest/gtest.h>

#include <memory>

#include "lema/torch/virtual_checkpoint.hpp"
#include "runtime_fixture.hpp"
#include "support/llama_lora.hpp"

namespace lema::test {
namespace {

constexpr int kSteps = 3;

class TrainingEquivalence : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    at::set_num_threads(1);  // one thread: reductions sum in a fixed order
    dir_ = std::make_unique<TempDir>("torch-train");
    path_ = dir_->path() / "model.safetensors";
    const Weights weights = make_llama_weights(config_, 7);
    bytes_ = weight_bytes(weights);
    write_weights(path_, weights);
    reference_ =
        std::make_unique<TrainResult>(train_lora(config_, read_weights_fully(path_), kSteps));
  }
  static void TearDownTestSuite() {
    reference_.reset();
    dir_.reset();
  }

  static void expect_same_training(const TrainResult& got) {
    // The loop must actually learn, or equality would prove little.
    ASSERT_LT(reference_->losses.back().item<float>(), reference_->losses.front().item<float>());
    ASSERT_EQ(got.losses.size(), reference_->losses.size());
    for (std::size_t i = 0; i < got.losses.size(); ++i) {
      EXPECT_TRUE(at::equal(got.losses[i], reference_->losses[i]))
          << "step " << i + 1 << ": " << got.losses[i].item<float>() << " vs "
          << reference_->losses[i].item<float>();
    }
    for (const auto& [name, adapter] : reference_->adapters) {
      EXPECT_TRUE(at::equal(got.adapters.at(name), adapter)) << name;
    }
  }

  static torch::Options quarter_budget(runtime::ResidencyMode mode) {
    torch::Options options;
    options.budget_bytes = bytes_ / 4;
    options.mode = mode;
    return options;
  }

  static Weights as_map(const torch::VirtualCheckpoint& checkpoint) {
    Weights weights;
    for (auto& [name, t] : checkpoint.named_tensors()) weights[name] = t;
    return weights;
  }

  static inline LlamaConfig config_;
  static inline std::unique_ptr<TempDir> dir_;
  static inline std::filesystem::path path_;
  static inline std::uint64_t bytes_ = 0;
  static inline std::unique_ptr<TrainResult> reference_;
};

TEST_F(TrainingEquivalence, GuardModeUnderAQuarterBudgetTrainsBitForBit) {
  torch::VirtualCheckpoint checkpoint =
      torch::open(path_, quarter_budget(runtime::ResidencyMode::guard));
  ASSERT_EQ(checkpoint.mode(), runtime::ResidencyMode::guard);
  const runtime::PagerStats before = checkpoint.stats();
  ASSERT_GE(bytes_ / 4 / before.page_size, 2u) << "the budget must hold several pages";

  const TrainResult got =
      train_lora(config_, as_map(checkpoint), kSteps, [&] { checkpoint.mark_step(); });
  expect_same_training(got);

  const runtime::PagerStats after = checkpoint.stats();
  EXPECT_LE(after.peak_resident_bytes, bytes_ / 4);
  EXPECT_GT(after.evictions, 0u) << "the weights did not fit, so pages must have been evicted";
  EXPECT_GE(after.bytes_read, bytes_) << "every weight is read at least once per step";
}

TEST_F(TrainingEquivalence, GuardModeWithTheTracePolicyAndPrefetchTrainsBitForBit) {
  torch::Options options = quarter_budget(runtime::ResidencyMode::guard);
  options.policy = runtime::PolicyKind::trace;
  torch::VirtualCheckpoint checkpoint = torch::open(path_, options);
  const TrainResult got =
      train_lora(config_, as_map(checkpoint), kSteps, [&] { checkpoint.mark_step(); });
  expect_same_training(got);
  EXPECT_LE(checkpoint.stats().peak_resident_bytes, bytes_ / 4);
}

TEST_F(TrainingEquivalence, FaultModeWithoutGuardTrainsBitForBit) {
  torch::VirtualCheckpoint checkpoint =
      torch::open(path_, quarter_budget(runtime::ResidencyMode::fault));
  if (checkpoint.mode() != runtime::ResidencyMode::fault) {
    GTEST_SKIP() << "fault mode unavailable here: " << checkpoint.fallback_reason();
  }
  const TrainResult got =
      train_lora(config_, as_map(checkpoint), kSteps, [&] { checkpoint.mark_step(); });
  expect_same_training(got);
  const runtime::PagerStats after = checkpoint.stats();
  EXPECT_LE(after.peak_resident_bytes, bytes_ / 4);
  EXPECT_GT(after.evictions, 0u);
}

}  // namespace
}  // namespace lema::test
