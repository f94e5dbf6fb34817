// Keeps a forked child from reading a host reservation (Note [Fork] in fork_guard.cpp).
//
// Thread safety: protect/forget may be called from any threads; the table is lock-free, so the
// child handler never waits for a lock a parent thread held at fork().
#pragma once

#include <cstddef>
#include <cstdint>

namespace lema::runtime {

/// From now on, a child forked by this process finds [base, base + bytes) PROT_NONE.
void protect_in_children(std::byte* base, std::uint64_t bytes) noexcept;
/// Undoes protect_in_children for a range that is being released.
void forget_in_children(std::byte* base) noexcept;

}  // namespace lema::runtime
