// Torch's CPU allocator backed by a VmmResource: every CPU tensor allocated while it is
// installed (activations, gradients, optimizer state, numpy's views of them) lives in memory
// paged under a budget, so the tensors together may exceed it (allocator/vmm).
//
//   auto scope = lema::torch::use_allocator({.budget_bytes = 64 << 20});
//   ... ordinary torch code ...
//   // ~scope (or scope.restore()) puts the previous CPU allocator back.
//
// Tensors allocated under a scope keep their memory (and the VmmResource) alive after it ends;
// tensors allocated after it come from the previous allocator again. Scopes nest and must end in
// the reverse order of their start, like torch's own guards. Installing one is not thread-safe
// with respect to other threads allocating CPU tensors at that moment (torch's SetAllocator is
// not): install it before the work starts.
//
// This header needs no libtorch headers.
#pragma once

#include <memory>

#include "lema/allocator/vmm_resource.hpp"
#include "lema/runtime/stats.hpp"

namespace lema::torch {

class VirtualCheckpoint;

class AllocatorScope {
 public:
  AllocatorScope(AllocatorScope&& other) noexcept;
  AllocatorScope& operator=(AllocatorScope&&) = delete;
  AllocatorScope(const AllocatorScope&) = delete;
  AllocatorScope& operator=(const AllocatorScope&) = delete;
  /// Restores the previous CPU allocator (restore()).
  ~AllocatorScope();

  /// Puts back the CPU allocator that was installed before this scope; idempotent.
  void restore() noexcept;
  /// The memory the tensors live in.
  allocator::VmmResource& resource() const noexcept;
  runtime::PagerStats stats() const;

  struct Installed;  // defined in allocator.cpp

 private:
  friend AllocatorScope use_allocator(std::shared_ptr<allocator::VmmResource> resource);
/// The same over the anonymous memory after a checkpoint's weights (opened with
/// Options::anonymous_bytes), under the weights' budget (Note [One budget]): what `lema train
/// --budget-covers all` installs. The tensors keep the checkpoint open. Throws InvalidArgument
/// when it has no anonymous memory.
AllocatorScope use_allocator(const VirtualCheckpoint& weights);
  explicit AllocatorScope(std::unique_ptr<Installed> installed) noexcept;
  std::unique_ptr<Installed> installed_;
};

/// Installs a CPU allocator over a VmmResource of its own (options: the budget, the virtual
/// capacity, fault or guard mode). Throws what VmmResource's constructor throws.
AllocatorScope use_allocator(const allocator::VmmOptions& options);
/// The same over a resource of the caller's (one sharing a checkpoint's budget: Note [One
/// budget]). The resource lives as long as the scope or any tensor allocated from it.
AllocatorScope use_allocator(std::shared_ptr<allocator::VmmResource> resource);
/// The same over the anonymous memory after a checkpoint's weights (opened with
/// Options::anonymous_bytes), under the weights' budget (Note [One budget]): what `lema train
/// --budget-covers all` installs. The tensors keep the checkpoint open. Throws InvalidArgument
/// when it has no anonymous memory.
AllocatorScope use_allocator(const VirtualCheckpoint& weights);

}  // namespace lema::torch
