// The decoder of every supported family (Llama 1-3, Mistral, Qwen2/Qwen2.5, Qwen3, GPT-2; see
// model_config.hpp) in libtorch, with LoRA adapters on chosen projections. It computes what
// transformers' *ForCausalLM / GPT2LMHeadModel compute for the same weights (Llama layout:
// RMSNorm in float32, rotary embeddings with optional llama3 scaling, grouped-query causal
// attention with Qwen's biases and q/k norms, SwiGLU MLP; GPT-2: learned positions, LayerNorm,
// Conv1D projections, GELU MLP; tied or untied output projection), in evaluation mode apart from
// the adapters' dropout, and what peft's LoRA layers add: y = x W^T + dropout(x) A^T B^T * alpha
// / r. (The class keeps the name of the family it started with.)
//
// The base weights are looked up once, at construction, and never given gradients: they may be
// read-only paged tensors of a lema::torch::VirtualCheckpoint in any float dtype; they are cast
// to the compute dtype where they are used. The adapters are float32 leaves.
//
// Thread safety: none; one thread drives a model (autograd may run its backward elsewhere).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lema/trainer/adapter.hpp"
#include "lema/trainer/kv_cache.hpp"
#include "lema/trainer/model_config.hpp"
#include "lema/trainer/trainable_model.hpp"
#include "lema/trainer/weights.hpp"

namespace lema::trainer {

struct LlamaModelOptions {
  LoraSettings lora;
  /// Seeds the adapters' initial values (A: kaiming-uniform as peft does, B: zeros). Dropout
  /// draws from the default CPU generator (torch::manual_seed), as torch's dropout does, so a
  /// training checkpoint that saves that generator's state resumes exactly.
  std::uint64_t seed = 0;
  /// Float32, BFloat16 or Half. Norms, rotary tables and the loss are computed in float32.
  c10::ScalarType compute_dtype = c10::ScalarType::Float;
  /// Keep only each decoder layer's input in forward and recompute the layer in backward (see
  /// Note [Layer checkpointing]). Applies whenever gradients are recorded.
  bool activation_checkpointing = true;
  /// Mixtral, Qwen2-MoE: called with the weight names of the routed experts a layer's router
  /// chose, right after it ran and before any of them is read (the CLI passes them to
  /// VirtualCheckpoint::prefetch).
  std::function<void(const std::vector<std::string>&)> expert_prefetch;
  /// Mixtral, Qwen2-MoE: called with the weight names of the experts a router did not choose, just
  /// before expert_prefetch (the CLI passes them to VirtualCheckpoint::demote, so those experts
  /// are the first evicted when room is needed). A hint: it never changes a number.
  std::function<void(const std::vector<std::string>&)> expert_demote;
};

namespace detail {
struct DecoderLayer;
}

class LlamaModel : public TrainableModel {
 public:
  /// Looks up every weight of expected_tensors(config) and checks its shape; throws
  /// InvalidArgument naming the tensor, the expected and the actual shape, an unknown LoRA
  /// target module, a rank below 1, a dropout outside [0, 1) or an unsupported compute dtype.
  LlamaModel(ModelConfig config, const WeightLookup& weights, LlamaModelOptions options = {});
  LlamaModel(ModelConfig config, const std::map<std::string, at::Tensor>& weights,
             LlamaModelOptions options = {});
  ~LlamaModel() override;
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;
  LlamaModel(LlamaModel&&) noexcept;
  LlamaModel& operator=(LlamaModel&&) noexcept;

  /// [batch, seq, vocab] float32 logits of `input_ids` ([batch, seq] integer). Throws
  /// InvalidArgument for ids outside [0, vocab_size), a wrong rank, a sequence past the model's
  /// positions, or (Mistral, Qwen with a window) one longer than the sliding window.
  /// With `cache`, the ids continue the cached positions, and their keys and values are added to
  /// it: logits(all) equals logits(first part, c) then logits(rest, c) (no gradients needed).
  at::Tensor logits(const at::Tensor& input_ids, KvCache* cache = nullptr);
  /// The same for ids laid out as `layout` says (packed rows attend within each example;
  /// Note [Packed attention]); a cache takes no packed rows.
  at::Tensor logits(const at::Tensor& input_ids, KvCache* cache, const SequenceLayout& layout);
  /// Mean next-token cross entropy (labels = input_ids, as transformers computes it); seq >= 2.
  /// Mixtral and Qwen2-MoE with output_router_logits add router_aux_loss_coef times the router's
  /// load-balancing loss (Note [Router auxiliary loss]), as transformers does given labels.
  at::Tensor loss(const at::Tensor& input_ids) override;
  /// With `layout`: packed rows (position_ids) attend within each example; the router
  /// loss leaves out the tokens the attention mask marks as padding.
  at::Tensor masked_loss(const at::Tensor& input_ids, const at::Tensor& labels,
                         const SequenceLayout& layout = {}) override;

  /// Every adapter matrix, PEFT-named, layer by layer, modules in the order q k v o gate up
  /// down, A before B. The tensors are the parameters themselves.
  std::vector<std::pair<std::string, at::Tensor>> named_trainable() override;
  void set_training(bool training) override;
  bool training() const { return training_; }
  std::int64_t vocab_size() const override { return config_.vocab_size; }

  const ModelConfig& config() const { return config_; }
  const LlamaModelOptions& options() const { return options_; }
  void set_activation_checkpointing(bool enabled) { options_.activation_checkpointing = enabled; }

  /// Copies of the adapter values, PEFT key → float32 CPU tensor (what save_adapter writes).
  std::map<std::string, at::Tensor> adapter_tensors() const;
  /// Sets the adapter values (any float dtype; converted). Every key of named_trainable() must be
  /// present with its shape and no other key: throws InvalidArgument naming the key otherwise.
  void load_adapter_tensors(const std::map<std::string, at::Tensor>& tensors);

 private:
  at::Tensor hidden_states(const at::Tensor& input_ids, KvCache* cache,
                           const SequenceLayout& layout);
  at::Tensor logits_for_loss(const at::Tensor& input_ids, const SequenceLayout& layout = {});
  at::Tensor with_router_loss(const at::Tensor& loss);
  std::vector<std::pair<std::string, at::Tensor>> named_adapters() const;

  ModelConfig config_;
  LlamaModelOptions options_;
  bool training_ = true;
  at::Tensor embed_tokens_, norm_, lm_head_;
  at::Tensor position_embed_, norm_bias_;  // GPT-2's learned positions and final LayerNorm bias
  at::Tensor inv_freq_;  // float32 [head_dim / 2]
  std::vector<std::unique_ptr<detail::DecoderLayer>> layers_;
  bool want_router_stats_ = false;  // set by the loss functions around their forward
  at::Tensor router_aux_loss_;      // of the last forward that wanted it
};

}  // namespace lema::trainer
