// The Llama decoder with LoRA: config parsing and checks against the weights, the adapters'
// initial state, frozen base weights, layer checkpointing, adapter files, and the same loss over
// paged weights under a quarter budget as over weights read fully.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/torch/virtual_checkpoint.hpp"
#include "lema/trainer/adapter.hpp"
#include "lema/trainer/llama_model.hpp"
#include "lema/trainer/model_config.hpp"
#include "lema/trainer/weights.hpp"
#include "runtime_fixture.hpp"

namespace lema::trainer {
namespace {

using nlohmann::json;
using Weights = std::map<std::string, at::Tensor>;

json tiny_config_json() {
  return json{{"architectures", {"LlamaForCausalLM"}},
              {"model_type", "llama"},
              {"hidden_size", 64},
              {"intermediate_size", 128},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"vocab_size", 256},
              {"max_position_embeddings", 256},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0},
              {"tie_word_embeddings", false}};
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path) << text;
}

ModelConfig parse(const json& j) {
  return ModelConfig::from_json_text(j.dump(), "config.json");
}

Weights random_weights(const ModelConfig& c, std::uint64_t seed, at::ScalarType dtype) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  Weights w;
  for (const ExpectedTensor& e : expected_tensors(c)) {
    at::Tensor t = at::randn(e.shape, g, at::kFloat);
    t = e.shape.size() == 1 ? 1 + 0.1 * t : t / std::sqrt(static_cast<double>(e.shape[1]));
    w[e.name] = t.to(dtype);
  }
  return w;
}

io::Dtype io_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? io::Dtype::BF16 : t == at::kHalf ? io::Dtype::F16 : io::Dtype::F32;
}

void write_weights(const std::filesystem::path& path, const Weights& weights) {
  std::vector<io::TensorToWrite> out;
  for (const auto& [name, tensor] : weights) {
    at::Tensor t = tensor.contiguous();
    out.push_back({name, io_dtype(t.scalar_type()), t.sizes().vec(),
                   [t](std::span<std::byte> bytes, std::uint64_t offset) {
                     std::memcpy(bytes.data(), static_cast<const std::byte*>(t.data_ptr()) + offset,
                                 bytes.size());
                   }});
  }
  io::write_safetensors(path, std::move(out));
}

/// A checkpoint directory: config.json + model.safetensors.
struct TinyModel {
  explicit TinyModel(const json& config, std::uint64_t seed = 3, at::ScalarType dtype = at::kFloat,
                     const std::string& tag = "llama")
      : dir(tag) {
    write_text(dir.path() / "config.json", config.dump(2));
    this->config = ModelConfig::from_hf_dir(dir.path());
    weights = random_weights(this->config, seed, dtype);
    write_weights(dir.path() / "model.safetensors", weights);
  }
  test::TempDir dir;
  ModelConfig config;
  Weights weights;
};

at::Tensor tokens(std::int64_t batch, std::int64_t seq, std::int64_t vocab, std::uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(vocab, {batch, seq}, g, at::kLong);
}

