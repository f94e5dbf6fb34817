#include "lema/trainer/model_config.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

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
    fail(file, fmt::format("'{}' is missing; a Llama-family config.json must set it", key));
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

// "llama" or "mistral" from model_type and architectures; anything else is refused.
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
  const auto supported_arch = [](const std::string& a) {
    return a.empty() || a == "LlamaForCausalLM" || a == "MistralForCausalLM";
  };
  const bool type_ok = type == "llama" || type == "mistral" ||
                       (type.empty() && !arch.empty() && supported_arch(arch));
  if (!type_ok || !supported_arch(arch)) {
    const std::string named = !arch.empty() ? arch : (!type.empty() ? type : "not named");
    fail(file, fmt::format("the architecture is {} (model_type '{}'); only Llama-family models "
                           "(LlamaForCausalLM, MistralForCausalLM) are supported",
                           named, type));
  }
  if (type.empty()) type = arch == "MistralForCausalLM" ? "mistral" : "llama";
  c.model_type = type;
  c.architecture = arch;
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

}  // namespace

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
  c.hidden_size = get_int(j, "hidden_size", label);
  c.intermediate_size = get_int(j, "intermediate_size", label);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", label);
  c.num_attention_heads = get_int(j, "num_attention_heads", label);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", label, c.num_attention_heads);
  if (c.hidden_size % c.num_attention_heads != 0 && !j.contains("head_dim")) {
    fail(label, fmt::format("hidden_size {} is not divisible by num_attention_heads {} and no "
                            "head_dim is given",
                            c.hidden_size, c.num_attention_heads));
  }
  c.head_dim = get_int(j, "head_dim", label, c.hidden_size / c.num_attention_heads);
  c.vocab_size = get_int(j, "vocab_size", label);
  c.max_position_embeddings =
      get_int(j, "max_position_embeddings", label, c.model_type == "mistral" ? 4096 * 32 : 2048);
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
    fail(label,
         fmt::format("hidden_act {} is not supported; Llama-family MLPs use silu", it->dump()));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (get_bool(j, key, label, false)) {
      fail(label, fmt::format("'{}' is true; biases in the projections are not supported", key));
    }
  }
  return c;
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c) {
  std::vector<ExpectedTensor> out;
  const std::int64_t h = c.hidden_size, m = c.intermediate_size;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    out.push_back({p + "input_layernorm.weight", {h}});
    out.push_back({p + "self_attn.q_proj.weight", {c.q_size(), h}});
    out.push_back({p + "self_attn.k_proj.weight", {c.kv_size(), h}});
    out.push_back({p + "self_attn.v_proj.weight", {c.kv_size(), h}});
    out.push_back({p + "self_attn.o_proj.weight", {h, c.q_size()}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    out.push_back({p + "mlp.gate_proj.weight", {m, h}});
    out.push_back({p + "mlp.up_proj.weight", {m, h}});
    out.push_back({p + "mlp.down_proj.weight", {h, m}});
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

void check_checkpoint(const ModelConfig& config, const io::Checkpoint& checkpoint) {
  for (const ExpectedTensor& want : expected_tensors(config)) {
    const io::TensorInfo* got = checkpoint.find(want.name);
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
