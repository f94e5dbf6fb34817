#include "lema/trainer/llama_model.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

#include "decoder_layer.hpp"
#include "layer_checkpoint.hpp"
#include "lema/base/error.hpp"
#include "rotary.hpp"

namespace lema::trainer {

namespace {

void check_options(const LlamaModelOptions& o, const ModelConfig& config) {
  const LoraSettings& lora = o.lora;
  if (lora.rank < 1) {
    throw InvalidArgument(fmt::format("LoRA rank must be at least 1 (got {})", lora.rank));
  }
  if (!(lora.dropout >= 0 && lora.dropout < 1)) {
    throw InvalidArgument(fmt::format("LoRA dropout must be in [0, 1) (got {})", lora.dropout));
  }
  if (lora.target_modules.empty()) {
    throw InvalidArgument(fmt::format("LoRA needs at least one target module (e.g. {})",
                                      lora_target_candidates(config).front()));
  }
  const auto& known = lora_target_candidates(config);
  for (const std::string& m : lora.target_modules) {
    if (std::find(known.begin(), known.end(), m) == known.end()) {
      throw InvalidArgument(
          fmt::format("LoRA target module '{}' is not a projection of a {} layer; choose among "
                      "{}",
                      m, config.model_type, fmt::join(known, ",")));
    }
  }
  const auto d = o.compute_dtype;
  if (d != at::kFloat && d != at::kBFloat16 && d != at::kHalf) {
    throw InvalidArgument(
        fmt::format("compute dtype {} is not supported; use float32, bfloat16 "
                    "or float16",
                    c10::toString(d)));
  }
}

// The weight, checked against the shape the config implies.
at::Tensor take(const WeightLookup& weights, const ExpectedTensor& want, const ModelConfig& c) {
  at::Tensor t;
  for (const std::string& name : checkpoint_names(want.name)) {
    if (t.defined()) break;
    try {
      t = weights(name);
    } catch (const InvalidArgument&) {  // not under this name; the next, or the error below
    }
  }
  if (!t.defined()) {
    throw InvalidArgument(fmt::format("tensor '{}' {} that {} implies is missing", want.name,
                                      shape_string(want.shape), c.source.string()));
  }
  if (t.sizes().vec() != want.shape) {
    throw InvalidArgument(fmt::format(
        "tensor '{}' has shape {} but {} implies {}; the weights "
        "and the config disagree",
        want.name, shape_string(t.sizes().vec()), c.source.string(), shape_string(want.shape)));
  }
  if (!at::isFloatingType(t.scalar_type())) {
    throw InvalidArgument(fmt::format("tensor '{}' has dtype {}; weights must be floating point",
                                      want.name, c10::toString(t.scalar_type())));
  }
  return t;
}

// peft's default init of A: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
at::Tensor init_lora_a(std::int64_t rank, std::int64_t in, at::Generator& g) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  return at::empty({rank, in}, at::kFloat).uniform_(-bound, bound, g);
}

std::string peft_key(const detail::LoraLinear& p, const char* matrix) {
  return fmt::format("base_model.model.{}.{}.weight", p.module_path, matrix);
}

}  // namespace

LlamaModel::LlamaModel(ModelConfig config, const std::map<std::string, at::Tensor>& weights,
                       LlamaModelOptions options)
    : LlamaModel(std::move(config), lookup_in(weights), std::move(options)) {}