/// Nonzero values for every adapter matrix (B starts at zero, which hides most of LoRA).
Weights random_adapters(LlamaModel& model, std::uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  Weights out;
  for (const auto& [name, p] : model.named_trainable()) out[name] = 0.1 * at::randn(p.sizes(), g);
  return out;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

class LlamaModelTest : public ::testing::Test {
 protected:
  void SetUp() override { at::set_num_threads(1); }  // one thread: reductions in a fixed order
};

// ---- config.json ----

TEST_F(LlamaModelTest, UnsupportedArchitectureIsOneLineNamingFileAndArchitecture) {
  json j = tiny_config_json();
  j["architectures"] = {"Phi3ForCausalLM"};
  j["model_type"] = "phi3";
  const std::string message = error_of([&] { parse(j); });
  EXPECT_NE(message.find("config.json"), std::string::npos) << message;
  EXPECT_NE(message.find("Phi3ForCausalLM"), std::string::npos) << message;
  EXPECT_NE(message.find("GPT2LMHeadModel"), std::string::npos) << message;
  EXPECT_NE(message.find("lema.from_pretrained"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  EXPECT_THROW(parse(j), InvalidArgument);
}

TEST_F(LlamaModelTest, MixtralConfigNamesItsExpertsAndRefusesImpossibleRouting) {
  json j = tiny_config_json();
  j["architectures"] = {"MixtralForCausalLM"};
  j["model_type"] = "mixtral";
  j["output_router_logits"] = true;
  const ModelConfig c = parse(j);
  EXPECT_TRUE(c.is_moe());
  EXPECT_EQ(c.num_local_experts, 8);  // MixtralConfig's defaults
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_TRUE(c.output_router_logits);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(lora_target_candidates(c).size(), 4u);  // the attention's only
  std::size_t experts = 0;
  for (const ExpectedTensor& t : expected_tensors(c)) {
    experts += t.name.find("block_sparse_moe.experts.") != std::string::npos;
    EXPECT_EQ(t.name.find("mlp."), std::string::npos) << t.name;
  }
  EXPECT_EQ(experts, 2u * 8u * 3u);

  j["num_experts_per_tok"] = 9;
  std::string message = error_of([&] { parse(j); });
  EXPECT_NE(message.find("num_experts_per_tok 9 exceeds num_local_experts 8"), std::string::npos)
      << message;
  j["num_experts_per_tok"] = 2;
  j["router_jitter_noise"] = 0.1;
  message = error_of([&] { parse(j); });
  EXPECT_NE(message.find("router_jitter_noise"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
}

TEST_F(LlamaModelTest, Qwen2MoeConfigPicksSparseLayersAndNamesTheSharedExpert) {
  json j = tiny_config_json();
  j["architectures"] = {"Qwen2MoeForCausalLM"};
  j["model_type"] = "qwen2_moe";
  j["num_hidden_layers"] = 6;
  j["num_experts"] = 4;
  j["num_experts_per_tok"] = 2;
  j["moe_intermediate_size"] = 32;
  j["shared_expert_intermediate_size"] = 48;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  const ModelConfig c = parse(j);
  EXPECT_TRUE(c.is_moe());
  EXPECT_FALSE(c.norm_topk_prob);  // Qwen2MoeConfig's default
  EXPECT_TRUE(c.qkv_bias);
  for (std::int64_t i = 0; i < 6; ++i) EXPECT_EQ(c.sparse_layer(i), i == 1 || i == 5) << i;
  EXPECT_EQ(lora_target_candidates(c).size(), 7u);  // gate/up/down: shared expert, dense MLP
  std::size_t experts = 0, shared = 0, dense = 0;
  for (const ExpectedTensor& t : expected_tensors(c)) {
    if (t.name.find("mlp.experts.") != std::string::npos) {
      ++experts;
      EXPECT_EQ(t.shape[0] * t.shape[1], 32 * 64) << t.name;
    }
    shared += t.name.find("mlp.shared_expert") != std::string::npos;
    if (t.name.find("layers.3.mlp.gate_proj") != std::string::npos) {
      ++dense;
      EXPECT_EQ(t.shape, (std::vector<std::int64_t>{128, 64}));
    }
  }
  EXPECT_EQ(experts, 2u * 4u * 3u);
  EXPECT_EQ(shared, 2u * 4u);
  EXPECT_EQ(dense, 1u);
}

TEST_F(LlamaModelTest, ConfigDefaultsAndMistral) {
  json j = tiny_config_json();
  j.erase("num_key_value_heads");
  const ModelConfig plain = parse(j);
  EXPECT_EQ(plain.num_key_value_heads, 4);
  EXPECT_EQ(plain.head_dim, 16);
  EXPECT_FALSE(plain.rope_scaling.has_value());

  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["sliding_window"] = nullptr;
  EXPECT_FALSE(parse(j).sliding_window.has_value());
  j["sliding_window"] = 4096;
  const ModelConfig mistral = parse(j);
  EXPECT_EQ(mistral.model_type, "mistral");
  EXPECT_EQ(mistral.sliding_window, 4096);
}

TEST_F(LlamaModelTest, RopeScalingLlama3InBothSpellingsAndOthersRefused) {
  json j = tiny_config_json();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 64}};
  const ModelConfig legacy = parse(j);
  ASSERT_TRUE(legacy.rope_scaling.has_value());
  EXPECT_EQ(legacy.rope_scaling->original_max_position_embeddings, 64);

  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "llama3"},   {"rope_theta", 500000.0},
                          {"factor", 32.0},          {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}};
  const ModelConfig current = parse(j);
  ASSERT_TRUE(current.rope_scaling.has_value());
  EXPECT_EQ(current.rope_theta, 500000.0);
  EXPECT_EQ(current.rope_scaling->factor, 32.0);

  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 10000.0}};
  const std::string message = error_of([&] { parse(j); });
  EXPECT_NE(message.find("yarn"), std::string::npos) << message;
}

