#include "lema/trainer/model_config.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"

namespace lema::trainer {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

[[noreturn]] void fail(const fs::path& file, const std::string& what) {
  throw InvalidArgument(fmt::format("{}: {}", file.string(), what));
}

std::int64_t get_int(const json& j, const char* key, const fs::path& file,
                     std::optional<std::int64_t> fallback = std::nullopt) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    fail(file, fmt::format("'{}' is missing; this model's config.json must set it", key));
  }
  if (!it->is_number_integer()) {
    fail(file, fmt::format("'{}' must be an integer (got {})", key, it->dump()));
  }
  const auto value = it->get<std::int64_t>();
  if (value < 1) fail(file, fmt::format("'{}' must be at least 1 (got {})", key, value));
  return value;
}

double get_double(const json& j, const char* key, const fs::path& file, double fallback) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) fail(file, fmt::format("'{}' must be a number (got {})", key, it->dump()));
  return it->get<double>();
}

bool get_bool(const json& j, const char* key, const fs::path& file, bool fallback) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean())
    fail(file, fmt::format("'{}' must be true or false (got {})", key, it->dump()));
  return it->get<bool>();
}

struct Known {
  const char* type;
  const char* arch;
};
constexpr Known kKnown[] = {{"llama", "LlamaForCausalLM"},
                            {"mistral", "MistralForCausalLM"},
                            {"mixtral", "MixtralForCausalLM"},
                            {"qwen2", "Qwen2ForCausalLM"},
                            {"qwen2_moe", "Qwen2MoeForCausalLM"},
                            {"qwen3", "Qwen3ForCausalLM"},
                            {"gpt2", "GPT2LMHeadModel"}};

// The model type from model_type and architectures; anything else is refused, pointing at the
// Python route, which runs any transformers model.
void read_architecture(const json& j, const fs::path& file, ModelConfig& c) {
  std::string arch;
  if (const auto it = j.find("architectures");
      it != j.end() && it->is_array() && !it->empty() && (*it)[0].is_string()) {
    arch = (*it)[0].get<std::string>();
  }
  std::string type;
  if (const auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    type = it->get<std::string>();
  }
  const Known* known = nullptr;
  for (const Known& k : kKnown) {
    const bool type_ok = type == k.type || (type.empty() && arch == k.arch);
    if (type_ok && (arch.empty() || arch == k.arch)) known = &k;
  }
  if (known == nullptr) {
    const std::string named = !arch.empty() ? arch : (!type.empty() ? type : "not named");
    fail(file, fmt::format("the architecture is {} (model_type '{}'); lema train and generate "
                           "support {}; for any other transformers model use the Python route "
                           "(lema.from_pretrained)",
                           named, type, supported_architectures()));
  }
  c.model_type = known->type;
  c.architecture = arch;
  c.family = c.model_type == "gpt2" ? ModelFamily::kGpt2 : ModelFamily::kLlama;
}

void read_llama3_scaling(const json& r, const fs::path& file, const char* where, ModelConfig& c) {
  const auto need = [&](const char* key) -> double {
    const auto it = r.find(key);
    if (it == r.end() || !it->is_number()) {
      fail(file, fmt::format("{}: llama3 rope scaling needs a number '{}'", where, key));
    }
    return it->get<double>();
  };
  Llama3RopeScaling s;
  s.factor = need("factor");
  s.low_freq_factor = need("low_freq_factor");
  s.high_freq_factor = need("high_freq_factor");
  const auto it = r.find("original_max_position_embeddings");
  s.original_max_position_embeddings = it != r.end() && it->is_number_integer()
                                           ? it->get<std::int64_t>()
                                           : c.max_position_embeddings;
  if (!(s.factor > 0) || !(s.high_freq_factor > s.low_freq_factor) ||
      s.original_max_position_embeddings < 1) {
    fail(file, fmt::format("{}: llama3 rope scaling needs factor > 0 and high_freq_factor > "
                           "low_freq_factor (got factor {}, low {}, high {})",
                           where, s.factor, s.low_freq_factor, s.high_freq_factor));
  }
  c.rope_scaling = s;
}

