#include "decoder_layer.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "shared_expert.hpp"

namespace lema::trainer::detail {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean({-1}, /*keepdim=*/true);
  const at::Tensor normed = h * at::rsqrt(variance + eps);
  return weight.to(x.scalar_type()) * normed.to(x.scalar_type());
}

std::vector<at::Tensor> DecoderLayer::adapter_parameters() const {
  std::vector<at::Tensor> out;
  for (const LoraLinear& p : projections) {
    if (!p.adapted()) continue;
    out.push_back(p.lora_a);
    out.push_back(p.lora_b);
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

at::Tensor causal_attention(const at::Tensor& q, at::Tensor k, at::Tensor v, LayerCache* cache,
                            const at::Tensor& given_mask) {
  const auto batch = q.size(0), heads = q.size(1), seq = q.size(2), d = q.size(3);
  std::int64_t past = 0;
  if (cache != nullptr) {
    if (cache->keys.defined()) {
      past = cache->keys.size(2);
      k = at::cat({cache->keys, k}, 2);
      v = at::cat({cache->values, v}, 2);
    }
    cache->keys = k;
    cache->values = v;
  }
  // Without earlier positions the mask is the plain causal one; a single new token sees every
  // cached position; several new tokens after cached ones need the mask shifted by `past`
  // (sdpa's is_causal aligns it to the top left).
  std::optional<at::Tensor> mask;
  if (past > 0 && seq > 1) {
    const at::Tensor rows = at::arange(seq, at::TensorOptions().dtype(at::kLong).device(q.device()));
    const at::Tensor cols =
        at::arange(past + seq, at::TensorOptions().dtype(at::kLong).device(q.device()));
    mask = cols.unsqueeze(0) <= (rows.unsqueeze(1) + past);
  }
  if (given_mask.defined()) mask = given_mask;
  const std::int64_t groups = heads / k.size(1);
  const at::Tensor attn = at::scaled_dot_product_attention(
      q, repeat_kv(k, groups), repeat_kv(v, groups), mask, /*dropout_p=*/0.0,
      /*is_causal=*/past == 0 && seq > 1 && !given_mask.defined(),
      /*scale=*/std::pow(static_cast<double>(d), -0.5));
  return attn.transpose(1, 2).reshape({batch, seq, heads * d});
}

at::Tensor DecoderLayer::forward(const at::Tensor& x, const RopeTables& rope,
                                 const ForwardContext& ctx, LayerCache* cache,
                                 RouterStats* router_stats) const {
  return family == ModelFamily::kGpt2 ? gpt2_forward(x, ctx, cache)
                                      : llama_forward(x, rope, ctx, cache, router_stats);
}

at::Tensor DecoderLayer::experts_forward(const at::Tensor& x, const ForwardContext& ctx,
                                         RouterStats* router_stats) const {
  const at::Tensor flat = x.reshape({-1, x.size(-1)});
  const auto n_experts = static_cast<std::int64_t>(experts.size());
  const at::Tensor probs = at::softmax(at::linear(flat, router.to(ctx.dtype)).to(at::kFloat), -1);
  auto [top_weights, top_index] = probs.topk(top_k, -1);
  if (norm_topk) top_weights = top_weights / top_weights.sum(-1, /*keepdim=*/true);
  // Which experts any row chose, read once on the host: the loop below must know before it
  // touches an expert's weights.
  const at::Tensor counts = at::bincount(top_index.reshape({-1}), {}, n_experts).to(at::kCPU);
  if (router_stats != nullptr && !ctx.token_mask.defined()) {
    router_stats->prob_sum = probs.sum(0);
    router_stats->counts = counts.to(at::kFloat).to(probs.device());
  } else if (router_stats != nullptr) {  // padding left out (Note [Router auxiliary loss])
    router_stats->prob_sum = (probs * ctx.token_mask.unsqueeze(-1)).sum(0);
    router_stats->counts =
        at::bincount(top_index.reshape({-1}), ctx.token_mask.repeat_interleave(top_k), n_experts)
            .to(at::kFloat);
  }
  const auto* count = counts.data_ptr<std::int64_t>();
  if (ctx.prefetch) {
    // The unchosen experts are demoted first: a page one shares with a chosen expert is then
    // touched again by the prefetch, which ends its demotion (Note [Demote hint] in the runtime).
    std::vector<std::string> chosen, unchosen;
    for (std::int64_t e = 0; e < n_experts; ++e) {
      for (const LoraLinear* w : {&experts[e].w1, &experts[e].w3, &experts[e].w2}) {
        (count[e] == 0 ? unchosen : chosen).push_back(w->module_path + ".weight");
      }
    }
    if (ctx.demote && !unchosen.empty()) ctx.demote(unchosen);
    ctx.prefetch(chosen);
  }
  at::Tensor out = at::zeros_like(flat);
  for (std::int64_t e = 0; e < n_experts; ++e) {
    if (count[e] == 0) continue;  // never read (Note [Routed experts])
    const std::vector<at::Tensor> where = at::where(top_index == e);
    const at::Tensor& rows = where[0];
    const at::Tensor& choice = where[1];
    const Expert& ex = experts[static_cast<std::size_t>(e)];
    const at::Tensor xe = flat.index_select(0, rows);
    const at::Tensor hidden = at::silu(ex.w1.forward(xe, ctx)) * ex.w3.forward(xe, ctx);
    const at::Tensor weight =
        top_weights.reshape({-1}).index_select(0, rows * top_k + choice).unsqueeze(-1);
    out = out.index_add(0, rows, (ex.w2.forward(hidden, ctx) * weight).to(out.scalar_type()));
  }
  return out.view(x.sizes());
}

at::Tensor DecoderLayer::llama_forward(const at::Tensor& x, const RopeTables& rope,
                                       const ForwardContext& ctx, LayerCache* cache,
                                       RouterStats* router_stats) const {
  const auto batch = x.size(0), seq = x.size(1);
  const LoraLinear &q_proj = projections[0], &k_proj = projections[1], &v_proj = projections[2],
                   &o_proj = projections[3];
  const at::Tensor h = rms_norm(x, norm1, norm_eps);
  // [batch, seq, n * d] → [batch, n, seq, d]; Qwen3 normalizes each head before the rotation.
  const auto split = [&](const at::Tensor& t, std::int64_t n, const at::Tensor& norm) {
    at::Tensor heads_view = t.view({batch, seq, n, head_dim});
    if (norm.defined()) heads_view = rms_norm(heads_view, norm, norm_eps);
    return heads_view.transpose(1, 2);
  };
  const at::Tensor q = apply_rope(split(q_proj.forward(h, ctx), heads, q_norm), rope);
  const at::Tensor k = apply_rope(split(k_proj.forward(h, ctx), kv_heads, k_norm), rope);
  const at::Tensor v = split(v_proj.forward(h, ctx), kv_heads, at::Tensor());
  const at::Tensor after_attn =
      x + o_proj.forward(causal_attention(q, k, v, cache, ctx.attention_mask), ctx);

  const at::Tensor m = rms_norm(after_attn, norm2, norm_eps);
  if (router.defined()) {
    at::Tensor moe = experts_forward(m, ctx, router_stats);
    if (shared_expert_gate.defined()) {
      const SharedExpert shared{projections[4], projections[5], projections[6],
                                shared_expert_gate};
      moe = moe + shared.forward(m.reshape({-1, m.size(-1)}), ctx).view(m.sizes());
    }
    return after_attn + moe;
  }
  const LoraLinear &gate_proj = projections[4], &up_proj = projections[5],
                   &down_proj = projections[6];
  const at::Tensor gated = at::silu(gate_proj.forward(m, ctx)) * up_proj.forward(m, ctx);
  return after_attn + down_proj.forward(gated, ctx);
}

}  // namespace lema::trainer::detail
