// Note [NCCL collectives]
// On CUDA the ranks join a ProcessGroupNCCL, each on its own GPU (cuda:LOCAL_RANK), over the
// same TCPStore as Gloo (the settings checks keep using the store). The gradient buckets and
// the other collectives' tensors live on that GPU, so nothing is staged through host memory.
// NCCL's collectives run on a stream of their own; Work::wait() orders the caller's stream
// after them. By default c10d's watchdog would abort the process when a collective outlives
// its timeout; TORCH_NCCL_BLOCKING_WAIT=1 (set unless the user set it) makes wait() throw
// instead, after --dist-timeout, so a lost rank is reported as with Gloo (Note [A rank that
// fails]). The communicator is connected at join (eagerConnectSingleDevice), so a GPU or
// network that NCCL cannot use fails there, before the model loads, not at the first step.
#include "detail/nccl_backend.hpp"

#include <spdlog/fmt/fmt.h>

#include <cstdlib>

#include "lema/base/error.hpp"
#include "lema/trainer/dist_backend.hpp"
#include "lema/trainer/distributed.hpp"

#ifndef LEMA_HAVE_NCCL
#define LEMA_HAVE_NCCL 0
#endif
#if LEMA_HAVE_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace lema::trainer {

namespace {

[[maybe_unused]] std::string first_line(const char* what) {
  std::string s(what);
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

}  // namespace

bool nccl_in_build() noexcept { return LEMA_HAVE_NCCL != 0; }

void check_nccl_devices(const std::string& device, int local_ranks) {
#if LEMA_HAVE_NCCL
  int index = -1;
  try {
    const c10::Device parsed(device);
    if (parsed.has_index()) index = parsed.index();
  } catch (const std::exception&) {
    throw InvalidArgument(fmt::format("--device {}: give cpu, cuda or cuda:N", device));
  }
  if (index >= 0 && local_ranks > 1) {
    throw InvalidArgument(fmt::format(
        "--device {} puts all {} local ranks on one GPU, and NCCL takes one GPU per rank; give "
        "--device cuda (local rank r on GPU r)",
        device, local_ranks));
  }
  int count = 0;
  try {
    count = c10::cuda::device_count_ensure_non_zero();
  } catch (const c10::Error& e) {
    throw Error(fmt::format(
        "--dist-backend nccl needs a GPU for --device {}, and torch sees none on this machine "
        "({}); train on --device cpu (Gloo)",
        device, first_line(e.what_without_backtrace())));
  }
  if (index >= count) {
    throw InvalidArgument(fmt::format("--device {}: this machine has {} GPU{} (cuda:0 to "
                                      "cuda:{}); give one of them",
                                      device, count, count == 1 ? "" : "s", count - 1));
  }
  if (index < 0 && local_ranks > count) {
    throw InvalidArgument(fmt::format(
        "--dist-backend nccl with {} local ranks takes one GPU each, and this machine has {}; "
        "lower --nproc to {} or train on --device cpu (Gloo)",
        local_ranks, count, count));
  }
#else
  (void)device;
  (void)local_ranks;
  throw_no_nccl();
#endif
}

namespace detail {

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                    int rank, int world_size, c10::Device device,
                                                    std::chrono::milliseconds timeout) {
#if LEMA_HAVE_NCCL
  LEMA_EXPECTS(device.is_cuda() && device.has_index(), "NCCL needs a CUDA device with an index");
  ::setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
  c10::cuda::set_device(device.index());
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("nccl", store);
  auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world_size, options);
  group->eagerConnectSingleDevice(device);
  return group;
#else
  (void)store;
  (void)rank;
  (void)world_size;
  (void)device;
  (void)timeout;
  throw_no_nccl();
#endif
}

}  // namespace detail

}  // namespace lema::trainer