TEST_F(LlamaModelTest, ShapeMismatchNamesTensorAndBothShapes) {
  json j = tiny_config_json();
  j["num_key_value_heads"] = 4;  // the weights are written for 4 kv heads
  TinyModel model(j);
  json claimed = tiny_config_json();  // says 2 kv heads: k_proj [32, 64]
  write_text(model.dir.path() / "config.json", claimed.dump());
  const ModelConfig config = ModelConfig::from_hf_dir(model.dir.path());
  const io::Checkpoint checkpoint = io::Checkpoint::open(model.dir.path());
  try {
    check_checkpoint(config, checkpoint);
    FAIL() << "a mismatch was accepted";
  } catch (const io::CheckpointError& e) {
    EXPECT_EQ(e.rule(), "shape-mismatch");
    EXPECT_EQ(e.tensor(), "model.layers.0.self_attn.k_proj.weight");
    const std::string message = e.what();
    EXPECT_NE(message.find("[64, 64]"), std::string::npos) << message;
    EXPECT_NE(message.find("[32, 64]"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  const std::string message = error_of([&] { LlamaModel(config, model.weights); });
  EXPECT_NE(message.find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << message;
  EXPECT_NE(message.find("[32, 64]"), std::string::npos) << message;
}

TEST_F(LlamaModelTest, MissingTensorIsNamed) {
  TinyModel model(tiny_config_json());
  Weights weights = model.weights;
  weights.erase("lm_head.weight");
  write_weights(model.dir.path() / "model.safetensors", weights);
  try {
    check_checkpoint(model.config, io::Checkpoint::open(model.dir.path()));
    FAIL() << "a missing tensor was accepted";
  } catch (const io::CheckpointError& e) {
    EXPECT_EQ(e.rule(), "missing-tensor");
    EXPECT_EQ(e.tensor(), "lm_head.weight");
  }
  EXPECT_NE(error_of([&] { LlamaModel(model.config, weights); }).find("lm_head.weight"),
            std::string::npos);
}

TEST_F(LlamaModelTest, BadLoraSettingsAndTokenIdsAreRefused) {
  TinyModel model(tiny_config_json());
  LlamaModelOptions options;
  options.lora.target_modules = {"q_proj", "lm_head"};
  EXPECT_NE(error_of([&] { LlamaModel(model.config, model.weights, options); }).find("lm_head"),
            std::string::npos);
  LlamaModel ok(model.config, model.weights);
  at::Tensor ids = tokens(1, 8, 256, 1);
  ids[0][3] = 256;
  const std::string message = error_of([&] { ok.loss(ids); });
  EXPECT_NE(message.find("256"), std::string::npos) << message;
}

// ---- LoRA ----

TEST_F(LlamaModelTest, ZeroBGivesTheBaseModelsLogits) {
  TinyModel model(tiny_config_json());
  const at::Tensor ids = tokens(2, 12, 256, 5);
  LlamaModel lora(model.config, model.weights);
  lora.set_training(false);
  // A is initialised (nonzero), B is zero.
  for (const auto& [name, p] : lora.named_trainable()) {
    const bool is_b = name.find("lora_B") != std::string::npos;
    EXPECT_EQ(p.abs().sum().item<float>() == 0, is_b) << name;
    EXPECT_TRUE(p.requires_grad()) << name;
  }
  // The base model: every adapter matrix zero.
  LlamaModel base(model.config, model.weights);
  base.set_training(false);
  Weights zeros;
  for (const auto& [name, p] : base.named_trainable()) zeros[name] = at::zeros_like(p);
  base.load_adapter_tensors(zeros);

  c10::NoGradGuard no_grad;
  const at::Tensor got = lora.logits(ids), want = base.logits(ids);
  EXPECT_EQ(got.sizes(), (std::vector<std::int64_t>{2, 12, 256}));
  EXPECT_TRUE(at::allclose(got, want, /*rtol=*/0, /*atol=*/0));
}

TEST_F(LlamaModelTest, BaseWeightsGetNoGradients) {
  TinyModel model(tiny_config_json());
  LlamaModel m(model.config, model.weights);
  m.load_adapter_tensors(random_adapters(m, 9));
  m.loss(tokens(2, 10, 256, 2)).backward();
  for (const auto& [name, w] : model.weights) {
    EXPECT_FALSE(w.requires_grad()) << name;
    EXPECT_FALSE(w.grad().defined()) << name;
  }
  for (const auto& [name, p] : m.named_trainable()) {
    ASSERT_TRUE(p.grad().defined()) << name;
    EXPECT_GT(p.grad().abs().sum().item<float>(), 0) << name;
  }
}

at::Tensor default_generator_state() {
  at::Generator g = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void set_default_generator_state(const at::Tensor& state) {
  at::Generator g = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}

struct Step {
  at::Tensor loss;
  Weights grads;
};

Step step(LlamaModel& m, const at::Tensor& ids) {
  for (auto& [name, p] : m.named_trainable()) p.mutable_grad() = at::Tensor();
  Step s;
  s.loss = m.loss(ids);
  s.loss.backward();
  for (const auto& [name, p] : m.named_trainable()) s.grads[name] = p.grad().clone();
  return s;
}

TEST_F(LlamaModelTest, CheckpointedLayersGiveTheSameGradientsWithDropout) {
  TinyModel model(tiny_config_json());
  LlamaModelOptions options;
  options.lora.dropout = 0.25;
  LlamaModel m(model.config, model.weights, options);
  m.load_adapter_tensors(random_adapters(m, 4));
  const at::Tensor ids = tokens(2, 16, 256, 6);
  const at::Tensor rng = default_generator_state();

  m.set_activation_checkpointing(false);
  const Step plain = step(m, ids);
  const at::Tensor rng_after_plain = default_generator_state();

  set_default_generator_state(rng);
  m.set_activation_checkpointing(true);
  const Step recomputed = step(m, ids);
  // The recompute replays the masks and leaves the generator where the forward left it.
  EXPECT_TRUE(at::equal(default_generator_state(), rng_after_plain));

  EXPECT_TRUE(at::equal(plain.loss, recomputed.loss))
      << plain.loss.item<float>() << " vs " << recomputed.loss.item<float>();
  for (const auto& [name, g] : plain.grads) {
    EXPECT_TRUE(at::allclose(recomputed.grads.at(name), g, /*rtol=*/0, /*atol=*/1e-6)) << name;
    EXPECT_TRUE(at::equal(recomputed.grads.at(name), g)) << name << " (not bit-equal)";
  }
  // Dropout is active: another draw gives another loss.
  EXPECT_FALSE(at::equal(step(m, ids).loss, plain.loss));
}

TEST_F(LlamaModelTest, AdapterSavedAndLoadedGivesTheSameLogits) {
  TinyModel model(tiny_config_json());
  LlamaModelOptions options;
  options.lora.rank = 4;
  options.lora.alpha = 8;
  options.lora.target_modules = {"q_proj", "v_proj", "down_proj"};
  LlamaModel trained(model.config, model.weights, options);
  trained.load_adapter_tensors(random_adapters(trained, 8));
  test::TempDir out("adapter");
  save_adapter(out.path(), trained.named_trainable(), options.lora, "tiny-base");

  const auto config = json::parse(std::ifstream(out.path() / "adapter_config.json"));
  EXPECT_EQ(config.at("peft_type"), "LORA");
  EXPECT_EQ(config.at("task_type"), "CAUSAL_LM");
  EXPECT_EQ(config.at("r"), 4);
  EXPECT_EQ(config.at("base_model_name_or_path"), "tiny-base");

  const LoadedAdapter loaded = load_adapter(out.path());
  EXPECT_EQ(loaded.lora.rank, 4);
  EXPECT_EQ(loaded.lora.alpha, 8);
  EXPECT_EQ(loaded.lora.target_modules, options.lora.target_modules);
  EXPECT_EQ(loaded.tensors.size(), 2u * 3 * 2);
  EXPECT_TRUE(loaded.tensors.count("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));

  LlamaModelOptions fresh = options;
  fresh.lora = loaded.lora;
  fresh.seed = 99;
  LlamaModel restored(model.config, model.weights, fresh);
  restored.load_adapter_tensors(loaded.tensors);
  trained.set_training(false);
  restored.set_training(false);
  c10::NoGradGuard no_grad;
  const at::Tensor ids = tokens(1, 9, 256, 3);
  EXPECT_TRUE(at::equal(trained.logits(ids), restored.logits(ids)));

  // A rank the model does not have is refused, naming the tensor.
  LlamaModelOptions other = options;
  other.lora.rank = 2;
  LlamaModel wrong(model.config, model.weights, other);
  EXPECT_NE(error_of([&] { wrong.load_adapter_tensors(loaded.tensors); }).find("lora_A"),
            std::string::npos);
}

TEST_F(LlamaModelTest, ReducedPrecisionComputeStaysCloseToFloat32) {
  TinyModel model(tiny_config_json());
  const at::Tensor ids = tokens(2, 12, 256, 21);
  LlamaModel reference(model.config, model.weights);
  const Weights adapters = random_adapters(reference, 22);
  reference.load_adapter_tensors(adapters);
  const float want = reference.loss(ids).item<float>();
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    LlamaModelOptions options;
    options.compute_dtype = dtype;
    LlamaModel m(model.config, model.weights, options);
    m.load_adapter_tensors(adapters);
    const Step s = step(m, ids);
    EXPECT_EQ(s.loss.scalar_type(), at::kFloat);
    EXPECT_NEAR(s.loss.item<float>(), want, 0.02 * want) << c10::toString(dtype);
    for (const auto& [name, g] : s.grads) {
      EXPECT_EQ(g.scalar_type(), at::kFloat) << name;
      EXPECT_TRUE(at::isfinite(g).all().item<bool>()) << name;
    }
  }
}

// ---- paged weights ----

class PagedWeights : public LlamaModelTest, public ::testing::WithParamInterface<at::ScalarType> {};

TEST_P(PagedWeights, QuarterBudgetGuardModeGivesTheSameLossAndGradients) {
  // Pages are 2 MiB, so the model must be some tens of MiB for a quarter to hold a few.
  json j = tiny_config_json();
  j["hidden_size"] = 256;
  j["intermediate_size"] = 1536;
  j["num_hidden_layers"] = 6;
  j["vocab_size"] = 1024;
  TinyModel model(j, 11, GetParam(), "paged");
  std::uint64_t bytes = 0;
  for (const auto& [name, t] : model.weights) bytes += t.nbytes();

  torch::Options options;
  options.budget_bytes = bytes / 4;
  options.mode = runtime::ResidencyMode::guard;
  torch::VirtualCheckpoint checkpoint = torch::open(model.dir.path(), options);
  ASSERT_EQ(checkpoint.mode(), runtime::ResidencyMode::guard);
  ASSERT_GE(bytes / 4 / checkpoint.stats().page_size, 2u) << "the budget must hold several pages";

  LlamaModel paged(model.config, lookup_in(checkpoint));
  LlamaModel loaded(model.config, read_tensors(model.dir.path()));
  const Weights adapters = random_adapters(paged, 12);
  paged.load_adapter_tensors(adapters);
  loaded.load_adapter_tensors(adapters);

  const at::Tensor ids = tokens(2, 16, 1024, 13);
  for (int i = 0; i < 2; ++i) {
    const Step want = step(loaded, ids);
    const Step got = step(paged, ids);
    checkpoint.mark_step();
    EXPECT_TRUE(at::equal(got.loss, want.loss))
        << got.loss.item<float>() << " vs " << want.loss.item<float>();
    for (const auto& [name, g] : want.grads) EXPECT_TRUE(at::equal(got.grads.at(name), g)) << name;
  }
  const runtime::PagerStats stats = checkpoint.stats();
  EXPECT_LE(stats.peak_resident_bytes, bytes / 4);
  EXPECT_GT(stats.evictions, 0u) << "the weights did not fit, so pages must have been evicted";
}

INSTANTIATE_TEST_SUITE_P(Dtypes, PagedWeights, ::testing::Values(at::kFloat, at::kBFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

}  // namespace
}  // namespace lema::trainer
