// GPT-2's block (transformers' GPT2Block in evaluation mode: its own attention, residual and
// embedding dropouts are not applied, only the adapters' dropout).
#include <ATen/ATen.h>

#include "decoder_layer.hpp"

namespace lema::trainer::detail {

at::Tensor DecoderLayer::gpt2_forward(const at::Tensor& x, const ForwardContext& ctx,
                                      LayerCache* cache) const {
  const auto batch = x.size(0), seq = x.size(1), hidden = x.size(2);
  const LoraLinear &c_attn = projections[0], &attn_proj = projections[1], &c_fc = projections[2],
                   &mlp_proj = projections[3];
  const at::Tensor h = at::layer_norm(x, {hidden}, norm1.to(x.scalar_type()),
                                      norm1_bias.to(x.scalar_type()), norm_eps);
  const std::vector<at::Tensor> qkv = c_attn.forward(h, ctx).split(hidden, 2);
  const auto heads_of = [&](const at::Tensor& t) {
    return t.view({batch, seq, heads, head_dim}).transpose(1, 2);
  };
  const at::Tensor attn = causal_attention(heads_of(qkv[0]), heads_of(qkv[1]), heads_of(qkv[2]),
                                           cache, ctx.attention_mask);
  const at::Tensor after_attn = x + attn_proj.forward(attn, ctx);

  const at::Tensor m = at::layer_norm(after_attn, {hidden}, norm2.to(x.scalar_type()),
                                      norm2_bias.to(x.scalar_type()), norm_eps);
  // gelu_new and gelu_pytorch_tanh are the tanh approximation; "gelu" is exact.
  const at::Tensor act = at::gelu(c_fc.forward(m, ctx), hidden_act == "gelu" ? "none" : "tanh");
  return after_attn + mlp_proj.forward(act, ctx);
}

}  // namespace lema::trainer::detail
