// What every trainer command opens first: a Hugging Face model directory's config, checked
// against its tensors, and its weights as paged tensors under a memory budget.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/torch/virtual_checkpoint.hpp"
#include "lema/trainer/model_config.hpp"
#include "lema/trainer/weights.hpp"

namespace CLI {
class App;
}

namespace lema::tools {

/// The weight-paging settings the commands share, as given on the command line.
struct PagingArgs {
  std::string budget = "unlimited";  // a size, or "unlimited": every page resident
  std::string page_size;             // empty: the backend's granularity
  std::string policy = "trace";
  std::string mode = "guard";
  bool prefetch = true;
  bool huge_pages = false;
  std::string device = "cpu";  // "cpu", "cuda" or "cuda:N": where the weights are paged in
  std::string host_cache;      // a size: the host cache tier of a GPU's pages; empty: none
  // A size: pages read from disk kept in shared memory for every local process that opens the
  // checkpoint (one read per machine); empty: none (unless LEMA_SHARED_HOST_CACHE gives one).
  std::string shared_host_cache;
  std::string gpu_memory = "vmm";  // how a GPU's weights are kept (runtime::GpuMemory)
  std::string device_memory_cap;   // a size: hold the rest of the GPU's free memory; empty: none
  // "weights", or "all": the trainer's other CPU allocations (activations, LoRA, optimizer
  // state) are paged under the same budget, in anonymous memory after the weights.
  std::string budget_covers = "weights";
};

/// Adds --budget, --page-size, --policy, --mode, --no-prefetch, --huge-pages and
/// --shared-host-cache to `cmd`.
void add_paging_options(CLI::App& cmd, PagingArgs& args);
/// Adds --device, --gpu-memory, --host-cache and --device-memory-cap (for commands whose whole
/// computation can run on a GPU).
void add_device_options(CLI::App& cmd, PagingArgs& args);

class ModelSession {
 public:
  /// Reads `dir`/config.json, checks it against the checkpoint's tensors and opens the weights
  /// under the budget. Throws InvalidArgument / CheckpointError / BudgetError naming what is wrong.
  static ModelSession open(const std::filesystem::path& dir, const PagingArgs& paging);

  const std::filesystem::path& dir() const noexcept { return dir_; }
  const trainer::ModelConfig& config() const noexcept { return config_; }
  torch::VirtualCheckpoint& weights() noexcept { return *weights_; }
  trainer::WeightLookup lookup() const { return trainer::lookup_in(*weights_); }
  /// Bytes of the checkpoint's tensors, and the budget in effect (resolved from "unlimited").
  std::uint64_t model_bytes() const noexcept { return model_bytes_; }
  std::uint64_t budget_bytes() const noexcept { return budget_bytes_; }
  bool unlimited() const noexcept { return unlimited_; }
  /// --budget-covers all: the weights were opened with anonymous memory for the other tensors.
  bool budget_covers_all() const noexcept { return covers_all_; }
  /// "12.0 MiB budget (a quarter of 48.1 MiB), guard mode, trace policy, 2 MiB pages".
  std::string describe() const;

 private:
  std::filesystem::path dir_;
  trainer::ModelConfig config_;
  std::shared_ptr<torch::VirtualCheckpoint> weights_;
  // Device memory held for the session's lifetime so that only --device-memory-cap stays free.
  at::Tensor ballast_;
  std::uint64_t model_bytes_ = 0;
  std::uint64_t budget_bytes_ = 0;
  bool unlimited_ = false;
  bool covers_all_ = false;
  std::string device_ = "cpu";
  std::string gpu_memory_ = "vmm";
};

}  // namespace lema::tools