LlamaModel::LlamaModel(ModelConfig config, const WeightLookup& weights, LlamaModelOptions options)
    : config_(std::move(config)), options_(std::move(options)) {
  check_options(options_, config_);
  options_.lora.fan_in_fan_out = config_.family == ModelFamily::kGpt2;
  const ModelConfig& c = config_;
  const bool gpt2 = c.family == ModelFamily::kGpt2;
  const std::vector<ExpectedTensor> expected = expected_tensors(c);
  std::map<std::string, at::Tensor> w;
  for (const ExpectedTensor& e : expected) w[e.name] = take(weights, e, c);
  const auto get = [&](const std::string& name) { return w.at(name); };
  const auto get_if = [&](const std::string& name) {
    const auto it = w.find(name);
    return it == w.end() ? at::Tensor() : it->second;
  };

  embed_tokens_ = get(gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight");
  norm_ = get(gpt2 ? "transformer.ln_f.weight" : "model.norm.weight");
  if (gpt2) {
    position_embed_ = get("transformer.wpe.weight");
    norm_bias_ = get("transformer.ln_f.bias");
  }
  lm_head_ = c.tie_word_embeddings ? embed_tokens_ : get("lm_head.weight");
  // Everything the model creates lives where its weights are (host memory, or a GPU's).
  const at::Device device = embed_tokens_.device();
  if (!gpt2) inv_freq_ = detail::rope_inv_freq(c).to(device);

  at::Generator init = at::make_generator<at::CPUGeneratorImpl>(options_.seed);
  const auto& targets = options_.lora.target_modules;
  const auto is_target = [&](const std::string& name) {
    return std::find(targets.begin(), targets.end(), name) != targets.end();
  };
  const std::int64_t r = options_.lora.rank;
  // Module paths inside a layer, in peft's order; the leaf is what target_modules names.
  static const std::vector<std::string> llama_paths = {
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  static const std::vector<std::string> gpt2_paths = {"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                      "mlp.c_proj"};
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    auto layer = std::make_unique<detail::DecoderLayer>();
    const std::string prefix = (gpt2 ? "transformer.h." : "model.layers.") + std::to_string(i) + ".";
    layer->family = c.family;
    layer->index = i;
    layer->heads = c.num_attention_heads;
    layer->kv_heads = c.num_key_value_heads;
    layer->head_dim = c.head_dim;
    layer->norm_eps = c.rms_norm_eps;
    layer->hidden_act = c.hidden_act;
    if (gpt2) {
      layer->norm1 = get(prefix + "ln_1.weight");
      layer->norm1_bias = get(prefix + "ln_1.bias");
      layer->norm2 = get(prefix + "ln_2.weight");
      layer->norm2_bias = get(prefix + "ln_2.bias");
    } else {
      if (c.sparse_layer(i)) {
        const std::string moe = c.moe_prefix(i);
        const std::vector<std::string> names = c.expert_projection_names();
        layer->router = get(moe + "gate.weight");
        layer->top_k = c.num_experts_per_tok;
        layer->norm_topk = c.norm_topk_prob;
        for (std::int64_t e = 0; e < c.num_local_experts; ++e) {
          const std::string x = fmt::format("{}experts.{}.", moe, e);
          detail::Expert ex;
          for (auto [lin, name] : {std::pair{&ex.w1, &names[0]}, {&ex.w2, &names[1]},
                                   {&ex.w3, &names[2]}}) {
            lin->module_path = x + *name;
            lin->weight = get(lin->module_path + ".weight");
          }
          layer->experts.push_back(std::move(ex));
        }
        layer->shared_expert_gate = get_if(prefix + "mlp.shared_expert_gate.weight");
      }
      layer->norm1 = get(prefix + "input_layernorm.weight");
      layer->norm2 = get(prefix + "post_attention_layernorm.weight");
      layer->q_norm = get_if(prefix + "self_attn.q_norm.weight");
      layer->k_norm = get_if(prefix + "self_attn.k_norm.weight");
    }
    for (const std::string& path : gpt2 ? gpt2_paths : llama_paths) {
      const bool mlp = path.rfind("mlp.", 0) == 0;
      const bool shared = mlp && layer->shared_expert_gate.defined();
      if (mlp && layer->router.defined() && !shared) continue;  // experts instead
      detail::LoraLinear p;
      // A sparse Qwen2-MoE layer's shared expert takes the MLP's place (Note [Shared expert]).
      p.module_path = prefix + (shared ? "mlp.shared_expert." + path.substr(4) : path);
      p.weight = get(p.module_path + ".weight");
      p.bias = get_if(p.module_path + ".bias");
      p.transposed = gpt2;
      const std::string leaf = path.substr(path.rfind('.') + 1);
      if (is_target(leaf)) {
        // Drawn on the CPU from the seed, so every device starts from the same adapter.
        p.lora_a = init_lora_a(r, p.in_features(), init).to(device).requires_grad_(true);
        p.lora_b = at::zeros({p.out_features(), r},
                             at::TensorOptions().dtype(at::kFloat).device(device))
                       .requires_grad_(true);
        p.scaling = options_.lora.scaling();
        p.dropout = options_.lora.dropout;
      }
      layer->projections.push_back(std::move(p));
    }
    layers_.push_back(std::move(layer));
  }
}

LlamaModel::~LlamaModel() = default;
LlamaModel::LlamaModel(LlamaModel&&) noexcept = default;
LlamaModel& LlamaModel::operator=(LlamaModel&&) noexcept = default;

namespace {

// Note [Router auxiliary loss]
// transformers' load_balancing_loss_func over every layer's router logits: with f_e = (top-k
// choices of e, summed over layers) / rows and P_e = (softmax probability of e, summed over
// layers) / rows, where rows = tokens * layers, the loss is experts * sum_e f_e P_e. Gradients
// flow through P only (the choices are discrete). Given an attention mask, transformers counts
// only the tokens it marks (padding chooses experts too, but is left out of f, P and rows); so
// do we with SequenceLayout::attention_mask: `rows` is then the number of marked tokens.
// Only layers with a router take part (Qwen2-MoE's dense layers record no router logits);
// without any, there is no loss.
at::Tensor router_aux_loss(const std::vector<detail::RouterStats>& stats, std::int64_t rows,
                           std::int64_t experts) {
  at::Tensor counts, probs;
  std::int64_t layers = 0;
  for (const detail::RouterStats& s : stats) {
    if (!s.counts.defined()) continue;
    counts = layers == 0 ? s.counts : counts + s.counts;
    probs = layers == 0 ? s.prob_sum : probs + s.prob_sum;
    ++layers;
  }
  if (layers == 0) return at::Tensor();
  const double total = static_cast<double>(rows) * static_cast<double>(layers);
  return (counts / total * (probs / total)).sum() * static_cast<double>(experts);
}

}  // namespace

namespace {

// Note [Packed attention]
// A packed row holds several examples, each with positions from 0 (SequenceLayout). As
// transformers does for packed position_ids, an example starts where a position is 0: the
// segment of a token is the number of zeros up to it, and a query attends a key of its own
// segment at or before it. The rotary tables (or GPT-2's learned positions) take each token's
// own position, so every example is computed as it would be alone, up to the arithmetic of the
// longer row.
at::Tensor packed_attention_mask(const at::Tensor& position_ids) {
  const at::Tensor segment = (position_ids == 0).cumsum(1);
  const std::int64_t seq = position_ids.size(1);
  const at::Tensor same = segment.unsqueeze(2) == segment.unsqueeze(1);
  const at::Tensor causal =
      at::ones({seq, seq}, at::TensorOptions().dtype(at::kBool).device(position_ids.device()))
          .tril();
  return (same & causal).unsqueeze(1);
}

void check_layout(const SequenceLayout& layout, const at::Tensor& input_ids) {
  for (const auto& [t, name] : {std::pair{&layout.attention_mask, "attention mask"},
                                {&layout.position_ids, "position ids"}}) {
    if (t->defined() && t->sizes() != input_ids.sizes()) {
      throw InvalidArgument(fmt::format("{} of shape {} for input ids of shape {}", name,
                                        shape_string(t->sizes().vec()),
                                        shape_string(input_ids.sizes().vec())));
    }
  }
  if (layout.position_ids.defined() && layout.position_ids.numel() > 0 &&
      (layout.position_ids.select(1, 0) != 0).any().item<bool>()) {
    throw InvalidArgument(
        "packed position ids must start every row at 0 (an example's first "
        "token)");
  }
}

}  // namespace

at::Tensor LlamaModel::hidden_states(const at::Tensor& input_ids, KvCache* cache,
                                     const SequenceLayout& layout) {
  if (input_ids.dim() != 2 || !at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false)) {
    throw InvalidArgument(
        fmt::format("input ids must be a [batch, seq] integer tensor (got {} "
                    "of shape {})",
                    c10::toString(input_ids.scalar_type()), shape_string(input_ids.sizes().vec())));
  }
  const std::int64_t first = cache != nullptr ? cache->length : 0;
  const std::int64_t seq = input_ids.size(1);
  const std::int64_t end = first + seq;
  if (input_ids.numel() == 0) throw InvalidArgument("input ids are empty");
  const std::int64_t lowest = input_ids.min().item<std::int64_t>();
  const std::int64_t highest = input_ids.max().item<std::int64_t>();
  if (lowest < 0 || highest >= config_.vocab_size) {
    throw InvalidArgument(fmt::format("token id {} is outside the vocabulary of {} tokens ({})",
                                      lowest < 0 ? lowest : highest, config_.vocab_size,
                                      config_.source.string()));
  }
  if (config_.sliding_window && end > *config_.sliding_window) {
    throw InvalidArgument(fmt::format(
        "sequence length {} exceeds the sliding window {} of {}; "
        "sliding-window attention is not implemented, use a "
        "sequence length of at most {}",
        end, *config_.sliding_window, config_.source.string(), *config_.sliding_window));
  }
  const bool gpt2 = config_.family == ModelFamily::kGpt2;
  if (gpt2 && end > config_.max_position_embeddings) {
    throw InvalidArgument(fmt::format(
        "sequence length {} exceeds the {} learned positions (n_positions) of {}; use at most {}",
        end, config_.max_position_embeddings, config_.source.string(),
        config_.max_position_embeddings));
  }

  check_layout(layout, input_ids);
  const bool packed = layout.position_ids.defined();
  if (packed && cache != nullptr) {
    throw InvalidArgument("packed examples are for training; a key/value cache takes one");
  }
  at::Tensor h = at::embedding(embed_tokens_, input_ids.to(at::kLong));
  if (gpt2 && packed) {
    h = h + at::embedding(position_embed_, layout.position_ids.to(at::kLong)).to(h.scalar_type());
  } else if (gpt2) {
    h = h + position_embed_.narrow(0, first, seq).to(h.scalar_type());
  }
  h = h.to(options_.compute_dtype);
  detail::ForwardContext ctx{
      options_.compute_dtype,
      training_,
      training_ ? at::globalContext().defaultGenerator(h.device()) : at::Generator(),
      options_.expert_prefetch,
      options_.expert_demote,
      at::Tensor(),
      at::Tensor()};
  if (packed) ctx.attention_mask = packed_attention_mask(layout.position_ids);
  const bool want_stats = want_router_stats_ && config_.is_moe() && cache == nullptr;
  if (want_stats && layout.attention_mask.defined()) {
    ctx.token_mask = layout.attention_mask.reshape({-1}).to(at::kFloat);
  }
  const detail::RopeTables rope =
      gpt2     ? detail::RopeTables{}
      : packed ? detail::rope_tables_at(inv_freq_, layout.position_ids, ctx.dtype)
               : detail::rope_tables(inv_freq_, seq, ctx.dtype, first);
  if (cache != nullptr) {
    if (at::GradMode::is_enabled()) {
      throw InvalidArgument("a key/value cache serves generation only; run it without gradients");
    }
    cache->layers.resize(layers_.size());
    cache->length = end;
  }
  const bool recompute =
      options_.activation_checkpointing && at::GradMode::is_enabled() && cache == nullptr;
  std::vector<detail::RouterStats> stats(want_stats ? layers_.size() : 0);
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const auto& layer_ptr = layers_[i];
    const bool layer_stats = want_stats && layer_ptr->router.defined();
    if (!recompute) {
      h = layer_ptr->forward(h, rope, ctx, cache != nullptr ? &cache->layers[i] : nullptr,
                             layer_stats ? &stats[i] : nullptr);
      continue;
    }
    // The closure holds copies of the layer's tensor and generator handles, so backward does
    // not depend on this model object. The checkpoint passes one tensor through, so a layer
    // whose router statistics are wanted returns them packed after its output, in float32
    // (exact for every compute dtype), and they are unpacked below.
    detail::LayerFunction run = [layer = *layer_ptr, rope, ctx, layer_stats](const at::Tensor& x) {
      if (!layer_stats) return layer.forward(x, rope, ctx);
      detail::RouterStats s;
      const at::Tensor out = layer.forward(x, rope, ctx, nullptr, &s);
      return at::cat({out.to(at::kFloat).reshape({-1}), s.prob_sum, s.counts});
    };
    const at::Tensor out = detail::checkpointed(std::move(run), h, layer_ptr->adapter_parameters(),
                                                ctx.dropout_generator);
    if (!layer_stats) {
      h = out;
      continue;
    }
    const std::int64_t n = h.numel(), e = config_.num_local_experts;
    stats[i].prob_sum = out.narrow(0, n, e);
    stats[i].counts = out.narrow(0, n + e, e).detach();
    h = out.narrow(0, 0, n).view(h.sizes()).to(h.scalar_type());
  }
  const std::int64_t rows = ctx.token_mask.defined()
                                ? layout.attention_mask.sum().item<std::int64_t>()
                                : input_ids.numel();
  router_aux_loss_ = want_stats && rows > 0
                         ? router_aux_loss(stats, rows, config_.num_local_experts)
                         : at::Tensor();
  if (gpt2) {
    return at::layer_norm(h, {h.size(-1)}, norm_.to(h.scalar_type()),
                          norm_bias_.to(h.scalar_type()), config_.rms_norm_eps);
  }
  return detail::rms_norm(h, norm_, config_.rms_norm_eps);
}

