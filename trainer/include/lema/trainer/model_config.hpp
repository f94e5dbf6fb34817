// A Llama-family model's shape, read from a Hugging Face checkpoint directory's config.json, and
// the weights that shape implies (names and shapes as in the checkpoints transformers writes).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace lema::io {
class Checkpoint;
}

namespace lema::trainer {

/// Llama 3.1 style frequency-dependent rope scaling ("rope_type": "llama3").
struct Llama3RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  std::int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string model_type;    // "llama" or "mistral"
  std::string architecture;  // "LlamaForCausalLM", "MistralForCausalLM" (may be empty)
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;  // hidden_size / num_attention_heads unless config.json says
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<Llama3RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  /// Mistral's sliding attention window. Sequences no longer than the window attend causally to
  /// every earlier token, which is all the model implements: longer ones are refused.
  std::optional<std::int64_t> sliding_window;
  std::filesystem::path source;  // the config.json read, for messages

  /// Reads `dir`/config.json (or `dir` itself when it names a file). Throws InvalidArgument, one
  /// line naming the file and the field, for an unsupported architecture ("... is
  /// GPT2LMHeadModel; only llama and mistral are supported"), a missing or ill-typed field, an
  /// unsupported rope scaling or activation, or inconsistent sizes.
  static ModelConfig from_hf_dir(const std::filesystem::path& dir);
  /// Parses config.json's text; `label` names it in errors.
  static ModelConfig from_json_text(const std::string& text, const std::filesystem::path& label);

  std::int64_t q_size() const { return num_attention_heads * head_dim; }
  std::int64_t kv_size() const { return num_key_value_heads * head_dim; }
};

struct ExpectedTensor {
  std::string name;
  std::vector<std::int64_t> shape;
};

/// The weights a checkpoint of this shape holds, in execution order. With tied embeddings
/// lm_head.weight is not among them (the embedding serves as the output projection).
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& config);

/// Checks that `checkpoint` holds every expected tensor with the expected shape. Throws
/// io::CheckpointError (rules "missing-tensor", "shape-mismatch") naming the tensor, its file,
/// the expected and the actual shape. Extra tensors are ignored.
void check_checkpoint(const ModelConfig& config, const io::Checkpoint& checkpoint);

/// "[32, 64]"
std::string shape_string(const std::vector<std::int64_t>& shape);

}  // namespace lema::trainer
