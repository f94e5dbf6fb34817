// The local launcher of `lema train --nproc N` (Note [Local launcher] in launch.cpp).
#pragma once

#include <chrono>

namespace lema::tools {

/// Keeps argv for launch_local_ranks, which re-executes it once per rank.
void remember_command_line(int argc, char** argv);

/// Runs `nproc` ranks of the remembered command with torchrun's environment and waits for them;
/// returns the exit status for the launcher (non-zero, after one line naming the first rank that
/// failed, when any failed).
int launch_local_ranks(int nproc, std::chrono::milliseconds dist_timeout);

}  // namespace lema::tools