at::Tensor LlamaModel::logits(const at::Tensor& input_ids, KvCache* cache) {
  return logits(input_ids, cache, {});
}

at::Tensor LlamaModel::logits(const at::Tensor& input_ids, KvCache* cache,
                              const SequenceLayout& layout) {
  const at::Tensor h = hidden_states(input_ids, cache, layout);
  return at::linear(h, lm_head_.to(options_.compute_dtype)).to(at::kFloat);
}

at::Tensor LlamaModel::loss(const at::Tensor& input_ids) {
  if (input_ids.dim() == 2 && input_ids.size(1) < 2) {
    throw InvalidArgument(
        fmt::format("the loss needs sequences of at least 2 tokens (got {})", input_ids.size(1)));
  }
  const at::Tensor all = logits_for_loss(input_ids);
  const std::int64_t seq = all.size(1);
  const at::Tensor predicted = all.narrow(1, 0, seq - 1).reshape({-1, config_.vocab_size});
  const at::Tensor targets = input_ids.narrow(1, 1, seq - 1).reshape({-1}).to(at::kLong);
  return with_router_loss(at::cross_entropy_loss(predicted, targets));
}

at::Tensor LlamaModel::logits_for_loss(const at::Tensor& input_ids, const SequenceLayout& layout) {
  want_router_stats_ = config_.is_moe() && config_.output_router_logits;
  try {
    at::Tensor out = logits(input_ids, nullptr, layout);
    want_router_stats_ = false;
    return out;
  } catch (...) {
    want_router_stats_ = false;
    throw;
  }
}

