#include "spill_store.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "detail/kernel_ordering.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

namespace lema::runtime {
namespace {

std::string spill_directory() {
  for (const char* name : {"LEMA_SPILL_DIR", "TMPDIR"}) {
    const char* v = std::getenv(name);
    if (v != nullptr && *v != '\0') return v;
  }
  return "/tmp";
}

}  // namespace

SpillStore::SpillStore(std::size_t page_count, std::uint64_t page_size)
    : page_size_(page_size), spilled_(page_count, false) {
  const std::string dir = spill_directory();
  // Unnamed: nothing is left behind when the process ends, however it ends.
  fd_ = UniqueFd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  where_ = dir;
  if (!fd_) {
    const int err = errno;
    fd_ = UniqueFd(::memfd_create("lema-spill", MFD_CLOEXEC));
    where_ = "memfd";
    if (!fd_)
      throw SystemError("cannot create the spill store for written weight pages: no temporary "
                        "file in " + dir + " (" + std::strerror(err) +
                            ") and no memfd; set LEMA_SPILL_DIR to a writable directory",
                        errno);
  }
}

void SpillStore::write(PageId page, const std::byte* src) {
  const auto at = static_cast<off_t>(page * page_size_);
  std::uint64_t done = 0;
  // Its writers were kept away before this save (Note [Orderings ThreadSanitizer cannot see]).
  const detail::KernelOrderedAccess unseen;
  while (done < page_size_) {
    const ssize_t n = ::pwrite(fd_.get(), src + done, page_size_ - done,
                               at + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : ENOSPC;
      throw SystemError("cannot keep written weight page " + std::to_string(page) + " (" +
                            format_size(page_size_) + ") in the spill store in " + where_ +
                            ": " + std::strerror(err) +
                            "; free space there or set LEMA_SPILL_DIR to a larger directory",
                        err);
    }
    done += static_cast<std::uint64_t>(n);
  }
  std::lock_guard lock(mutex_);
  if (!spilled_[page]) ++spilled_pages_;
  spilled_[page] = true;
  ++writes_;
}

void SpillStore::read(PageId page, std::byte* dest) const {
  const auto at = static_cast<off_t>(page * page_size_);
  std::uint64_t done = 0;
  while (done < page_size_) {
    const ssize_t n =
        ::pread(fd_.get(), dest + done, page_size_ - done, at + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      ::lema::detail::throw_system_error(__FILE__, __LINE__, "pread(spill store)", errno);
    // A page written whole is never short; a hole reads zeros, so treat the end as zeros too.
    if (n == 0) {
      std::memset(dest + done, 0, page_size_ - done);
      break;
    }
    done += static_cast<std::uint64_t>(n);
  }
  std::lock_guard lock(mutex_);
  ++reads_;
}

void SpillStore::forget(PageId page) {
  {
    std::lock_guard lock(mutex_);
    if (page >= spilled_.size() || !spilled_[page]) return;
    spilled_[page] = false;
    --spilled_pages_;
  }
  // Only space: a failure leaves bytes nobody reads again.
  (void)::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(page * page_size_), static_cast<off_t>(page_size_));
}

bool SpillStore::holds(PageId page) const {
  std::lock_guard lock(mutex_);
  return page < spilled_.size() && spilled_[page];
}

std::uint64_t SpillStore::spilled_pages() const {
  std::lock_guard lock(mutex_);
  return spilled_pages_;
}
std::uint64_t SpillStore::bytes_written() const {
  std::lock_guard lock(mutex_);
  return writes_ * page_size_;
}
std::uint64_t SpillStore::writes() const {
  std::lock_guard lock(mutex_);
  return writes_;
}
std::uint64_t SpillStore::reads() const {
  std::lock_guard lock(mutex_);
  return reads_;
}

}  // namespace lema::runtime
