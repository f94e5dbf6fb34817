// `lema gen`: writes a synthetic Hugging Face Llama checkpoint of any shape.
//
// The weights are generated while they are written (the writer asks for each tensor's bytes in
// pieces), so a 7B-shaped checkpoint is written holding a few MiB. Files are named, sharded and
// indexed the way transformers' save_pretrained does it, so the output loads with
// LlamaForCausalLM.from_pretrained.
#include <spdlog/fmt/fmt.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "synthetic_init.hpp"

namespace lema::tools {
namespace {

namespace fs = std::filesystem;

struct LlamaShape {
  std::int64_t hidden = 64;
  std::int64_t layers = 2;
  std::int64_t heads = 4;
  std::int64_t kv_heads = 2;
  std::int64_t intermediate = 128;
  std::int64_t vocab = 256;
  std::int64_t max_position = 256;
  std::string dtype = "f32";
  bool tie_embeddings = false;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  double initializer_range = 0.02;
};

const std::map<std::string, LlamaShape>& presets() {
  static const std::map<std::string, LlamaShape> table = [] {
    std::map<std::string, LlamaShape> t;
    // About 0.5 MB in f32. Every preset's vocabulary holds the byte-level tokenizer's 259 ids
    // (bytes after <unk>, <s>, </s>), so `lema train` and `lema generate` take text on each.
    t["tiny"] = {.vocab = 320};
    // About 20 MB in f32.
    t["small"] = {.hidden = 256,
                  .layers = 4,
                  .heads = 8,
                  .kv_heads = 4,
                  .intermediate = 688,
                  .vocab = 4096,
                  .max_position = 1024};
    // About 1 GB in f32.
    t["medium"] = {.hidden = 1024,
                   .layers = 16,
                   .heads = 16,
                   .kv_heads = 8,
                   .intermediate = 2816,
                   .vocab = 32000,
                   .max_position = 2048};
    // Llama-2-7B's shape: 13.5 GB in bf16.
    t["llama-7b-shape"] = {.hidden = 4096,
                           .layers = 32,
                           .heads = 32,
                           .kv_heads = 32,
                           .intermediate = 11008,
                           .vocab = 32000,
                           .max_position = 4096,
                           .dtype = "bf16"};
    return t;
  }();
  return table;
}

void expect_positive(std::int64_t value, const char* setting) {
  if (value < 1) {
    throw InvalidArgument(fmt::format("{} must be at least 1 (got {})", setting, value));
  }
}

void validate(const LlamaShape& s) {
  expect_positive(s.hidden, "--hidden");
  expect_positive(s.layers, "--layers");
  expect_positive(s.heads, "--heads");
  expect_positive(s.kv_heads, "--kv-heads");
  expect_positive(s.intermediate, "--intermediate");
  expect_positive(s.vocab, "--vocab");
  expect_positive(s.max_position, "--max-position");
  if (s.hidden % s.heads != 0) {
    throw InvalidArgument(fmt::format(
        "--hidden {} is not divisible by --heads {}: each attention head gets hidden/heads "
        "dimensions; choose a head count that divides the hidden size",
        s.hidden, s.heads));
  }
  if (s.heads % s.kv_heads != 0) {
    throw InvalidArgument(fmt::format(
        "--heads {} is not divisible by --kv-heads {}: grouped-query attention shares each "
        "key/value head among heads/kv-heads query heads",
        s.heads, s.kv_heads));
  }
  if ((s.hidden / s.heads) % 2 != 0) {
    throw InvalidArgument(fmt::format(
        "head dimension --hidden/--heads = {}/{} = {} is odd: rotary embeddings rotate pairs of "
        "dimensions, so it must be even",
        s.hidden, s.heads, s.hidden / s.heads));
  }
  if (!(s.rope_theta > 0)) {
    throw InvalidArgument(fmt::format("--rope-theta must be positive (got {})", s.rope_theta));
  }
}

io::Dtype element_dtype(const std::string& name) {
  if (name == "f32") return io::Dtype::F32;
  if (name == "f16") return io::Dtype::F16;
  return io::Dtype::BF16;
}

std::string torch_dtype_name(const std::string& name) {
  if (name == "f32") return "float32";
  if (name == "f16") return "float16";
  return "bfloat16";
}

struct WeightSpec {
  std::string name;
  std::vector<std::int64_t> shape;
  bool is_norm = false;
};

// In the order of LlamaForCausalLM's state_dict, which is the order transformers shards in.
std::vector<WeightSpec> weight_specs(const LlamaShape& s) {
  const std::int64_t head_dim = s.hidden / s.heads;
  const std::int64_t kv_dim = s.kv_heads * head_dim;
  std::vector<WeightSpec> specs;
  specs.push_back({"model.embed_tokens.weight", {s.vocab, s.hidden}});
  for (std::int64_t i = 0; i < s.layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    specs.push_back({p + "self_attn.q_proj.weight", {s.heads * head_dim, s.hidden}});
    specs.push_back({p + "self_attn.k_proj.weight", {kv_dim, s.hidden}});
    specs.push_back({p + "self_attn.v_proj.weight", {kv_dim, s.hidden}});
    specs.push_back({p + "self_attn.o_proj.weight", {s.hidden, s.heads * head_dim}});
    specs.push_back({p + "mlp.gate_proj.weight", {s.intermediate, s.hidden}});
    specs.push_back({p + "mlp.up_proj.weight", {s.intermediate, s.hidden}});
    specs.push_back({p + "mlp.down_proj.weight", {s.hidden, s.intermediate}});
    specs.push_back({p + "input_layernorm.weight", {s.hidden}, true});
    specs.push_back({p + "post_attention_layernorm.weight", {s.hidden}, true});
  }
  specs.push_back({"model.norm.weight", {s.hidden}, true});
  if (!s.tie_embeddings) specs.push_back({"lm_head.weight", {s.vocab, s.hidden}});
  return specs;
}

// Produces elements [first, first + count) of a tensor as floats into `out`.
void generate(const WeightSpec& spec, std::uint64_t seed, double stddev, std::uint64_t first,
              std::size_t count, float* out) {
  if (spec.is_norm) {
    std::fill(out, out + count, 1.0f);
    return;
  }
  std::uint64_t i = first;
  const std::uint64_t end = first + count;
  double z0 = 0, z1 = 0;
  if (i < end && (i & 1)) {
    normal_pair(seed, i / 2, z0, z1);
    *out++ = static_cast<float>(z1 * stddev);
    ++i;
  }
  for (; i + 1 < end; i += 2) {
    normal_pair(seed, i / 2, z0, z1);
    *out++ = static_cast<float>(z0 * stddev);
    *out++ = static_cast<float>(z1 * stddev);
  }
  if (i < end) {
    normal_pair(seed, i / 2, z0, z1);
    *out++ = static_cast<float>(z0 * stddev);
  }
}

// Encodes floats as the checkpoint's element type.
void encode(const float* in, std::size_t count, io::Dtype dtype, std::byte* out) {
  if (dtype == io::Dtype::F32) {
    std::memcpy(out, in, count * 4);
    return;
  }
  for (std::size_t k = 0; k < count; ++k) {
    const std::uint16_t h = dtype == io::Dtype::F16 ? float_to_f16(in[k]) : float_to_bf16(in[k]);
    out[2 * k] = static_cast<std::byte>(h & 0xff);  // little endian, as the format says
    out[2 * k + 1] = static_cast<std::byte>(h >> 8);
  }
}

// Fills bytes [offset, offset + out.size()) of a tensor; any byte range works.
void fill_bytes(const WeightSpec& spec, std::uint64_t seed, double stddev, io::Dtype dtype,
                std::span<std::byte> out, std::uint64_t offset) {
  const std::size_t esize = io::dtype_bits(dtype) / 8;
  constexpr std::size_t kBlock = 4096;
  float values[kBlock];
  std::byte encoded[kBlock * 4];
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t byte = offset + done;
    const std::uint64_t first = byte / esize;
    const std::size_t skip = static_cast<std::size_t>(byte % esize);
    const std::size_t want = out.size() - done;
    const std::size_t count = std::min<std::size_t>(kBlock, (skip + want + esize - 1) / esize);
    generate(spec, seed, stddev, first, count, values);
    encode(values, count, dtype, encoded);
    const std::size_t take = std::min(want, count * esize - skip);
    std::memcpy(out.data() + done, encoded + skip, take);
    done += take;
  }
}

// Splits a large piece across threads; every byte depends only on its position (see
// Note [Counter-based normals]), so the result is the same for any thread count.
void fill_parallel(const WeightSpec& spec, std::uint64_t seed, double stddev, io::Dtype dtype,
                   unsigned threads, std::span<std::byte> out, std::uint64_t offset) {
  const std::size_t esize = io::dtype_bits(dtype) / 8;
  if (threads <= 1 || spec.is_norm || out.size() < (1u << 20)) {
    fill_bytes(spec, seed, stddev, dtype, out, offset);
    return;
  }
  const std::size_t part = (out.size() / threads + esize - 1) / esize * esize;
  std::vector<std::jthread> workers;
  for (unsigned t = 1; t < threads && t * part < out.size(); ++t) {
    const std::size_t begin = t * part;
    const std::size_t len = std::min(part, out.size() - begin);
    workers.emplace_back([&, begin, len] {
      fill_bytes(spec, seed, stddev, dtype, out.subspan(begin, len), offset + begin);
    });
  }
  fill_bytes(spec, seed, stddev, dtype, out.subspan(0, std::min(part, out.size())), offset);
}

// transformers' (huggingface_hub's) split: walk the tensors in state-dict order; one bigger than
// the limit gets a shard of its own; otherwise start a new shard when the next tensor would
// push the current one over the limit.
std::vector<std::vector<std::size_t>> plan_shards(const std::vector<std::uint64_t>& sizes,
                                                  std::uint64_t max_shard_bytes) {
  std::vector<std::vector<std::size_t>> shards;
  std::vector<std::size_t> current;
  std::uint64_t current_bytes = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] > max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (current_bytes + sizes[i] > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += sizes[i];
  }
  if (!current.empty()) shards.push_back(std::move(current));
  return shards;
}

