// Which c10d backend the ranks of a data-parallel run talk through (--dist-backend).
//
// Note [Backend choice]
// NCCL moves the gradients between GPUs without a copy through host memory, so a run on CUDA
// uses it; Gloo moves CPU tensors over TCP and is the backend of runs on the CPU. `auto` picks
// by the training device, and falls back to Gloo (which copies device tensors through the host)
// where this build has no NCCL: a CPU-only torch has no ProcessGroupNCCL. Naming nccl for a
// CPU device, or where the build lacks it, is refused in one line before any rank starts.
// Torch-free, so the choice is tested without libtorch; whether the machine has a usable GPU is
// a separate check (check_nccl_device, distributed.hpp), since it needs the CUDA runtime.
#pragma once

#include <string>
#include <string_view>

namespace lema::trainer {

enum class DistBackend { kGloo, kNccl };

/// "gloo" or "nccl", as --dist-backend spells it.
const char* dist_backend_name(DistBackend backend) noexcept;

/// The backend for --dist-backend `choice` (auto, gloo or nccl) on training device `device`
/// (--device: cpu, cuda or cuda:N), in a build that has NCCL or not (Note [Backend choice]).
/// Throws InvalidArgument, one line naming the setting, for an unknown choice, nccl on the CPU,
/// or nccl in a build without it.
DistBackend choose_dist_backend(std::string_view choice, std::string_view device,
                                bool build_has_nccl);

/// Throws the InvalidArgument that says this build has no NCCL.
[[noreturn]] void throw_no_nccl();

}  // namespace lema::trainer
