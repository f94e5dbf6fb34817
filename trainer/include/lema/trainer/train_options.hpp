// The settings of a training run, and the learning-rate schedule they define.
#pragma once

#include <cstdint>
#include <filesystem>

namespace lema::trainer {

struct TrainOptions {
  std::int64_t steps = 0;       // optimizer steps the run ends at
  std::int64_t batch = 1;       // sequences per micro-batch
  std::int64_t seq_len = 0;     // tokens per sequence
  std::int64_t grad_accum = 1;  // micro-batches per optimizer step (the loss is scaled by 1/G)

  // AdamW with decoupled weight decay (torch::optim::AdamW).
  double lr = 2e-4;  // peak learning rate
  double weight_decay = 0.01;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;

  // Schedule: linear warm-up to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at
  // step schedule_steps (0: at `steps`). A run split across a resume keeps its schedule only
  // when both parts use the same horizon.
  std::int64_t warmup_steps = 0;
  double min_lr_ratio = 0.1;
  std::int64_t schedule_steps = 0;

  double max_grad_norm = 1.0;     // clip the total L2 norm of the gradients; 0: no clipping
  std::uint64_t seed = 0;         // torch's generators (dropout) and the data shuffle
  std::int64_t save_every = 0;    // a checkpoint every K steps (0: only at the end)
  std::filesystem::path out_dir;  // checkpoints and the final adapter
};

/// Throws InvalidArgument naming the first setting out of range (as its command-line flag).
void validate(const TrainOptions& options);

/// The learning rate of step `step` (1-based: the first optimizer step is step 1):
///   step ≤ W:  lr · step / W
///   step > W:  lr_min + (lr − lr_min) · ½ (1 + cos(π · min(1, (step − W) / (H − W))))
/// with W = warmup_steps, H = schedule_steps or steps, lr_min = lr · min_lr_ratio. The first
/// step already learns (unlike a 0-based warm-up whose first step has lr 0), and step H has lr_min.
double scheduled_lr(const TrainOptions& options, std::int64_t step);

}  // namespace lema::trainer