at::Tensor LlamaModel::with_router_loss(const at::Tensor& loss) {
  if (!router_aux_loss_.defined()) return loss;
  const at::Tensor aux = std::exchange(router_aux_loss_, at::Tensor());
  return loss + config_.router_aux_loss_coef * aux;
}

at::Tensor LlamaModel::masked_loss(const at::Tensor& input_ids, const at::Tensor& labels,
                                   const SequenceLayout& layout) {
  if (input_ids.dim() == 2 && input_ids.size(1) < 2) {
    throw InvalidArgument(
        fmt::format("the loss needs sequences of at least 2 tokens (got {})", input_ids.size(1)));
  }
  if (labels.sizes() != input_ids.sizes()) {
    throw InvalidArgument(fmt::format("labels of shape {} for input ids of shape {}",
                                      shape_string(labels.sizes().vec()),
                                      shape_string(input_ids.sizes().vec())));
  }
  const at::Tensor all = logits_for_loss(input_ids, layout);
  const std::int64_t seq = all.size(1);
  const at::Tensor predicted = all.narrow(1, 0, seq - 1).reshape({-1, config_.vocab_size});
  const at::Tensor targets = labels.narrow(1, 1, seq - 1).reshape({-1}).to(at::kLong);
  return with_router_loss(at::cross_entropy_loss(predicted, targets, /*weight=*/{},
                                                at::Reduction::Mean, /*ignore_index=*/-100));
}

