// Reading a LoggingAdaptor's CSV back, and replaying it against another resource: the same
// allocations and frees in the same order, so a workload captured once can be measured again
// against any resource (its peak, its speed, whether a limit holds).
#pragma once

#include <cstddef>
#include <cstdint>
#include <istream>
#include <string_view>
#include <vector>

#include "lema/allocator/memory_resource.hpp"

namespace lema::allocator {

struct AllocationRecord {
  enum class Action { allocate, free };
  std::uint64_t time_ns = 0;
  std::uint64_t thread = 0;
  Action action = Action::allocate;
  std::uintptr_t pointer = 0;
  std::size_t bytes = 0;
  std::size_t alignment = 0;
};

/// Parses a log written by LoggingAdaptor (header line first). Throws lema::InvalidArgument
/// naming `name`, the line and what is wrong with it for anything else.
std::vector<AllocationRecord> read_allocation_log(std::istream& in,
                                                  std::string_view name = "allocation log");

struct ReplayResult {
  std::uint64_t allocations = 0;
  std::uint64_t frees = 0;
  std::uint64_t live_at_end = 0;  // blocks the log never freed; replay frees them at the end
};

/// Performs the records' allocations and frees on `mr` in order, each block written to once.
/// Throws lema::InvalidArgument naming the record for a free of a pointer not live in the log
/// or with other bytes or alignment than its allocation, and for an allocate of a pointer still
/// live; whatever `mr` throws passes through. Every block replay made is freed before it returns
/// or throws.
ReplayResult replay_allocation_log(const std::vector<AllocationRecord>& records,
                                   MemoryResource& mr);

}  // namespace lema::allocator
