// Qwen2-MoE's shared expert: a SwiGLU MLP every token goes through, beside the routed experts.
#pragma once

#include <ATen/core/Tensor.h>

#include "lora_linear.hpp"

namespace lema::trainer::detail {

// Note [Shared expert]
// transformers' Qwen2MoeSparseMoeBlock adds to the routed experts' output
//   sigmoid(x G_s^T) * down(silu(gate(x)) * up(x)),
// G_s being shared_expert_gate [1, hidden]: a per-token scalar gate in (0, 1). Unlike a routed
// expert it runs on every row, so its weights are read on every step: it is never prefetched
// as a chosen expert nor demoted as an unchosen one, and pages like the attention's weights.
// Its three projections are ordinary (LoRA-adaptable) projections of the layer; peft names
// them "shared_expert.gate_proj" etc. and matches them by gate_proj, up_proj and down_proj.
struct SharedExpert {
  const LoraLinear& gate_proj;
  const LoraLinear& up_proj;
  const LoraLinear& down_proj;
  const at::Tensor& gate;  // shared_expert_gate.weight [1, hidden], frozen

  /// `x` is [rows, hidden]; returns the gated output [rows, hidden].
  at::Tensor forward(const at::Tensor& x, const ForwardContext& ctx) const;
};

}  // namespace lema::trainer::detail
