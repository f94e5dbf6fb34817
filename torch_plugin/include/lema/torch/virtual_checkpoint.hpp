// A checkpoint seen by libtorch: every weight is an ordinary at::Tensor whose storage lies at the
// weight's fixed address in the checkpoint's virtual range.
//
//  - guard mode (CPU or CUDA): the tensors carry a dispatch key on which the residency guard (a
//    boxed fallback, see residency_guard.cpp and its Note [Guard dispatch key]) runs before
//    every op that receives one of them: it pins the pages of every such input for the
//    duration of the op. On the CPU, code that reads data_ptr() itself, outside an op (numpy,
//    torch.save, a C extension), is served by the runtime's fault fallback, which demand-pages
//    the read where userfaultfd is permitted (MappedCheckpoint::fault_fallback_reason() says
//    when it is not); on a GPU only ops may touch the weights.
//  - fault mode (CPU only): plain CPU tensors; userfaultfd fills missing pages on first touch.
// Writes: on the CPU a weight may be written (an in-place op such as mul_, or through memory);
// the write is kept for the life of the checkpoint (a written page evicted goes to a spill
// store, never to the checkpoint's files). Opened read_only, or on a GPU, ops writing into a
// weight are refused before they run with an error naming it (the tensors carry the guard's
// key in fault mode too), and a raw write faults.
//
// The tensors share ownership of the checkpoint: it stays open while any tensor (or a view of
// one) lives, whether or not the VirtualCheckpoint object still exists.
//
// Thread safety: every member may be called from any thread.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/runtime/policy.hpp"
#include "lema/runtime/stats.hpp"

namespace lema::torch {

/// What open() takes: every runtime setting, held whole (runtime::MappedCheckpointOptions: the
/// budget, page size, policy, mode, the reader's settings, a backend or reader of your own, ...)
/// so that none is dropped on the way, plus where torch sees the weights. `device` decides the
/// runtime's cuda_device (kCUDA: its index, 0 when it has none); leave cuda_device itself
/// unset. With a backend of your own, `device` must name where its memory is.
struct Options : runtime::MappedCheckpointOptions {
  // kCPU: weights in host memory. kCUDA: in the GPU's memory, kept as gpu_memory says (driver
  // virtual memory, vmm, the default; unified memory steered by the pager, managed; or plain
  // unified memory left to the driver, unified, where the budget must hold the whole model);
  // ops on them wait for their pages' copies on the current stream, never on the host (guard
  // mode). host_cache_bytes (kCUDA, vmm): pages kept in pinned host memory.
  c10::Device device = c10::Device(c10::kCPU);
};

namespace detail {
struct CheckpointState;
}

class VirtualCheckpoint {
 public:
  explicit VirtualCheckpoint(std::shared_ptr<detail::CheckpointState> state);

  /// The weight as a tensor of the file's dtype and shape. Throws InvalidArgument naming it when
  /// the checkpoint has no such tensor.
  at::Tensor tensor(std::string_view name) const;
  /// Every weight, in the checkpoint's order.
  std::vector<std::pair<std::string, at::Tensor>> named_tensors() const;
  std::vector<std::string> names() const;

  /// Loads the tensors' pages now (guard mode; a no-op in fault mode, where pages load on touch).
  /// A tensor larger than the budget loads its last budget's worth.
  void prefetch(std::span<const std::string> names);
  /// A hint that the tensors will not be used soon: their pages that are resident and not in use
  /// by a running op are unmapped and their memory freed for others (guard mode; a no-op in
  /// fault mode). A page shared with another tensor goes too. Returns the pages evicted.
  std::size_t evict(std::span<const std::string> names);
  /// A softer hint: the tensors' resident pages become the next to go when room is needed, but
  /// stay resident until then (runtime::Pager::demote). A page shared with another tensor is
  /// demoted too, until that tensor's next use. Returns the pages demoted.
  std::size_t demote(std::span<const std::string> names);
  /// A training step ended (the policy may use it).
  void mark_step();
  /// Gives the memory of every weight page back (host or device), the tensors staying valid at
  /// their addresses; resume() makes it again and pages refill on their next use (written
  /// weights from the spill store). An op on a weight while paused throws runtime::PagerPaused.
  /// Guard mode only (runtime::MappedCheckpoint::pause).
  void pause();
  void resume();

  runtime::PagerStats stats() const;
  /// The mode in use (fault falls back to guard where userfaultfd is refused).
  runtime::ResidencyMode mode() const;
  /// Why fault mode fell back to guard; empty otherwise.
  const std::string& fallback_reason() const;
  runtime::MappedCheckpoint& mapped() const;

 private:
  std::shared_ptr<detail::CheckpointState> state_;
};

/// Opens `path` (a .safetensors file, a sharded index or a directory). Throws InvalidArgument for
/// a device other than the CPU or CUDA (or CUDA where this torch sees none), cuda_device set
/// apart from `device`, or a tensor whose dtype this torch lacks (naming the tensor), and
/// whatever runtime::MappedCheckpoint::open throws (runtime::CudaUnavailable where the device
/// cannot be used by LEMA).
VirtualCheckpoint open(const std::filesystem::path& path, Options options);

}  // namespace lema::torch
