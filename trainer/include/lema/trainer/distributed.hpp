// Data-parallel training over PyTorch's c10d: one process per rank, a TCPStore for the
// rendezvous and ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA, Note [NCCL collectives]) for
// the collectives (Note [Backend choice]), set up from the environment torchrun gives each
// process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
//
// Every rank runs the same Trainer over the same data: the data loader serves each rank its
// share of one shared shuffle (TokenBatches::set_shard), the gradients of the adapters are
// averaged over the ranks before the optimizer steps (GradientBuckets), so every rank holds the
// same adapters after every step, and rank 0 alone writes checkpoints, adapters and logs.
//
// Note [Gradient averaging]
// Each rank's loss is the mean over its micro-batch, divided by grad_accum as in one process.
// The gradients are summed over the ranks and divided by the world size, so a step of W ranks
// × --batch B follows the gradient of the mean loss over the global batch of W·B sequences: the
// same step, up to float rounding, as one process with --batch W·B. (With prepared examples a
// rank's mean is over its own learned tokens, so ranks whose sequences hold different numbers
// of learned tokens are weighted equally, as PyTorch's DDP weights them.)
//
// Note [Overlapping the all-reduce]
// The adapters are grouped into buckets of about --bucket-mb, in reverse order of their
// registration (the order backward reaches them). A post-accumulate-grad hook on each adapter
// counts it ready on the last micro-step of a step; when a bucket's last adapter is ready its
// gradients are copied into one flat tensor and an asynchronous all-reduce is launched, while
// backward goes on through the earlier layers. Earlier micro-steps of --grad-accum only
// accumulate locally. After backward, finish() launches what is left (adapters that got no
// gradient contribute zeros), waits for every bucket and writes the means back into .grad.
// The flat tensors live on the group's device(): host memory for Gloo, the rank's GPU for NCCL,
// where the copies in and out are device copies ordered on the stream backward ran on.
//
// Note [A rank that fails]
// A rank that dies closes its connections, and its peers' collectives fail at once; a rank that
// hangs is noticed when a collective exceeds --dist-timeout. Either way each surviving rank
// marks itself in the store and waits briefly for the others' marks; the ranks that did not
// mark themselves are the ones named in the error (when the store itself is gone, rank 0,
// which serves it, is the one lost). Rank 0 writes a checkpoint completely or not at all
// (Note [Checkpoint publication]), so the last one stays loadable whichever rank fails.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lema/trainer/dist_backend.hpp"

namespace lema::trainer {

/// torchrun's environment for one rank.
struct DistributedEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

/// The environment torchrun sets, or nullopt when WORLD_SIZE is unset. Throws InvalidArgument
/// naming the variable when one is malformed or missing beside WORLD_SIZE.
std::optional<DistributedEnv> distributed_env_from_environment();

/// Whether this build has NCCL (its torch is a CUDA build with ProcessGroupNCCL).
bool nccl_in_build() noexcept;
/// Throws Error, one line, unless torch sees a GPU for NCCL on `device` (--device as given:
/// cuda, or cuda:N for a single local rank) and, without an index, one GPU for each of
/// `local_ranks`; InvalidArgument in a build without NCCL. Initializes the CUDA runtime: call
/// it only where NCCL is chosen.
void check_nccl_devices(const std::string& device, int local_ranks);

class ProcessGroup {
 public:
  /// Joins the group: rank 0 serves the TCPStore on MASTER_PORT, every rank connects to it and
  /// to each other through `backend`: Gloo on the CPU, or NCCL on `device` (cuda:N), which
  /// becomes the current device. Collectives that take longer than `timeout` fail; meeting at
  /// the start and the store's requests wait at least two minutes (ranks load their models at
  /// different speeds). Throws Error with one line naming the port in use, or the address that
  /// could not be reached.
  static std::unique_ptr<ProcessGroup> join(const DistributedEnv& env,
                                            std::chrono::milliseconds timeout,
                                            DistBackend backend = DistBackend::kGloo,
                                            c10::Device device = c10::Device(c10::kCPU));
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const noexcept { return env_.rank; }
  int world_size() const noexcept { return env_.world_size; }
  const DistributedEnv& env() const noexcept { return env_; }
  DistBackend backend() const noexcept;
  /// Where the collectives' tensors live: the CPU for Gloo, the rank's GPU for NCCL.
  c10::Device device() const noexcept;

  /// Compares (setting, value) pairs across the ranks; throws InvalidArgument on every rank,
  /// one line naming the first setting that differs and the ranks and values, e.g.
  /// "--seed differs between ranks: rank 0 has 5, rank 1 has 6; give every rank the same".
  /// Every rank must pass the same settings in the same order.
  void check_same(const std::vector<std::pair<std::string, std::string>>& settings);

  /// In place, the sum over the ranks divided by the world size (tensors on any device).
  void average(std::vector<at::Tensor>& tensors);
  /// In place, rank 0's values on every rank.
  void broadcast_from_rank0(std::vector<at::Tensor>& tensors);
  void barrier();

  /// Starts an asynchronous sum over the ranks of a contiguous tensor on device(); wait()
  /// finishes it (with NCCL: orders the current stream after it).
  class Pending;
  std::unique_ptr<Pending> start_sum(at::Tensor tensor);
  void wait(Pending& pending, const char* what);

 private:
  struct Impl;
  explicit ProcessGroup(DistributedEnv env, std::unique_ptr<Impl> impl);
  /// Rethrows a failed collective as Error naming the ranks lost (Note [A rank that fails]).
  [[noreturn]] void fail(const char* what, const std::exception& e);

  DistributedEnv env_;
  std::unique_ptr<Impl> impl_;
};

/// The adapters' gradients, averaged over the ranks in buckets overlapped with backward
/// (Note [Overlapping the all-reduce]). Registers hooks on `params`; must outlive backward
/// passes over them.
class GradientBuckets {
 public:
  GradientBuckets(ProcessGroup& group, std::vector<at::Tensor> params, std::int64_t bucket_bytes);
  ~GradientBuckets();
  GradientBuckets(const GradientBuckets&) = delete;
  GradientBuckets& operator=(const GradientBuckets&) = delete;

  /// Before the last micro-step's backward: launch all-reduces as buckets fill.
  void arm();
  /// After the last micro-step's backward: every .grad holds the mean over the ranks.
  void finish();
  std::size_t bucket_count() const noexcept;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace lema::trainer
