#include "lema/trainer/dist_backend.hpp"

#include <spdlog/fmt/fmt.h>

#include "lema/base/error.hpp"

namespace lema::trainer {

const char* dist_backend_name(DistBackend backend) noexcept {
  return backend == DistBackend::kNccl ? "nccl" : "gloo";
}

void throw_no_nccl() {
  throw InvalidArgument(
      "--dist-backend nccl: this build of LEMA has no NCCL (its torch has no ProcessGroupNCCL: "
      "a CPU-only torch, or configured with -DLEMA_WITH_NCCL=OFF); use --dist-backend gloo, or "
      "rebuild against a CUDA torch");
}

DistBackend choose_dist_backend(std::string_view choice, std::string_view device,
                                bool build_has_nccl) {
  const bool cuda = device.substr(0, 4) == "cuda";
  if (choice == "auto") {
    return cuda && build_has_nccl ? DistBackend::kNccl : DistBackend::kGloo;
  }
  if (choice == "gloo") return DistBackend::kGloo;
  if (choice == "nccl") {
    if (!cuda) {
      throw InvalidArgument(fmt::format(
          "--dist-backend nccl moves tensors between GPUs, but the training device is --device "
          "{}; add --device cuda, or use --dist-backend gloo (or auto) on the CPU",
          device));
    }
    if (!build_has_nccl) throw_no_nccl();
    return DistBackend::kNccl;
  }
  throw InvalidArgument(fmt::format("--dist-backend {}: give auto, gloo or nccl", choice));
}

}  // namespace lema::trainer