// Rope settings live in `rope_parameters` (transformers 5) or in `rope_theta` + `rope_scaling`
// (earlier versions and most published checkpoints).
void read_rope(const json& j, const fs::path& file, ModelConfig& c) {
  c.rope_theta = get_double(j, "rope_theta", file, 10000.0);
  const char* where = "rope_scaling";
  const json* r = nullptr;
  if (const auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    r = &*it;
    where = "rope_parameters";
    c.rope_theta = get_double(*it, "rope_theta", file, c.rope_theta);
  }
  if (const auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) fail(file, "'rope_scaling' must be an object or null");
    r = &*it;
    where = "rope_scaling";
  }
  if (!(c.rope_theta > 0))
    fail(file, fmt::format("rope_theta must be positive (got {})", c.rope_theta));
  if (r == nullptr) return;
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (const auto it = r->find(key); it != r->end() && it->is_string()) {
      type = it->get<std::string>();
      break;
    }
  }
  if (type == "default") return;
  if (type != "llama3") {
    fail(file, fmt::format("{} type '{}' is not supported; only the default rotary embedding and "
                           "'llama3' scaling are",
                           where, type));
  }
  read_llama3_scaling(*r, file, where, c);
}

// Qwen's sliding window applies only when use_sliding_window is set (then to the layers that
// layer_types marks); like Mistral's, sequences longer than it are refused.
void read_qwen_window(const json& j, const fs::path& file, ModelConfig& c) {
  bool sliding = get_bool(j, "use_sliding_window", file, false);
  if (const auto it = j.find("layer_types"); it != j.end() && it->is_array()) {
    for (const json& t : *it) sliding = sliding || t == "sliding_attention";
  }
  if (!sliding) return;
  if (const auto it = j.find("sliding_window"); it != j.end() && !it->is_null()) {
    c.sliding_window = get_int(j, "sliding_window", file);
  }
}

// MixtralConfig's defaults: no sliding window, 8 experts, 2 per token.
void read_mixtral(const json& j, const fs::path& file, ModelConfig& c) {
  if (const auto it = j.find("sliding_window"); it != j.end() && !it->is_null()) {
    c.sliding_window = get_int(j, "sliding_window", file);
  }
  c.num_local_experts = get_int(j, "num_local_experts", file, 8);
  c.num_experts_per_tok = get_int(j, "num_experts_per_tok", file, 2);
  if (c.num_experts_per_tok > c.num_local_experts) {
    fail(file, fmt::format("num_experts_per_tok {} exceeds num_local_experts {}",
                           c.num_experts_per_tok, c.num_local_experts));
  }
  c.router_aux_loss_coef = get_double(j, "router_aux_loss_coef", file, 0.001);
  c.output_router_logits = get_bool(j, "output_router_logits", file, false);
  // Jitter multiplies the router's input by noise in training, which no run could reproduce.
  if (get_double(j, "router_jitter_noise", file, 0.0) != 0.0) {
    fail(file, "'router_jitter_noise' is not zero; lema trains without router noise, set it to 0");
  }
}

// Qwen2MoeConfig's defaults: 60 experts of 1408, 4 per token, unnormalized top-k weights, a
// shared expert of 5632, every layer sparse. num_experts 0 leaves every layer dense.
void read_qwen2_moe(const json& j, const fs::path& file, ModelConfig& c) {
  c.num_local_experts = 60;
  if (const auto it = j.find("num_experts"); it != j.end() && *it == 0) {
    c.num_local_experts = 0;
  } else {
    c.num_local_experts = get_int(j, "num_experts", file, 60);
  }
  c.num_experts_per_tok = get_int(j, "num_experts_per_tok", file, 4);
  if (c.is_moe() && c.num_experts_per_tok > c.num_local_experts) {
    fail(file, fmt::format("num_experts_per_tok {} exceeds num_experts {}; a router cannot choose "
                           "more experts than there are",
                           c.num_experts_per_tok, c.num_local_experts));
  }
  c.norm_topk_prob = get_bool(j, "norm_topk_prob", file, false);
  c.moe_intermediate_size = get_int(j, "moe_intermediate_size", file, 1408);
  c.shared_expert_intermediate_size = get_int(j, "shared_expert_intermediate_size", file, 5632);
  c.decoder_sparse_step = get_int(j, "decoder_sparse_step", file, 1);
  c.router_aux_loss_coef = get_double(j, "router_aux_loss_coef", file, 0.001);
  c.output_router_logits = get_bool(j, "output_router_logits", file, false);
  if (const auto it = j.find("mlp_only_layers"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) fail(file, "'mlp_only_layers' must be a list of layer indices");
    for (const json& v : *it) {
      if (!v.is_number_integer()) {
        fail(file, fmt::format("'mlp_only_layers' must hold layer indices (got {})", v.dump()));
      }
      c.mlp_only_layers.push_back(v.get<std::int64_t>());
    }
  }
  c.qkv_bias = get_bool(j, "qkv_bias", file, true);
}

