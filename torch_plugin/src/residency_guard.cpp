// The residency guard: before an op that receives weight tensors runs, pin the bytes each one
// spans (its view's extent, not the whole weight); unpin after. An op writing into a weight
// (an argument whose schema says `(a!)`) is allowed when the checkpoint keeps writes (Note
// [Dirty pages] in the runtime: the default on the host) and refused before it runs, naming
// the weight, when it was opened read-only or its weights are on a GPU.
//
// Why a dispatch-key fallback and not an at::RecordFunction callback: torch catches and only
// logs exceptions thrown by RecordFunction callbacks, so neither a refused write nor a budget
// error could stop the op (which would then fault on unmapped or read-only pages), and a global
// callback with inputs boxes the arguments of every op in the process. The fallback runs only
// for ops that have a weight among their arguments, may throw, and brackets the op exactly.
// Autograd's threads dispatch through the same key, so backward is covered; views inherit the
// key from their base.
//
// Weights in GPU memory: the pins are taken for the op's current CUDA stream. Pages whose copy
// from the host is still running make that stream wait for it (no host synchronization), and
// the unpin carries an event recorded on the stream after the op's kernels, so no chunk is
// reused before they have run.
#include "residency_guard.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint_state.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/pager.hpp"

namespace lema::torch::detail {
namespace {

/// The bytes one argument spans inside a weight.
struct Piece {
  WeightContext* weight = nullptr;
  runtime::Pager* pager = nullptr;
  std::uintptr_t lo = 0;
  std::uintptr_t hi = 0;
};

/// Ranges this thread holds pinned for ops still running (outer ops of nested calls): an inner
/// op whose pieces they cover needs no acquire of its own.
struct Held {
  runtime::Pager* pager;
  std::uintptr_t lo;
  std::uintptr_t hi;
};
thread_local std::vector<Held> t_held;

bool covered(const Piece& p) {
  return std::any_of(t_held.begin(), t_held.end(), [&](const Held& h) {
    return h.pager == p.pager && h.lo <= p.lo && p.hi <= h.hi;
  });
}

/// Appends the piece `t` spans when it is a weight; nullptr-safe for undefined tensors.
void collect(const at::Tensor& t, const c10::Argument& arg, const c10::OperatorHandle& op,
             std::vector<Piece>& out) {
  if (!t.defined() || !t.has_storage()) return;
  WeightContext* weight = weight_context(t.storage());
  if (weight == nullptr) return;
  const c10::AliasInfo* alias = arg.alias_info();
  if (alias != nullptr && alias->isWrite() && !weight->state->mapped->writable()) {
    TORCH_CHECK(!weight->state->device.is_cuda(), "lema: ", op.operator_name(),
                " would write into the weight '", weight->name, "' (argument '", arg.name(),
                "'), which lies in GPU memory: weights on a GPU are read-only for now (a written "
                "page could not be kept when evicted); clone() the weight into an ordinary "
                "tensor first, or open the checkpoint on the CPU");
    TORCH_CHECK(false, "lema: ", op.operator_name(), " would write into the weight '",
                weight->name, "' (argument '", arg.name(),
                "') of a checkpoint opened read-only; open it without read_only to keep "
                "writes, or clone() the weight into an ordinary tensor first");
  }
  const std::int64_t numel = t.numel();
  if (numel == 0 || weight->state->mapped->pager() == nullptr) return;
  std::int64_t last = t.storage_offset();
  for (std::int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto base = reinterpret_cast<std::uintptr_t>(t.storage().data_ptr().get());
  const auto item = static_cast<std::uintptr_t>(t.itemsize());
  out.push_back(Piece{weight, weight->state->mapped->pager(),
                      base + static_cast<std::uintptr_t>(t.storage_offset()) * item,
                      base + (static_cast<std::uintptr_t>(last) + 1) * item});
}

/// An op whose every result aliases an argument without writing it reads no data itself (view,
/// transpose, detach, ...); what a composite such op does read goes through ops of its own.
bool is_view_op(const c10::FunctionSchema& schema) {
  const auto& returns = schema.returns();
  return !returns.empty() && std::all_of(returns.begin(), returns.end(), [](const auto& r) {
    return r.alias_info() != nullptr && !r.alias_info()->isWrite();
  });
}

/// The op's inputs in `pager` do not fit its budget: names them, and says how many pages they
/// span (more than their bytes alone would fill: a tensor is not aligned to pages) and the
/// smallest budget for this op, in the setting names of whoever opened the checkpoint.
[[noreturn]] void throw_budget_error(const c10::OperatorHandle& op,
                                     const std::vector<Piece>& pieces, runtime::Pager& pager,
                                     const BudgetError& error) {
  std::string tensors;
  std::vector<runtime::PageId> pages;
  for (const Piece& p : pieces) {
    if (p.pager != &pager) continue;
    if (!tensors.empty()) tensors += ", ";
    tensors += "'" + p.weight->name + "' (" + format_size(p.hi - p.lo) + ")";
    const runtime::PageRange r =
        pager.space().pages_of(reinterpret_cast<const void*>(p.lo), p.hi - p.lo);
    for (std::uint32_t i = 0; i < r.count; ++i) pages.push_back(r.first + i);
  }
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  if (pages.size() > pager.chunk_count()) {
    TORCH_CHECK(false, "lema: ", op.operator_name(), " needs its inputs ", tensors,
                " resident at once; they span ", pager.budget_shortfall(pages.size()));
  }
  // The op alone would fit: pages this thread pins for enclosing ops are in the way.
  TORCH_CHECK(false, "lema: ", op.operator_name(), " needs its inputs ", tensors,
              " resident at once: ", error.what());
}

/// The current stream of a weight's CUDA device; nullopt on the CPU.
std::optional<c10::Stream> current_stream(const WeightContext& weight) {
  const c10::Device device = weight.state->device;
  if (!device.is_cuda()) return std::nullopt;
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
}

runtime::Queue queue_of(const c10::Stream& stream) {
  return runtime::Queue{stream.native_handle()};
}

/// Pins for one op; unpins (and forgets the held ranges) when the op returns or throws.
class OpPins {
 public:
  OpPins() = default;
  OpPins(const OpPins&) = delete;
  OpPins& operator=(const OpPins&) = delete;
  ~OpPins() {
    t_held.resize(held_from_);
    for (Pinned& p : leases_) {
      runtime::Fence last_use;
      if (p.stream) {
        try {
          last_use = p.pager->space().backend().record_fence(queue_of(*p.stream));
        } catch (const std::exception& e) {
          // The kernels' completion cannot be tracked: wait for them on the host instead.
          TORCH_WARN("lema: recording the last use of weights failed (", e.what(),
                     "); synchronizing the stream");
          c10::impl::getDeviceGuardImpl(p.stream->device_type())->synchronizeStream(*p.stream);
        }
      }
      p.pager->release(std::move(p.lease), last_use);
    }
  }

  void pin(const c10::OperatorHandle& op, const std::vector<Piece>& pieces) {
    held_from_ = t_held.size();
    std::vector<runtime::ByteRange> ranges;
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      runtime::Pager* pager = pieces[i].pager;
      if (std::any_of(pieces.begin(), pieces.begin() + static_cast<std::ptrdiff_t>(i),
                      [&](const Piece& p) { return p.pager == pager; })) {
        continue;  // this pager's pieces were handled with its first piece
      }
      ranges.clear();
      bool all_covered = true;
      for (const Piece& p : pieces) {
        if (p.pager != pager) continue;
        all_covered = all_covered && covered(p);
        ranges.push_back({reinterpret_cast<const void*>(p.lo), p.hi - p.lo});
      }
      if (all_covered) continue;
      const std::optional<c10::Stream> stream = current_stream(*pieces[i].weight);
      try {
        leases_.push_back(
            {pager,
             stream ? pager->acquire(ranges, queue_of(*stream)) : pager->acquire(ranges),
             stream});
      } catch (const BudgetError& e) {
        throw_budget_error(op, pieces, *pager, e);
      }
      for (const Piece& p : pieces) {
        if (p.pager == pager) t_held.push_back({pager, p.lo, p.hi});
      }
    }
  }

 private:
  struct Pinned {
    runtime::Pager* pager;
    runtime::Lease lease;
    std::optional<c10::Stream> stream;  // the CUDA stream the op's kernels run on
  };
  std::size_t held_from_ = t_held.size();
  std::vector<Pinned> leases_;
};

void guard_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    ::torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const auto& args = schema.arguments();
  const auto values = ::torch::jit::last(*stack, args.size());
  std::vector<Piece> pieces;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = values[i];
    if (v.isTensor()) {
      collect(v.toTensor(), args[i], op, pieces);
    } else if (v.isTensorList()) {
      for (const c10::IValue& e : v.toListRef()) collect(e.toTensor(), args[i], op, pieces);
    } else if (v.isList()) {  // Tensor?[]
      for (const c10::IValue& e : v.toListRef()) {
        if (e.isTensor()) collect(e.toTensor(), args[i], op, pieces);
      }
    }
  }
  OpPins pins;
  if (!pieces.empty() && !is_view_op(schema)) pins.pin(op, pieces);
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kGuardKey), stack);
}

}  // namespace

void install_residency_guard() {
  // Registered once, deregistered at exit: only tensors carrying kGuardKey reach it, so an idle
  // registration costs nothing.
  static ::torch::Library library = [] {
    // Note [Guard dispatch key]: one fallback per key and process; say whose it is.
    if (c10::Dispatcher::singleton().hasBackendFallbackForDispatchKey(kGuardKey))
      throw InvalidArgument(
          "another library in this process registered a fallback on torch's dispatch key " +
          std::string(c10::toString(kGuardKey)) +
          ", which LEMA's residency guard needs; load only one of them, or open the "
          "checkpoint in fault mode without read_only (its tensors carry no key)");
    ::torch::Library lib(::torch::Library::IMPL, "_", kGuardKey, __FILE__, __LINE__);
    lib.fallback(::torch::CppFunction::makeFromBoxedFunction<&guard_fallback>());
    return lib;
  }();
  (void)library;
}

}  // namespace lema::torch::detail