std::string config_json(const LlamaShape& s) {
  // Keys sorted and indented as transformers writes them. Both dtype spellings and the classic
  // rope_theta keep the file readable by older and newer transformers releases.
  nlohmann::json c;
  c["architectures"] = {"LlamaForCausalLM"};
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["bos_token_id"] = 1;
  c["eos_token_id"] = 2;
  c["head_dim"] = s.hidden / s.heads;
  c["hidden_act"] = "silu";
  c["hidden_size"] = s.hidden;
  c["initializer_range"] = s.initializer_range;
  c["intermediate_size"] = s.intermediate;
  c["max_position_embeddings"] = s.max_position;
  c["mlp_bias"] = false;
  c["model_type"] = "llama";
  c["num_attention_heads"] = s.heads;
  c["num_hidden_layers"] = s.layers;
  c["num_key_value_heads"] = s.kv_heads;
  c["pretraining_tp"] = 1;
  c["rms_norm_eps"] = s.rms_norm_eps;
  c["rope_scaling"] = nullptr;
  c["rope_theta"] = s.rope_theta;
  c["tie_word_embeddings"] = s.tie_embeddings;
  c["dtype"] = torch_dtype_name(s.dtype);
  c["torch_dtype"] = torch_dtype_name(s.dtype);
  c["use_cache"] = true;
  c["vocab_size"] = s.vocab;
  return c.dump(2) + "\n";
}

