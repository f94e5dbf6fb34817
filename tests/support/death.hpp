// How a test recognises a process that died of SIGSEGV, in every build.
#pragma once

#include <sys/wait.h>

#include <csignal>

namespace lema::test {

/// True when `status` (from waitpid, or a death test's exit predicate) is a death by SIGSEGV.
/// ASan and TSan catch the signal, print their report and exit with their own non-zero status
/// (1 and 66) instead of dying of it, so a sanitized build accepts that too.
inline bool died_of_segv(int status) {
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV) return true;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  if (WIFEXITED(status) && WEXITSTATUS(status) != 0) return true;
#endif
  return false;
}

}  // namespace lema::test
