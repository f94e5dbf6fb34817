// The training loop: AdamW on a TrainableModel's adapters, fed by TokenBatches.
//
// One step = grad_accum micro-batches of `batch` sequences, each loss scaled by 1/grad_accum
// and back-propagated; then the gradients' total L2 norm is clipped to max_grad_norm, the
// learning rate set from the schedule (train_options.hpp) and AdamW steps. The same seed, data
// and model give the same losses and adapters bit for bit, also across a checkpoint and resume
// (train_state.hpp) when the resumed run keeps the settings the checkpoint records.
//
// Seeding: the constructor seeds torch's global generators with options.seed (dropout draws
// from them); a resume restores their state from the checkpoint. Not thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lema/trainer/adapter.hpp"
#include "lema/trainer/token_batches.hpp"
#include "lema/trainer/train_state.hpp"
#include "lema/trainer/train_options.hpp"
#include "lema/trainer/trainable_model.hpp"

namespace lema::trainer {

class ProcessGroup;     // distributed.hpp
class GradientBuckets;  // distributed.hpp
/// The default size of a bucket of gradients averaged in one all-reduce.
inline constexpr std::int64_t kDefaultBucketBytes = std::int64_t{25} << 20;

/// Who the adapters belong to: written into adapter_config.json and checked on resume.
struct RunIdentity {
  std::string model_fingerprint;        // model_fingerprint(model_dir) (train_state.hpp)
  std::string base_model_name_or_path;  // adapter_config.json's
  LoraSettings lora;
};

struct StepResult {
  std::int64_t step = 0;    // 1-based number of the step just taken
  double loss = 0;          // mean of the micro-batches' losses
  std::int64_t tokens = 0;  // tokens fed this step: grad_accum · batch · seq_len
  double step_time_s = 0;   // wall time of the step, forward to optimizer update
  double lr = 0;            // the learning rate this step used
  double grad_norm = 0;     // total L2 norm of the gradients before clipping
  std::optional<double> eval_loss;  // run() only: the validation loss after this step, when due
};

class Trainer {
 public:
  /// Validates `options` (and that `data` was packed with options.batch and seq_len), takes
  /// options.out_dir's lock for the Trainer's life (OutputDirLock::acquire, unless `lock`
  /// already holds it: a caller may lock before its slower preparations), and seeds torch's
  /// generators. Throws InvalidArgument naming the setting, or the run holding the directory.
  /// `model` must outlive the Trainer.
  ///
  /// With `group` (data parallelism, distributed.hpp) every rank trains on its share of `data`
  /// (TokenBatches::set_shard), starts from rank 0's adapters, averages the gradients over the
  /// ranks in buckets of `bucket_bytes` and takes the same steps; only rank 0 takes the lock and
  /// writes into out_dir. trainer_state.json records the global batch (ranks × batch), so a
  /// checkpoint resumes under any number of ranks that gives the same global batch.
  /// `group` must outlive the Trainer.
  Trainer(TrainableModel& model, TokenBatches data, TrainOptions options, RunIdentity identity,
          std::optional<OutputDirLock> lock = std::nullopt, ProcessGroup* group = nullptr,
          std::int64_t bucket_bytes = kDefaultBucketBytes);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Takes one optimizer step.
  StepResult step();

  /// Validation data (packed with batch 1): run() evaluates after every `every` steps (0: only
  /// after the last) and records the losses in trainer_state.json's eval_losses.
  void set_eval_data(TokenBatches eval, std::int64_t every);
  /// The mean next-token loss over every eval sequence (the learned tokens of prepared
  /// examples), in evaluation mode without gradients; draws nothing from the RNG.
  double evaluate();
  const std::vector<std::pair<std::int64_t, double>>& eval_losses() const noexcept {
    return eval_losses_;
  }

  /// Steps until options.steps, writing a checkpoint every save_every steps and the final
  /// adapter at the end (save_final); `on_step` sees each result.
  void run(const std::function<void(const StepResult&)>& on_step = {});

  /// Steps taken so far (restored by resume).
  std::int64_t step_count() const noexcept { return step_; }
  bool finished() const noexcept { return step_ >= options_.steps; }
  /// True when a checkpoint is due after the step just taken (save_every).
  bool checkpoint_due() const noexcept;

  /// Writes out_dir/checkpoint-<step> (adapter, optimizer, trainer_state.json) atomically and
  /// points out_dir/latest at it. Returns its path.
  std::filesystem::path save_checkpoint();
  /// The checkpoint of the current step (unless it exists) and the adapter files in out_dir.
  void save_final();

  /// Continues from the newest complete checkpoint in out_dir: checks that it matches this run
  /// (check_resumable: model, LoRA shape, seq_len, batch, grad_accum, seed, data) and restores
  /// the adapters, AdamW's state, torch's RNG, the data position and the step count. Returns
  /// the checkpoint used; nullopt (nothing changed) when out_dir holds none. Throws
  /// InvalidArgument (one line, naming the setting and both values) on a mismatch.
  std::optional<std::filesystem::path> resume();
  /// The same from a given checkpoint directory.
  void resume_from(const std::filesystem::path& checkpoint_dir);

  const TrainOptions& options() const noexcept { return options_; }
  /// Whether this process writes checkpoints and adapters: rank 0, or the only process.
  bool writes_output() const noexcept;
  /// Ranks × batch: the sequences of one micro-step over all ranks.
  std::int64_t global_batch() const noexcept;
  const TokenBatches& data() const noexcept { return data_; }
  TrainableModel& model() noexcept { return model_; }

 private:
  struct Optimizer;

  /// Throws when `saved` (read from dir) disagrees with its directory's name or with itself
  /// (the data position a step implies).
  void check_consistent(const TrainState& saved, const std::filesystem::path& dir) const;

  TrainableModel& model_;
  TokenBatches data_;
  TrainOptions options_;
  RunIdentity identity_;
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::optional<OutputDirLock> lock_;
  std::unique_ptr<Optimizer> optimizer_;
  std::int64_t step_ = 0;
  std::int64_t last_saved_step_ = -1;
  std::optional<TokenBatches> eval_data_;
  std::int64_t eval_every_ = 0;
  std::vector<std::pair<std::int64_t, double>> eval_losses_;  // (step, loss)
  ProcessGroup* group_ = nullptr;
  std::unique_ptr<GradientBuckets> buckets_;
};

}  // namespace lema::trainer
