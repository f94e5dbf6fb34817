// A causal language model's shape, read from a Hugging Face checkpoint directory's config.json,
// and the weights that shape implies (names and shapes as in the checkpoints transformers writes).
// Two layouts are understood:
//   - the Llama layout (Llama 1-3, Mistral, Qwen2/Qwen2.5, Qwen3): RMSNorm, rotary positions,
//     separate q/k/v/o projections (with biases where the family has them: Qwen2's q/k/v,
//     `attention_bias` and `mlp_bias`), Qwen3's per-head q/k RMSNorm, a SwiGLU MLP;
//   - Mixtral: the Llama layout with the MLP replaced by a sparse mixture of experts (a router
//     over num_local_experts SwiGLU experts, num_experts_per_tok chosen per token);
//   - Qwen2-MoE: Qwen2's attention with, in the layers decoder_sparse_step and mlp_only_layers
//     pick, Mixtral's routed experts plus a shared expert gated by a sigmoid; the other layers
//     keep a dense MLP of intermediate_size;
//   - GPT-2: learned positions, LayerNorm with bias, a fused c_attn, Conv1D weights stored
//     [in, out], a GELU MLP.
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

enum class ModelFamily { kLlama, kGpt2 };

/// "LlamaForCausalLM, MistralForCausalLM, ..., GPT2LMHeadModel": what from_hf_dir accepts.
std::string supported_architectures();

struct ModelConfig {
  std::string model_type;    // "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gpt2"
  std::string architecture;  // "LlamaForCausalLM", "Qwen2ForCausalLM", ... (may be empty)
  ModelFamily family = ModelFamily::kLlama;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;  // hidden_size / num_attention_heads unless config.json says
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;  // GPT-2: layer_norm_epsilon
  /// "silu" (the Llama layout's gated MLP), or GPT-2's "gelu_new" / "gelu_pytorch_tanh" (tanh
  /// approximation) or "gelu" (exact).
  std::string hidden_act = "silu";
  bool qkv_bias = false;     // biases on q_proj, k_proj, v_proj (Qwen2; attention_bias)
  bool o_bias = false;       // a bias on o_proj (attention_bias of Llama and Qwen3)
  bool mlp_bias = false;     // biases on gate_proj, up_proj, down_proj (mlp_bias)
  bool qk_norm = false;      // Qwen3: RMSNorm over each head of q and k before the rotation
  double rope_theta = 10000.0;
  std::optional<Llama3RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  /// Mistral's sliding attention window. Sequences no longer than the window attend causally to
  /// every earlier token, which is all the model implements: longer ones are refused.
  std::optional<std::int64_t> sliding_window;
  /// Mixtral: experts per layer (0: a dense MLP), experts chosen per token, and the router's
  /// auxiliary load-balancing loss, added to the training loss times its coefficient when
  /// output_router_logits is set (as transformers adds it when given labels).
  std::int64_t num_local_experts = 0;  // Qwen2-MoE: num_experts
  std::int64_t num_experts_per_tok = 0;
  double router_aux_loss_coef = 0.001;
  bool output_router_logits = false;
  /// Renormalize the chosen experts' weights to sum to one (Mixtral always does).
  bool norm_topk_prob = true;
  /// Qwen2-MoE: the routed experts' width, the shared expert's (0: none), and which layers are
  /// sparse: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
  std::int64_t moe_intermediate_size = 0;
  std::int64_t shared_expert_intermediate_size = 0;
  std::int64_t decoder_sparse_step = 1;
  std::vector<std::int64_t> mlp_only_layers;
  std::filesystem::path source;  // the config.json read, for messages

  bool is_moe() const { return num_local_experts > 0; }
  /// Whether decoder layer `i` routes over experts (else it has a dense MLP).
  bool sparse_layer(std::int64_t i) const;
  /// The routed experts' width: moe_intermediate_size (Qwen2-MoE) or intermediate_size.
  std::int64_t expert_size() const {
    return moe_intermediate_size > 0 ? moe_intermediate_size : intermediate_size;
  }
  /// "model.layers.3.block_sparse_moe." (Mixtral) or "model.layers.3.mlp." (Qwen2-MoE): where a
  /// sparse layer's router ("gate") and experts ("experts.N.") live.
  std::string moe_prefix(std::int64_t layer) const;
  /// The three projection names of a routed expert, as (gate, down, up): Mixtral's w1, w2, w3 or
  /// Qwen2-MoE's gate_proj, down_proj, up_proj.
  std::vector<std::string> expert_projection_names() const;

  /// Reads `dir`/config.json (or `dir` itself when it names a file). Throws InvalidArgument, one
  /// line naming the file and the field, for an unsupported architecture (naming it, the
  /// supported list and the Python route), a missing or ill-typed field, an unsupported rope
  /// scaling or activation, or inconsistent sizes.
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
/// lm_head.weight is not among them (the embedding serves as the output projection). GPT-2's
/// names are those GPT2LMHeadModel.save_pretrained writes ("transformer.h.0.attn.c_attn.weight");
/// checkpoints without the "transformer." prefix (the original GPT-2 uploads) are found too
/// (checkpoint_name).
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& config);

/// The names a weight may have in a checkpoint, the canonical one first: GPT-2's
/// "transformer.wte.weight" is also looked for as "wte.weight".
std::vector<std::string> checkpoint_names(const std::string& name);

/// The projections LoRA may target in this model, as peft names them: q_proj ... down_proj, or
/// GPT-2's c_attn, c_proj (attention and MLP output alike, as peft matches it) and c_fc.
const std::vector<std::string>& lora_target_candidates(const ModelConfig& config);

/// Checks that `checkpoint` holds every expected tensor with the expected shape. Throws
/// io::CheckpointError (rules "missing-tensor", "shape-mismatch") naming the tensor, its file,
/// the expected and the actual shape. Extra tensors are ignored.
void check_checkpoint(const ModelConfig& config, const io::Checkpoint& checkpoint);

/// "[32, 64]"
std::string shape_string(const std::vector<std::int64_t>& shape);

}  // namespace lema::trainer