void read_llama_layout(const json& j, const fs::path& label, ModelConfig& c) {
  c.hidden_size = get_int(j, "hidden_size", label);
  c.intermediate_size = get_int(j, "intermediate_size", label);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", label);
  c.num_attention_heads = get_int(j, "num_attention_heads", label);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", label, c.num_attention_heads);
  // Qwen3Config's default head_dim is 128 whatever the hidden size.
  const bool default_128 = c.model_type == "qwen3";
  if (!default_128 && c.hidden_size % c.num_attention_heads != 0 && !j.contains("head_dim")) {
    fail(label, fmt::format("hidden_size {} is not divisible by num_attention_heads {} and no "
                            "head_dim is given",
                            c.hidden_size, c.num_attention_heads));
  }
  c.head_dim = get_int(j, "head_dim", label,
                       default_128 ? 128 : c.hidden_size / c.num_attention_heads);
  c.vocab_size = get_int(j, "vocab_size", label);
  c.max_position_embeddings =
      get_int(j, "max_position_embeddings", label,
              c.model_type == "mistral" || c.model_type == "mixtral" ? 4096 * 32
              : c.model_type == "qwen2_moe"                          ? 32768
                                                                     : 2048);
  c.rms_norm_eps = get_double(j, "rms_norm_eps", label, 1e-6);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", label, false);
  read_rope(j, label, c);
  if (c.model_type == "mistral") {
    c.sliding_window = 4096;  // MistralConfig's default
    if (const auto it = j.find("sliding_window"); it != j.end()) {
      c.sliding_window = it->is_null()
                             ? std::nullopt
                             : std::optional<std::int64_t>(get_int(j, "sliding_window", label));
    }
  }
  if (c.model_type == "mixtral") read_mixtral(j, label, c);
  const bool qwen2_moe = c.model_type == "qwen2_moe";
  if (qwen2_moe) read_qwen2_moe(j, label, c);
  if (c.model_type == "qwen2" || c.model_type == "qwen3" || qwen2_moe) {
    read_qwen_window(j, label, c);
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    fail(label, fmt::format("num_attention_heads {} is not divisible by num_key_value_heads {}",
                            c.num_attention_heads, c.num_key_value_heads));
  }
  if (c.head_dim % 2 != 0) {
    fail(label, fmt::format("head_dim {} is odd; rotary embeddings rotate pairs of dimensions",
                            c.head_dim));
  }
  if (const auto it = j.find("hidden_act");
      it != j.end() && !it->is_null() && *it != "silu" && *it != "swish") {
    fail(label, fmt::format("hidden_act {} is not supported; the gated MLPs of {} use silu",
                            it->dump(), c.model_type));
  }
  // Qwen2 has biases on q, k and v whatever the config says; attention_bias puts one on all
  // four attention projections (Llama, Mistral's config has none, Qwen3), mlp_bias on the MLP's.
  const bool attention_bias = get_bool(j, "attention_bias", label, false);
  if (attention_bias &&
      (c.model_type == "mistral" || c.model_type == "mixtral" || c.model_type == "qwen2" ||
       qwen2_moe)) {
    fail(label, fmt::format("'attention_bias' is true, which {} does not implement; set it to "
                            "false",
                            c.architecture.empty() ? c.model_type : c.architecture));
  }
  // Qwen2-MoE's qkv_bias (default true) was read above.
  c.qkv_bias = c.model_type == "qwen2" || attention_bias || (qwen2_moe && c.qkv_bias);
  c.o_bias = attention_bias;
  c.mlp_bias = get_bool(j, "mlp_bias", label, false);
  if (c.mlp_bias && c.model_type != "llama") {
    fail(label, fmt::format("'mlp_bias' is true, which {} does not implement; set it to false",
                            c.model_type));
  }
  c.qk_norm = c.model_type == "qwen3";
}