std::vector<std::pair<std::string, at::Tensor>> LlamaModel::named_adapters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& layer : layers_) {
    for (const detail::LoraLinear& p : layer->projections) {
      if (!p.adapted()) continue;
      out.emplace_back(peft_key(p, "lora_A"), p.lora_a);
      out.emplace_back(peft_key(p, "lora_B"), p.lora_b);
    }
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> LlamaModel::named_trainable() {
  return named_adapters();
}

void LlamaModel::set_training(bool training) {
  training_ = training;
}

std::map<std::string, at::Tensor> LlamaModel::adapter_tensors() const {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : named_adapters()) {
    out.emplace(name, t.detach().to(at::kCPU).clone());
  }
  return out;
}

void LlamaModel::load_adapter_tensors(const std::map<std::string, at::Tensor>& tensors) {
  const auto params = named_trainable();
  std::set<std::string> expected;
  for (const auto& [name, param] : params) {
    expected.insert(name);
    const auto it = tensors.find(name);
    if (it == tensors.end()) {
      throw InvalidArgument(
          fmt::format("the adapter has no tensor '{}' {} (LoRA rank {}, "
                      "targets {})",
                      name, shape_string(param.sizes().vec()), options_.lora.rank,
                      fmt::join(options_.lora.target_modules, ",")));
    }
    if (it->second.sizes() != param.sizes()) {
      throw InvalidArgument(
          fmt::format("adapter tensor '{}' has shape {} but this model's LoRA "
                      "(rank {}) needs {}",
                      name, shape_string(it->second.sizes().vec()), options_.lora.rank,
                      shape_string(param.sizes().vec())));
    }
  }
  for (const auto& [name, t] : tensors) {
    if (!expected.count(name)) {
      throw InvalidArgument(
          fmt::format("adapter tensor '{}' has no place in this model (LoRA "
                      "targets {})",
                      name, fmt::join(options_.lora.target_modules, ",")));
    }
  }
  at::NoGradGuard no_grad;
  for (auto& [name, param] : params) param.copy_(tensors.at(name));
}

}  // namespace lema::trainer