std::string generation_config_json() {
  nlohmann::json c;
  c["_from_model_config"] = true;
  c["bos_token_id"] = 1;
  c["eos_token_id"] = 2;
  return c.dump(2) + "\n";
}

bool is_weight_file(const std::string& name) {
  return name == "model.safetensors.index.json" ||
         (name.starts_with("model") && name.ends_with(".safetensors"));
}

void prepare_out_dir(const fs::path& out, bool force) {
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec)) {
    throw InvalidArgument(fmt::format("--out '{}' exists and is not a directory", out.string()));
  }
  if (fs::is_directory(out, ec) && !fs::is_empty(out, ec) && !force) {
    throw InvalidArgument(fmt::format(
        "--out '{}' is not empty; refusing to overwrite it (pass --force to replace the "
        "checkpoint files in it, or choose an empty directory)",
        out.string()));
  }
  fs::create_directories(out, ec);
  if (ec) {
    throw SystemError(fmt::format("cannot create directory '{}': {}", out.string(), ec.message()),
                      ec.value());
  }
}

struct GenSettings {
  std::string out;
  std::string preset = "tiny";
  LlamaShape shape;  // values given on the command line; merged over the preset
  std::string shard_size;
  std::uint64_t seed = 0;
  bool force = false;
  unsigned threads = 0;
};