void read_gpt2_layout(const json& j, const fs::path& label, ModelConfig& c) {
  c.hidden_size = get_int(j, "n_embd", label);
  c.num_hidden_layers = get_int(j, "n_layer", label);
  c.num_attention_heads = get_int(j, "n_head", label);
  c.num_key_value_heads = c.num_attention_heads;
  if (c.hidden_size % c.num_attention_heads != 0) {
    fail(label, fmt::format("n_embd {} is not divisible by n_head {}", c.hidden_size,
                            c.num_attention_heads));
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.intermediate_size = get_int(j, "n_inner", label, 4 * c.hidden_size);
  c.vocab_size = get_int(j, "vocab_size", label);
  c.max_position_embeddings = get_int(j, "n_positions", label, 1024);
  c.rms_norm_eps = get_double(j, "layer_norm_epsilon", label, 1e-5);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", label, true);
  c.hidden_act = "gelu_new";
  if (const auto it = j.find("activation_function"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || (*it != "gelu_new" && *it != "gelu_pytorch_tanh" && *it != "gelu")) {
      fail(label, fmt::format("activation_function {} is not supported; GPT-2 models use "
                              "gelu_new, gelu_pytorch_tanh or gelu",
                              it->dump()));
    }
    c.hidden_act = it->get<std::string>();
  }
  if (!get_bool(j, "scale_attn_weights", label, true) ||
      get_bool(j, "scale_attn_by_inverse_layer_idx", label, false)) {
    fail(label, "only GPT-2's default attention scaling (scale_attn_weights true, "
                "scale_attn_by_inverse_layer_idx false) is supported");
  }
  if (get_bool(j, "add_cross_attention", label, false)) {
    fail(label, "'add_cross_attention' is true; cross-attention is not supported");
  }
}

}  // namespace

std::string supported_architectures() {
  std::string out;
  for (const Known& k : kKnown) out += (out.empty() ? "" : ", ") + std::string(k.arch);
  return out;
}

ModelConfig ModelConfig::from_hf_dir(const std::filesystem::path& dir) {
  const fs::path file = fs::is_directory(dir) ? dir / "config.json" : dir;
  std::ifstream in(file);
  if (!in) {
    throw InvalidArgument(
        fmt::format("{}: cannot read the model's config.json; --model must name "
                    "a Hugging Face checkpoint directory",
                    file.string()));
  }
  std::stringstream text;
  text << in.rdbuf();
  return from_json_text(text.str(), file);
}

ModelConfig ModelConfig::from_json_text(const std::string& text,
                                        const std::filesystem::path& label) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) fail(label, "is not a JSON object");
  ModelConfig c;
  c.source = label;
  read_architecture(j, label, c);
  if (c.family == ModelFamily::kGpt2) {
    read_gpt2_layout(j, label, c);
  } else {
    read_llama_layout(j, label, c);
  }
  return c;
}

bool ModelConfig::sparse_layer(std::int64_t i) const {
  if (!is_moe()) return false;
  if (model_type != "qwen2_moe") return true;
  const bool dense_only =
      std::find(mlp_only_layers.begin(), mlp_only_layers.end(), i) != mlp_only_layers.end();
  return !dense_only && (i + 1) % decoder_sparse_step == 0;
}

std::string ModelConfig::moe_prefix(std::int64_t layer) const {
  return fmt::format("model.layers.{}.{}", layer,
                     model_type == "mixtral" ? "block_sparse_moe." : "mlp.");
}

