// Opening a userfaultfd (see detail/uffd_open.hpp).
#include "detail/uffd_open.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace lema::runtime::detail {

OpenedUffd open_uffd() {
  OpenedUffd out;
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return {UniqueFd(fd), true, 0};
  out.error = errno;
#ifdef UFFD_USER_MODE_ONLY
  fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  if (fd >= 0) return {UniqueFd(fd), false, 0};
#endif
#ifdef USERFAULTFD_IOC_NEW
  UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (dev) {
    fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) return {UniqueFd(fd), true, 0};
  }
#endif
  return out;
}

}  // namespace lema::runtime::detail
