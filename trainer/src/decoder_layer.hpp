// One decoder layer of either layout (model_config.hpp), each sub-block pre-norm with a residual:
//   Llama layout: RMSNorm → attention (q/k/v/o, optional biases and q/k norms, rotary) →
//                 RMSNorm → SwiGLU MLP (gate/up/down);
//   Mixtral:      the Llama layout with a sparse mixture of SwiGLU experts for the MLP
//                 (Note [Routed experts]);
//   Qwen2-MoE:    Qwen2's attention; a sparse layer routes like Mixtral (with or without
//                 renormalizing the top k) and adds a gated shared expert (Note [Shared expert]),
//                 a dense one has the SwiGLU MLP;
//   GPT-2:        LayerNorm → attention (fused c_attn, c_proj) → LayerNorm → GELU MLP
//                 (c_fc, c_proj); positions come from the model's learned table, not rotations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lema/trainer/kv_cache.hpp"
#include "lema/trainer/model_config.hpp"
#include "lora_linear.hpp"
#include "rotary.hpp"

namespace lema::trainer::detail {

/// Hugging Face's LlamaRMSNorm: normalized in float32, cast back, then scaled.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

using LayerCache = LayerKv;

/// What the router of one layer decided over a forward pass, for the auxiliary loss: the sum over
/// rows of the router's softmax (float32 [experts], with gradients) and how many (row, choice)
/// pairs chose each expert (float32 [experts], no gradients).
struct RouterStats {
  at::Tensor prob_sum;
  at::Tensor counts;
};

// Note [Routed experts]
// Mixtral's block computes, as transformers' MixtralSparseMoeBlock does: router logits
// x G^T, probabilities softmax(logits) in float32, the top k of them renormalized to sum to one
// (Qwen2-MoE: only when norm_topk_prob is set), and for each expert e the rows that chose it:
// w2(silu(w1 x) * w3 x) times the row's weight for e, summed into the output. Each expert runs
// only on the rows that chose it (index_select), and an expert no row chose is skipped before
// any of its weights is touched: under a budget its pages are never read, so a step reads only
// the chosen experts' bytes.
struct Expert {
  // gate [m, h], down [h, m], up [m, h] (Qwen2-MoE's gate_proj, down_proj, up_proj); never
  // adapted
  LoraLinear w1, w2, w3;
};

struct DecoderLayer {
  ModelFamily family = ModelFamily::kLlama;
  std::int64_t index = 0;
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  double norm_eps = 1e-6;
  std::string hidden_act = "silu";
  // First and second norm (input_layernorm / post_attention_layernorm, or ln_1 / ln_2); the
  // biases are defined for GPT-2's LayerNorm only.
  at::Tensor norm1, norm1_bias, norm2, norm2_bias;
  at::Tensor q_norm, k_norm;  // Qwen3; undefined otherwise
  at::Tensor router;          // Mixtral's gate [experts, hidden]; undefined for a dense MLP
  std::vector<Expert> experts;
  std::int64_t top_k = 0;
  bool norm_topk = true;          // renormalize the chosen experts' weights
  at::Tensor shared_expert_gate;  // Qwen2-MoE's [1, hidden]; undefined: no shared expert
  /// In peft's and named_trainable()'s order: q k v o gate up down (Mixtral: q k v o; a sparse
  /// Qwen2-MoE layer: q k v o and its shared expert's gate up down), or GPT-2's c_attn,
  /// attn.c_proj, c_fc, mlp.c_proj.
  std::vector<LoraLinear> projections;

  /// The adapter leaves of this layer (A, B per adapted projection).
  std::vector<at::Tensor> adapter_parameters() const;

  /// `x` is [batch, seq, hidden] at positions cache->seen .. +seq (0 without a cache); `rope`
  /// covers those positions (unused by GPT-2). With a cache, this call's keys and values are
  /// appended to it. With `router_stats` (a layer with a router), the router's decision is
  /// stored there.
  at::Tensor forward(const at::Tensor& x, const RopeTables& rope, const ForwardContext& ctx,
                     LayerCache* cache = nullptr, RouterStats* router_stats = nullptr) const;

 private:
  at::Tensor llama_forward(const at::Tensor& x, const RopeTables& rope, const ForwardContext& ctx,
                           LayerCache* cache, RouterStats* router_stats) const;
  at::Tensor experts_forward(const at::Tensor& x, const ForwardContext& ctx,
                             RouterStats* router_stats) const;
  at::Tensor gpt2_forward(const at::Tensor& x, const ForwardContext& ctx, LayerCache* cache) const;
};

/// Causal attention of q [batch, heads, seq, d] over the cached keys and values followed by
/// k, v [batch, kv_heads, seq, d] (which are appended to the cache); scale 1/sqrt(d). Returns
/// [batch, seq, heads * d]. `mask` (ForwardContext::attention_mask; no cache) replaces the
/// causal mask.
at::Tensor causal_attention(const at::Tensor& q, at::Tensor k, at::Tensor v, LayerCache* cache,
                            const at::Tensor& mask = {});

}  // namespace lema::trainer::detail
