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

/// How the ids of a batch of prepared examples are laid out ([batch, seq] int64 each; undefined
/// when not given).
struct SequenceLayout {
  /// 1 on an example's tokens, 0 on padding (transformers' 2-D attention mask). Padding is on
  /// the right, so attention needs no mask for it; Mixtral's router loss leaves it out.
  at::Tensor attention_mask;
  /// Packed rows: each example's positions, restarting at 0 where an example starts; attention
  /// stays within each example (a block-diagonal causal mask).
  at::Tensor position_ids;
};

class TrainableModel {
 public:
  virtual ~TrainableModel() = default;

  /// Mean next-token cross entropy of `input_ids` ([batch, seq] int64), the way Hugging Face
  /// computes it with labels = input_ids: position t predicts token t + 1. A float32 scalar
  /// with a graph back to the adapters.
  virtual at::Tensor loss(const at::Tensor& input_ids) = 0;

  /// The same with `labels` ([batch, seq] int64): position t predicts labels[t + 1], and labels
  /// of -100 take no loss; the mean is over the labels that count (transformers' loss with
  /// labels). `layout` says where the examples are (SequenceLayout). Models that cannot take
  /// labels refuse them.
  virtual at::Tensor masked_loss(const at::Tensor& input_ids, const at::Tensor& labels,
                                 const SequenceLayout& layout = {});

  /// The adapter parameters (requires_grad), keyed by their PEFT names
  /// ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ...), in a fixed order.
  virtual std::vector<std::pair<std::string, at::Tensor>> named_trainable() = 0;

  /// Training mode (dropout on) or evaluation mode.
  virtual void set_training(bool training) = 0;

  virtual std::int64_t vocab_size() const = 0;
};

}  // namespace lema::trainer
