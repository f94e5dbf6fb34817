// Where a model's frozen weights come from: any function from a Hugging Face tensor name to a
// tensor. Two sources are provided: tensors read fully into memory, and the paged tensors of a
// lema::torch::VirtualCheckpoint (read-only, possibly bf16/f16, loaded under a budget).
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>

namespace lema::torch {
class VirtualCheckpoint;
}

namespace lema::trainer {

/// Returns the weight called `name`; throws (naming it) when there is none.
using WeightLookup = std::function<at::Tensor(const std::string& name)>;

/// Looks names up in `weights` (the map is copied; tensors share storage). Throws
/// InvalidArgument naming a missing weight.
WeightLookup lookup_in(std::map<std::string, at::Tensor> weights);
/// Looks names up in `checkpoint` (the tensors keep the checkpoint open).
WeightLookup lookup_in(const torch::VirtualCheckpoint& checkpoint);

/// Reads every tensor of a safetensors file or checkpoint directory into ordinary CPU tensors of
/// the file's dtype. Throws io::CheckpointError / io::ReadError naming the file.
std::map<std::string, at::Tensor> read_tensors(const std::filesystem::path& path);

}  // namespace lema::trainer
