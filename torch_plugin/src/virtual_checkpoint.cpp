#include "lema/torch/virtual_checkpoint.hpp"

#include <ATen/Context.h>
#include <c10/core/TensorImpl.h>

#include <algorithm>

#include "checkpoint_state.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/torch/dtype_map.hpp"
#include "residency_guard.hpp"

namespace lema::torch {
namespace detail {

void delete_weight_context(void* context) noexcept {
  delete static_cast<WeightContext*>(context);
}

}  // namespace detail

namespace {

at::Tensor make_weight(const std::shared_ptr<detail::CheckpointState>& state,
                       const io::TensorInfo& info) {
  const runtime::TensorAddress address = state->mapped->tensor(info.name);
  const c10::ScalarType type = *to_scalar_type(info.dtype);  // checked at open
  auto* context = new detail::WeightContext{state, info.name};
  c10::DataPtr data(address.data, context, &detail::delete_weight_context, state->device);
  c10::Storage storage(c10::Storage::use_byte_size_t(), address.nbytes, std::move(data),
                       /*allocator=*/nullptr, /*resizable=*/false);
  c10::DispatchKeySet keys(state->device.is_cuda() ? c10::DispatchKey::CUDA
                                                   : c10::DispatchKey::CPU);
  if (state->guarded) keys = keys.add(detail::kGuardKey);
  auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(storage), keys,
                                                   c10::scalarTypeToTypeMeta(type));
  impl->set_sizes_contiguous(info.shape);
  return at::Tensor(std::move(impl));
}

}  // namespace

VirtualCheckpoint::VirtualCheckpoint(std::shared_ptr<detail::CheckpointState> state)
    : state_(std::move(state)) {}

at::Tensor VirtualCheckpoint::tensor(std::string_view name) const {
  const io::TensorInfo* info = state_->mapped->checkpoint().find(name);
  LEMA_EXPECTS(info != nullptr, "the checkpoint " + state_->mapped->checkpoint().source().string() +
                                    " has no tensor named '" + std::string(name) + "'");
  return make_weight(state_, *info);
}

std::vector<std::pair<std::string, at::Tensor>> VirtualCheckpoint::named_tensors() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const io::TensorInfo& info : state_->mapped->checkpoint().tensors()) {
    out.emplace_back(info.name, make_weight(state_, info));
  }
  return out;
}

std::vector<std::string> VirtualCheckpoint::names() const {
  std::vector<std::string> out;
  for (const io::TensorInfo& info : state_->mapped->checkpoint().tensors()) {
    out.push_back(info.name);
  }
  return out;
}

void VirtualCheckpoint::prefetch(std::span<const std::string> names) {
  runtime::Pager* pager = state_->mapped->pager();
  if (pager == nullptr) return;
  const std::uint64_t pool = pager->chunk_count() * pager->space().page_size();
  for (const std::string& name : names) {
    runtime::TensorAddress t = state_->mapped->tensor(name);
    // Pages are page-aligned, a tensor generally is not: leave one page of slack.
    const std::uint64_t room =
        pool > pager->space().page_size() ? pool - pager->space().page_size() : pool;
    if (t.nbytes > room) {
      t.data += t.nbytes - room;
      t.nbytes = room;
    }
    pager->release(pager->acquire(t.data, t.nbytes));
  }
}

std::size_t VirtualCheckpoint::evict(std::span<const std::string> names) {
  runtime::Pager* pager = state_->mapped->pager();
  if (pager == nullptr) return 0;
  std::size_t evicted = 0;
  for (const std::string& name : names) {
    const runtime::TensorAddress t = state_->mapped->tensor(name);
    if (t.nbytes == 0) continue;
    evicted += pager->evict(pager->space().pages_of(t.data, t.nbytes));
  }
  return evicted;
}

std::size_t VirtualCheckpoint::demote(std::span<const std::string> names) {
  runtime::Pager* pager = state_->mapped->pager();
  if (pager == nullptr) return 0;
  std::size_t demoted = 0;
  for (const std::string& name : names) {
    const runtime::TensorAddress t = state_->mapped->tensor(name);
    if (t.nbytes == 0) continue;
    demoted += pager->demote(pager->space().pages_of(t.data, t.nbytes));
  }
  return demoted;
}

void VirtualCheckpoint::mark_step() {
  state_->mapped->mark_step();
}
void VirtualCheckpoint::pause() {
  state_->mapped->pause();
}
void VirtualCheckpoint::resume() {
  state_->mapped->resume();
}
runtime::PagerStats VirtualCheckpoint::stats() const {
  return state_->mapped->stats();
}
runtime::ResidencyMode VirtualCheckpoint::mode() const {
  return state_->mapped->mode();
}
const std::string& VirtualCheckpoint::fallback_reason() const {
  return state_->mapped->fallback_reason();
}
runtime::MappedCheckpoint& VirtualCheckpoint::mapped() const {
  return *state_->mapped;
}

VirtualCheckpoint open(const std::filesystem::path& path, Options options) {
  LEMA_EXPECTS(options.device.is_cpu() || options.device.is_cuda(),
               "device " + options.device.str() +
                   " is not supported by lema::torch::open; use the CPU or a CUDA device");
  if (options.device.is_cuda()) {
    LEMA_EXPECTS(at::globalContext().hasCUDA(),
                 "device " + options.device.str() +
                     ": this torch sees no CUDA device (a CPU build of torch, no GPU, or no "
                     "driver); open the checkpoint on the CPU");
    if (!options.device.has_index()) options.device.set_index(0);
  }
  LEMA_EXPECTS(!options.cuda_device,
               "Options::cuda_device is set from Options::device; set the device (kCUDA with "
               "an index) instead");
  // Every runtime setting as given (Options holds them whole); only the device is torch's.
  runtime::MappedCheckpointOptions mapped_options = options;
  if (options.device.is_cuda()) mapped_options.cuda_device = options.device.index();
  auto state = std::make_shared<detail::CheckpointState>();
  state->device = options.device;
  state->mapped = runtime::MappedCheckpoint::open(path, mapped_options);
  for (const io::TensorInfo& info : state->mapped->checkpoint().tensors()) {
    LEMA_EXPECTS(to_scalar_type(info.dtype).has_value(),
                 "tensor '" + info.name + "' of " + path.string() + " has dtype " +
                     std::string(io::dtype_name(info.dtype)) +
                     ", which this torch has no type for; convert it (e.g. to BF16) first");
  }
  // Fault mode needs no pins, but a read-only checkpoint's tensors carry the guard too, which
  // refuses writing ops before they run (a raw write would fault).
  state->guarded = state->mapped->mode() == runtime::ResidencyMode::guard ||
                   !state->mapped->writable();
  if (state->guarded) detail::install_residency_guard();
  return VirtualCheckpoint(std::move(state));
}

}  // namespace lema::torch
