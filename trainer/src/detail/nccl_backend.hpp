// The NCCL side of ProcessGroup, behind a header that names only c10d's Backend: the
// ProcessGroupNCCL header pulls in CUDA's and NCCL's headers, which no other file of the trainer
// needs (and which a CPU-only torch lacks), so one translation unit includes it
// (distributed_nccl.cpp, compiled with LEMA_HAVE_NCCL where the build found NCCL).
#pragma once

#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

namespace lema::trainer::detail {

/// A ProcessGroupNCCL on `device` (cuda:N, made current) whose collectives fail after
/// `timeout`, its communicator connected before it returns (Note [NCCL collectives]). Throws
/// what c10d throws; InvalidArgument in a build without NCCL.
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                    int rank, int world_size, c10::Device device,
                                                    std::chrono::milliseconds timeout);

}  // namespace lema::trainer::detail