void run_gen(const GenSettings& g, const LlamaShape& s) {
  validate(s);
  std::uint64_t max_shard_bytes = 0;
  if (!g.shard_size.empty()) {
    max_shard_bytes = parse_size(g.shard_size, "--shard-size");
    if (max_shard_bytes == 0) throw InvalidArgument("--shard-size must be larger than 0");
  }
  const fs::path out = g.out;
  prepare_out_dir(out, g.force);

  const io::Dtype dtype = element_dtype(s.dtype);
  const auto specs = weight_specs(s);
  std::vector<std::uint64_t> sizes;
  std::uint64_t total_bytes = 0, total_params = 0;
  for (const auto& spec : specs) {
    sizes.push_back(io::tensor_nbytes(dtype, spec.shape));
    total_bytes += sizes.back();
    std::uint64_t n = 1;
    for (auto d : spec.shape) n *= static_cast<std::uint64_t>(d);
    total_params += n;
  }
  // One shard means one plain model.safetensors and no index, as in transformers.
  auto shards = max_shard_bytes ? plan_shards(sizes, max_shard_bytes)
                                : std::vector<std::vector<std::size_t>>{};
  if (shards.size() <= 1) {
    shards.assign(1, {});
    for (std::size_t i = 0; i < specs.size(); ++i) shards[0].push_back(i);
  }
  const unsigned threads =
      g.threads ? g.threads : std::clamp(std::thread::hardware_concurrency(), 1u, 8u);

  const auto started = std::chrono::steady_clock::now();
  std::set<std::string> written;
  nlohmann::json weight_map = nlohmann::json::object();
  for (std::size_t k = 0; k < shards.size(); ++k) {
    const std::string file = shards.size() == 1 ? "model.safetensors"
                                                : fmt::format("model-{:05d}-of-{:05d}.safetensors",
                                                              k + 1, shards.size());
    std::vector<io::TensorToWrite> tensors;
    for (std::size_t i : shards[k]) {
      const WeightSpec* spec = &specs[i];
      const std::uint64_t seed = tensor_seed(g.seed, spec->name);
      const double stddev = s.initializer_range;
      tensors.push_back(
          {spec->name, dtype, spec->shape,
           [spec, seed, stddev, dtype, threads](std::span<std::byte> bytes, std::uint64_t offset) {
             fill_parallel(*spec, seed, stddev, dtype, threads, bytes, offset);
           }});
      weight_map[spec->name] = file;
    }
    io::write_safetensors(out / file, std::move(tensors), {{"format", "pt"}});
    written.insert(file);
  }
  if (shards.size() > 1) {
    nlohmann::json index;
    index["metadata"] = {{"total_parameters", total_params}, {"total_size", total_bytes}};
    index["weight_map"] = std::move(weight_map);
    io::write_file_atomically(out / "model.safetensors.index.json", index.dump(2) + "\n");
    written.insert("model.safetensors.index.json");
  }
  io::write_file_atomically(out / "config.json", config_json(s));
  io::write_file_atomically(out / "generation_config.json", generation_config_json());

  // With --force: weight files of an earlier checkpoint that this one does not replace would
  // make the directory ambiguous (a stale index, stale shards); remove them, as transformers does.
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && is_weight_file(name) && !written.contains(name)) {
      fs::remove(entry.path());
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  fmt::print("wrote {} tensors, {} parameters, {} in {} file{} to {} ({:.1f} s)\n", specs.size(),
             total_params, format_size(total_bytes), shards.size(), shards.size() == 1 ? "" : "s",
             out.string(), seconds);
}

}  // namespace

