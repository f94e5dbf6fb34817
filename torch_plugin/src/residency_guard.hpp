// The residency guard: a boxed fallback on one dispatch key that only weight tensors of
// guard-mode checkpoints carry (and their views, which inherit their base's keys).
#pragma once

#include <c10/core/DispatchKey.h>

namespace lema::torch::detail {

// Note [Guard dispatch key]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// Why TESTING_ONLY_GenericWrapper: the guard must run before every op that receives a weight,
// above Autograd (so a refused write stops the op before autograd records it, and the pins
// cover the backward's reads too), for CPU and CUDA tensors alike, and only for tensors that
// carry it (an op without a weight pays nothing). torch has no per-library key for that: the
// backend keys (PrivateUse1-3) sit below Autograd and would turn the weights into another
// device's tensors, and Python's modes are per thread and Python-only. The two functionality
// keys torch leaves to out-of-tree code are TESTING_ONLY_GenericWrapper and
// TESTING_ONLY_GenericMode; the first is ordered above Autograd and is propagated to views, as
// the guard needs. The name says "testing"; nothing in torch itself uses the key.
//
// A clash: a dispatch key has one boxed fallback per process, so another library using this key
// for its own fallback would either have its registration refused (if LEMA registered first)
// or make LEMA's refused: install_residency_guard() looks first and throws InvalidArgument
// naming the key and what to do, instead of torch's error from deep inside registration. A
// library that registers kernels (not a fallback) on the key for single ops would take those
// ops from the guard; nothing at load can see that short of listing every op, so it is not
// checked.

/// The key weight tensors carry (Note [Guard dispatch key]).
inline constexpr c10::DispatchKey kGuardKey = c10::DispatchKey::TESTING_ONLY_GenericWrapper;

/// Registers the guard's fallback once per process (idempotent, thread-safe). Throws
/// InvalidArgument when another library holds a fallback on kGuardKey already.
void install_residency_guard();

}  // namespace lema::torch::detail
