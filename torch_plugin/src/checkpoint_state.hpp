// What the tensors of a VirtualCheckpoint share: the mapped checkpoint and, per tensor storage,
// a context naming the weight (so the guard finds both from a tensor in O(1)).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <memory>
#include <string>

#include "lema/runtime/mapped_checkpoint.hpp"

namespace lema::torch::detail {

struct CheckpointState {
  std::unique_ptr<runtime::MappedCheckpoint> mapped;
  bool guarded = false;  // the tensors carry the guard's dispatch key
  c10::Device device = c10::Device(c10::kCPU);  // where the weights' memory is
};

/// The deleter context of one weight's storage: keeps the checkpoint open.
struct WeightContext {
  std::shared_ptr<CheckpointState> state;
  std::string name;
};

void delete_weight_context(void* context) noexcept;

/// The context when `storage` is a weight of a checkpoint; nullptr otherwise.
inline WeightContext* weight_context(const c10::Storage& storage) noexcept {
  const c10::DataPtr& data = storage.data_ptr();
  if (data.get_deleter() != &delete_weight_context) return nullptr;
  return static_cast<WeightContext*>(data.get_context());
}

}  // namespace lema::torch::detail
