// The fault-mode MappedCheckpoint (userfaultfd), kept apart from the guard-mode one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "lema/io/checkpoint.hpp"
#include "lema/io/reader.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"

namespace lema::runtime::detail {

/// Empty when userfaultfd can be used here, otherwise why not.
std::string fault_mode_unavailable_reason();

/// The checkpoint's Reader: options.open_reader's, else io::Reader::open(files, options.reader).
std::unique_ptr<io::Reader> open_reader(const MappedCheckpointOptions& options,
                                        const Layout& layout);

/// The checkpoint's layout: planned at the page size the options resolve over `granularity`,
/// then the anonymous pages they ask for (MappedCheckpointOptions::anonymous_bytes).
Layout plan_layout(const io::Checkpoint& checkpoint, const MappedCheckpointOptions& options,
                   std::uint64_t granularity);

std::unique_ptr<MappedCheckpoint> open_fault_mode(io::Checkpoint checkpoint,
                                                  const MappedCheckpointOptions& options);

}  // namespace lema::runtime::detail
