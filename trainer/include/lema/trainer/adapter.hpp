// LoRA adapters on disk in the PEFT layout, so the ecosystem (peft.PeftModel.from_pretrained)
// loads what the trainer writes, and the trainer can resume from or merge what it wrote.
//   adapter_model.safetensors: base_model.model.<module path>.lora_A.weight [r, in] and
//                              .lora_B.weight [out, r]
//   adapter_config.json:       peft_type LORA, r, lora_alpha, lora_dropout, target_modules,
//                              base_model_name_or_path, task_type CAUSAL_LM, bias none, ...
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lema::trainer {

inline constexpr const char* kAdapterConfigFile = "adapter_config.json";
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";

struct LoraSettings {
  std::int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  std::vector<std::string> target_modules = {"q_proj",    "k_proj",  "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  /// True for GPT-2's Conv1D projections (weights stored [in, out]), as peft records it; the
  /// model's layout decides it, so a loaded value is only carried along.
  bool fan_in_fan_out = false;
  /// alpha / rank, the factor on B·A.
  double scaling() const { return alpha / static_cast<double>(rank); }
};

/// Writes both files into `dir` (created if missing), each atomically. Tensors are written in
/// their dtype (contiguous CPU copies are made as needed). Throws SystemError naming the path.
void save_adapter(const std::filesystem::path& dir,
                  const std::vector<std::pair<std::string, at::Tensor>>& named_tensors,
                  const LoraSettings& lora, const std::string& base_model_name_or_path);

struct LoadedAdapter {
  LoraSettings lora;
  std::string base_model_name_or_path;
  std::map<std::string, at::Tensor> tensors;  // PEFT key → tensor (CPU)
};

/// Reads an adapter directory written by save_adapter or by PEFT. Throws CheckpointError /
/// InvalidArgument naming the file and what is wrong (not LoRA, missing keys, bad shapes).
LoadedAdapter load_adapter(const std::filesystem::path& dir);

}  // namespace lema::trainer
