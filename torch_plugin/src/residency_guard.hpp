// The residency guard: a boxed fallback on one dispatch key that only weight tensors of
// guard-mode checkpoints carry (and their views, which inherit their base's keys).
#pragma once

#include <c10/core/DispatchKey.h>

namespace lema::torch::detail {

/// The key weight tensors carry. One of the two functionality keys torch leaves to out-of-tree
/// code; it sits above Autograd, so the guard sees every op before autograd records it.
inline constexpr c10::DispatchKey kGuardKey = c10::DispatchKey::TESTING_ONLY_GenericWrapper;

/// Registers the guard's fallback once per process (idempotent, thread-safe).
void install_residency_guard();

}  // namespace lema::torch::detail
