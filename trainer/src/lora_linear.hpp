// A frozen projection with an optional LoRA adapter, computed as peft's lora.Linear computes it:
// y = x W^T + b + (dropout(x) A^T) B^T * scaling. GPT-2's Conv1D keeps W as [in, out] (y = x W +
// b); its adapter has the same [r, in] / [out, r] shapes as a Linear's.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lema::trainer::detail {

/// What a forward pass needs besides the weights.
struct ForwardContext {
  c10::ScalarType dtype = c10::ScalarType::Float;
  bool training = false;
  at::Generator dropout_generator;  // shared handle; undefined: no dropout
  /// Weight names about to be read (routed experts); may be empty.
  std::function<void(const std::vector<std::string>&)> prefetch;
  /// Weight names not needed soon (routed experts no token chose); may be empty.
  std::function<void(const std::vector<std::string>&)> demote;
  /// Packed rows: bool [batch, 1, seq, seq], true where a query may attend a key (same example,
  /// not later). Undefined: plain causal attention.
  at::Tensor attention_mask;
  /// float32 [batch * seq]: 1 on an example's tokens, 0 on padding, for the router's statistics.
  /// Undefined: every token counts.
  at::Tensor token_mask;
};

struct LoraLinear {
  std::string module_path;  // "model.layers.0.self_attn.q_proj"
  at::Tensor weight;        // frozen [out, in] ([in, out] when transposed), any float dtype
  at::Tensor bias;          // frozen [out]; undefined when the projection has none
  bool transposed = false;  // Conv1D layout
  at::Tensor lora_a;        // float32 [r, in] leaf; undefined when not adapted
  at::Tensor lora_b;        // float32 [out, r] leaf
  double scaling = 1.0;
  double dropout = 0.0;

  bool adapted() const { return lora_a.defined(); }
  std::int64_t in_features() const { return weight.size(transposed ? 0 : 1); }
  std::int64_t out_features() const { return weight.size(transposed ? 1 : 0); }
  at::Tensor forward(const at::Tensor& x, const ForwardContext& ctx) const;
};

/// Inverted dropout with `generator`: x * mask / (1 - p), mask ~ Bernoulli(1 - p).
at::Tensor dropout(const at::Tensor& x, double p, const at::Generator& generator);

}  // namespace lema::trainer::detail