void register_gen(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "gen", "Write a synthetic Hugging Face Llama checkpoint (config.json + safetensors)");
  auto g = std::make_shared<GenSettings>();
  std::vector<std::string> preset_names;
  for (const auto& [name, shape] : presets()) preset_names.push_back(name);

  cmd->add_option("--out", g->out, "Directory to write (created if missing)")->required();
  cmd->add_option("--preset", g->preset, "Starting shape; the options below override it")
      ->check(CLI::IsMember(preset_names))
      ->capture_default_str();
  auto* hidden = cmd->add_option("--hidden", g->shape.hidden, "Hidden size");
  auto* layers = cmd->add_option("--layers", g->shape.layers, "Number of decoder layers");
  auto* heads = cmd->add_option("--heads", g->shape.heads, "Attention heads");
  auto* kv_heads = cmd->add_option("--kv-heads", g->shape.kv_heads, "Key/value heads");
  auto* intermediate =
      cmd->add_option("--intermediate", g->shape.intermediate, "MLP intermediate size");
  auto* vocab = cmd->add_option("--vocab", g->shape.vocab, "Vocabulary size");
  auto* dtype = cmd->add_option("--dtype", g->shape.dtype, "Element type")
                    ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  auto* tie = cmd->add_flag("--tie-embeddings", g->shape.tie_embeddings,
                            "Share embed_tokens with the output head (no lm_head.weight)");
  auto* rope = cmd->add_option("--rope-theta", g->shape.rope_theta, "Rotary embedding base");
  auto* max_position =
      cmd->add_option("--max-position", g->shape.max_position, "max_position_embeddings");
  auto* eps = cmd->add_option("--rms-norm-eps", g->shape.rms_norm_eps, "RMSNorm epsilon");
  cmd->add_option("--shard-size", g->shard_size,
                  "Split into shards of at most this size (e.g. 4GiB), as save_pretrained does");
  cmd->add_option("--seed", g->seed, "Seed of the initial values")->capture_default_str();
  cmd->add_option("--threads", g->threads, "Generator threads (default: all cores, at most 8)");
  cmd->add_flag("--force", g->force, "Replace the checkpoint files in a non-empty --out");

  cmd->callback([g, hidden, layers, heads, kv_heads, intermediate, vocab, dtype, tie, rope,
                 max_position, eps] {
    LlamaShape s = presets().at(g->preset);
    auto given = [](const CLI::Option* o) { return o->count() > 0; };
    if (given(hidden)) s.hidden = g->shape.hidden;
    if (given(layers)) s.layers = g->shape.layers;
    if (given(heads)) s.heads = g->shape.heads;
    if (given(kv_heads)) s.kv_heads = g->shape.kv_heads;
    if (given(intermediate)) s.intermediate = g->shape.intermediate;
    if (given(vocab)) s.vocab = g->shape.vocab;
    if (given(dtype)) s.dtype = g->shape.dtype;
    if (given(tie)) s.tie_embeddings = true;
    if (given(rope)) s.rope_theta = g->shape.rope_theta;
    if (given(max_position)) s.max_position = g->shape.max_position;
    if (given(eps)) s.rms_norm_eps = g->shape.rms_norm_eps;
    run_gen(*g, s);
  });
}

}  // namespace lema::tools
