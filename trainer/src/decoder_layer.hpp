// One Llama decoder layer: pre-norm attention and pre-norm SwiGLU MLP, each with a residual.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "lora_linear.hpp"
#include "rotary.hpp"

namespace lema::trainer::detail {

/// Hugging Face's LlamaRMSNorm: normalized in float32, cast back, then scaled.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

struct DecoderLayer {
  std::int64_t index = 0;
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  double rms_norm_eps = 1e-6;
  at::Tensor input_layernorm, post_attention_layernorm;
  LoraLinear q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;

  /// The projections in peft's and named_trainable()'s order.
  std::vector<LoraLinear*> projections();
  std::vector<const LoraLinear*> projections() const;
  /// The adapter leaves of this layer (A, B per adapted projection).
  std::vector<at::Tensor> adapter_parameters() const;

  at::Tensor forward(const at::Tensor& x, const RopeTables& rope, const ForwardContext& ctx) const;
};

}  // namespace lema::trainer::detail
