// Opening a userfaultfd the most capable way the process is allowed: shared by fault mode's
// region and guard mode's fault fallback.
#pragma once

#include "lema/base/unique_fd.hpp"

namespace lema::runtime::detail {

struct OpenedUffd {
  UniqueFd fd;                 // O_CLOEXEC | O_NONBLOCK; empty when every way was refused
  bool kernel_faults = false;  // faults of system calls on the range are served too
  int error = 0;               // errno of the most telling failure when fd is empty
};

/// Without UFFD_USER_MODE_ONLY first, so that a system call reading the range (write(2) from
/// it) waits for the fill instead of failing with EFAULT; that needs CAP_SYS_PTRACE or
/// vm.unprivileged_userfaultfd=1. Then user-mode only, then /dev/userfaultfd, which grants
/// userfaultfd through file permissions, past the sysctl.
OpenedUffd open_uffd();

}  // namespace lema::runtime::detail
