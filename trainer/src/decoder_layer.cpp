#include "decoder_layer.hpp"

#include <ATen/ATen.h>

#include <cmath>

namespace lema::trainer::detail {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean({-1}, /*keepdim=*/true);
  const at::Tensor normed = h * at::rsqrt(variance + eps);
  return weight.to(x.scalar_type()) * normed.to(x.scalar_type());
}

std::vector<LoraLinear*> DecoderLayer::projections() {
  return {&q_proj, &k_proj, &v_proj, &o_proj, &gate_proj, &up_proj, &down_proj};
}

std::vector<const LoraLinear*> DecoderLayer::projections() const {
  return {&q_proj, &k_proj, &v_proj, &o_proj, &gate_proj, &up_proj, &down_proj};
}

std::vector<at::Tensor> DecoderLayer::adapter_parameters() const {
  std::vector<at::Tensor> out;
  for (const LoraLinear* p : projections()) {
    if (!p->adapted()) continue;
    out.push_back(p->lora_a);
    out.push_back(p->lora_b);
  }
  return out;
}

namespace {

// [batch, kv_heads, seq, d] → [batch, kv_heads * groups, seq, d], each kv head repeated for its
// group of query heads (transformers' repeat_kv).
at::Tensor repeat_kv(const at::Tensor& x, std::int64_t groups) {
  if (groups == 1) return x;
  const auto b = x.size(0), kvh = x.size(1), s = x.size(2), d = x.size(3);
  return x.unsqueeze(2).expand({b, kvh, groups, s, d}).reshape({b, kvh * groups, s, d});
}

}  // namespace

at::Tensor DecoderLayer::forward(const at::Tensor& x, const RopeTables& rope,
                                 const ForwardContext& ctx) const {
  const auto batch = x.size(0), seq = x.size(1);
  const at::Tensor h = rms_norm(x, input_layernorm, rms_norm_eps);
  const auto split = [&](const at::Tensor& t, std::int64_t n) {
    return t.view({batch, seq, n, head_dim}).transpose(1, 2);
  };
  const at::Tensor q = apply_rope(split(q_proj.forward(h, ctx), heads), rope);
  const at::Tensor k = apply_rope(split(k_proj.forward(h, ctx), kv_heads), rope);
  const at::Tensor v = split(v_proj.forward(h, ctx), kv_heads);
  const std::int64_t groups = heads / kv_heads;
  const at::Tensor attn = at::scaled_dot_product_attention(
      q, repeat_kv(k, groups), repeat_kv(v, groups), /*attn_mask=*/std::nullopt,
      /*dropout_p=*/0.0, /*is_causal=*/true,
      /*scale=*/std::pow(static_cast<double>(head_dim), -0.5));
  const at::Tensor merged = attn.transpose(1, 2).reshape({batch, seq, heads * head_dim});
  const at::Tensor after_attn = x + o_proj.forward(merged, ctx);

  const at::Tensor m = rms_norm(after_attn, post_attention_layernorm, rms_norm_eps);
  const at::Tensor gated = at::silu(gate_proj.forward(m, ctx)) * up_proj.forward(m, ctx);
  return after_attn + down_proj.forward(gated, ctx);
}

}  // namespace lema::trainer::detail
