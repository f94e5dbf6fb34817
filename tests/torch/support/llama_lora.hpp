// A small Llama-style decoder with LoRA adapters on q and v, in plain libtorch: what a user's
// training code looks like. It knows nothing of LEMA; it takes the frozen weights as a map.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace lema::test {

struct LlamaConfig {
  std::int64_t vocab = 256;
  std::int64_t hidden = 512;
  std::int64_t intermediate = 1024;
  std::int64_t layers = 3;
  std::int64_t heads = 8;
  std::int64_t lora_rank = 8;
  std::int64_t batch = 2;
  std::int64_t seq = 16;
};

using Weights = std::map<std::string, at::Tensor>;

/// Random f32 weights in Hugging Face Llama names, from `seed`.
Weights make_llama_weights(const LlamaConfig& config, std::uint64_t seed);
std::uint64_t weight_bytes(const Weights& weights);

/// Writes `weights` as one safetensors file with the library's writer.
void write_weights(const std::filesystem::path& path, const Weights& weights);
/// Reads every tensor of a safetensors file into ordinary tensors (independent of LEMA's reader).
Weights read_weights_fully(const std::filesystem::path& path);

struct TrainResult {
  std::vector<at::Tensor> losses;
  Weights adapters;  // the trained LoRA A and B matrices
};

/// Trains the adapters for `steps` steps (forward, backward, Adam) on fixed random tokens;
/// calls `after_step` after each optimizer step.
TrainResult train_lora(const LlamaConfig& config, const Weights& frozen, int steps,
                       const std::function<void()>& after_step = {});

}  // namespace lema::test