std::vector<std::string> ModelConfig::expert_projection_names() const {
  if (model_type == "mixtral") return {"w1", "w2", "w3"};
  return {"gate_proj", "down_proj", "up_proj"};
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

namespace {

std::vector<ExpectedTensor> gpt2_tensors(const ModelConfig& c) {
  std::vector<ExpectedTensor> out;
  const std::int64_t h = c.hidden_size, m = c.intermediate_size;
  out.push_back({"transformer.wte.weight", {c.vocab_size, h}});
  out.push_back({"transformer.wpe.weight", {c.max_position_embeddings, h}});
  // Conv1D keeps its weight as [in, out].
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("transformer.h.{}.", i);
    out.push_back({p + "ln_1.weight", {h}});
    out.push_back({p + "ln_1.bias", {h}});
    out.push_back({p + "attn.c_attn.weight", {h, 3 * h}});
    out.push_back({p + "attn.c_attn.bias", {3 * h}});
    out.push_back({p + "attn.c_proj.weight", {h, h}});
    out.push_back({p + "attn.c_proj.bias", {h}});
    out.push_back({p + "ln_2.weight", {h}});
    out.push_back({p + "ln_2.bias", {h}});
    out.push_back({p + "mlp.c_fc.weight", {h, m}});
    out.push_back({p + "mlp.c_fc.bias", {m}});
    out.push_back({p + "mlp.c_proj.weight", {m, h}});
    out.push_back({p + "mlp.c_proj.bias", {h}});
  }
  out.push_back({"transformer.ln_f.weight", {h}});
  out.push_back({"transformer.ln_f.bias", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

}  // namespace

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c) {
  if (c.family == ModelFamily::kGpt2) return gpt2_tensors(c);
  std::vector<ExpectedTensor> out;
  const std::int64_t h = c.hidden_size, m = c.intermediate_size;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    const auto linear = [&](const std::string& name, std::int64_t rows, std::int64_t cols,
                            bool bias) {
      out.push_back({p + name + ".weight", {rows, cols}});
      if (bias) out.push_back({p + name + ".bias", {rows}});
    };
    out.push_back({p + "input_layernorm.weight", {h}});
    linear("self_attn.q_proj", c.q_size(), h, c.qkv_bias);
    linear("self_attn.k_proj", c.kv_size(), h, c.qkv_bias);
    linear("self_attn.v_proj", c.kv_size(), h, c.qkv_bias);
    linear("self_attn.o_proj", h, c.q_size(), c.o_bias);
    if (c.qk_norm) {
      out.push_back({p + "self_attn.q_norm.weight", {c.head_dim}});
      out.push_back({p + "self_attn.k_norm.weight", {c.head_dim}});
    }
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    if (c.sparse_layer(i)) {
      // The per-expert names save_pretrained writes (transformers fuses them only in memory).
      const std::string moe = c.moe_prefix(i).substr(p.size());
      const std::int64_t em = c.expert_size();
      const std::vector<std::string> names = c.expert_projection_names();
      out.push_back({p + moe + "gate.weight", {c.num_local_experts, h}});
      for (std::int64_t e = 0; e < c.num_local_experts; ++e) {
        const std::string x = fmt::format("{}experts.{}.", moe, e);
        linear(x + names[0], em, h, false);
        linear(x + names[1], h, em, false);
        linear(x + names[2], em, h, false);
      }
      if (c.shared_expert_intermediate_size > 0) {
        const std::int64_t s = c.shared_expert_intermediate_size;
        linear("mlp.shared_expert.gate_proj", s, h, false);
        linear("mlp.shared_expert.up_proj", s, h, false);
        linear("mlp.shared_expert.down_proj", h, s, false);
        out.push_back({p + "mlp.shared_expert_gate.weight", {1, h}});
      }
      continue;
    }
    linear("mlp.gate_proj", m, h, c.mlp_bias);
    linear("mlp.up_proj", m, h, c.mlp_bias);
    linear("mlp.down_proj", h, m, c.mlp_bias);
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

std::vector<std::string> checkpoint_names(const std::string& name) {
  static const std::string kPrefix = "transformer.";
  if (name.rfind(kPrefix, 0) == 0) return {name, name.substr(kPrefix.size())};
  return {name};
}

const std::vector<std::string>& lora_target_candidates(const ModelConfig& config) {
  static const std::vector<std::string> llama = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  static const std::vector<std::string> gpt2 = {"c_attn", "c_proj", "c_fc"};
  // transformers holds the routed experts as fused 3-D parameters, which peft's target_modules
  // cannot name, so an adapter peft loads adapts Mixtral's attention only. Qwen2-MoE's
  // gate_proj, up_proj and down_proj name its shared expert's projections and its dense layers'
  // MLP, which are plain Linear modules in transformers as here.
  static const std::vector<std::string> moe = {"q_proj", "k_proj", "v_proj", "o_proj"};
  if (config.is_moe() && config.model_type == "mixtral") return moe;
  return config.family == ModelFamily::kGpt2 ? gpt2 : llama;
}

void check_checkpoint(const ModelConfig& config, const io::Checkpoint& checkpoint) {
  for (const ExpectedTensor& want : expected_tensors(config)) {
    const io::TensorInfo* got = nullptr;
    for (const std::string& name : checkpoint_names(want.name)) {
      if (got == nullptr) got = checkpoint.find(name);
    }
    if (got == nullptr) {
      throw io::CheckpointError(
          checkpoint.source().string(), want.name, "missing-tensor",
          fmt::format("tensor '{}' {} that {} implies is missing from the checkpoint", want.name,
                      shape_string(want.shape), config.source.string()));
    }
    if (got->shape != want.shape) {
      throw io::CheckpointError(
          checkpoint.files().at(got->file).path.string(), want.name, "shape-mismatch",
          fmt::format("tensor '{}' has shape {} but {} implies {}; the weights and the config "
                      "disagree",
                      want.name, shape_string(got->shape), config.source.string(),
                      shape_string(want.shape)));
    }
  }
}

}  // namespace lema::trainer
