// What the training loop drives: a model with frozen base weights, LoRA adapters and a loss.
// The loop (trainer.hpp) knows nothing else about the model, so tests can drive it with a small
// stand-in and the Llama decoder (llama_model.hpp) is one implementation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lema::trainer {

class TrainableModel {
 public:
  virtual ~TrainableModel() = default;

  /// Mean next-token cross entropy of `input_ids` ([batch, seq] int64), the way Hugging Face
  /// computes it with labels = input_ids: position t predicts token t + 1. A float32 scalar
  /// with a graph back to the adapters.
  virtual at::Tensor loss(const at::Tensor& input_ids) = 0;

  /// The same with `labels` ([batch, seq] int64): position t predicts labels[t + 1], and labels
  /// of -100 take no loss; the mean is over the labels that count (transformers' loss with
  /// labels). Models that cannot take labels refuse them.
  virtual at::Tensor masked_loss(const at::Tensor& input_ids, const at::Tensor& labels);

  /// The adapter parameters (requires_grad), keyed by their PEFT names
  /// ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ...), in a fixed order.
  virtual std::vector<std::pair<std::string, at::Tensor>> named_trainable() = 0;

  /// Training mode (dropout on) or evaluation mode.
  virtual void set_training(bool training) = 0;

  virtual std::int64_t vocab_size() const = 0;
};

}  // namespace lema::trainer
