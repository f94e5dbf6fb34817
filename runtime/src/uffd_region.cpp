// userfaultfd demand paging of an anonymous range (see detail/uffd_region.hpp).
#include "detail/uffd_region.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "detail/uffd_open.hpp"
#include "lema/base/error.hpp"
#include "lema/base/memory_mapping.hpp"
#include "lema/base/unique_fd.hpp"

namespace lema::runtime::detail {
namespace {

std::string explain(int err) {
  switch (err) {
    case EPERM:
    case EACCES:
      return "userfaultfd is not permitted for this process (vm.unprivileged_userfaultfd is 0 "
             "and the process lacks CAP_SYS_PTRACE, or a seccomp filter such as a container's "
             "refuses it); use --mode guard, or allow it with `sysctl "
             "vm.unprivileged_userfaultfd=1`";
    case ENOSYS:
      return "this kernel has no userfaultfd (CONFIG_USERFAULTFD is off, or a seccomp filter "
             "hides the system call); use --mode guard";
    default:
      return std::string("userfaultfd failed: ") + std::strerror(err) + "; use --mode guard";
  }
}

/// API handshake and registration of [data, data + bytes) for missing pages and, where the
/// kernel has it and `want_wp`, write protection (`wp` says whether it took); errno or 0.
int handshake_and_register(int fd, std::byte* data, std::size_t bytes, bool want_wp, bool& wp) {
  uffdio_api api{};
  api.api = UFFD_API;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) return errno;
  // The handshake returns every feature the kernel has; write protection of anonymous memory
  // is one (since Linux 5.7, where the architecture supports it).
  wp = want_wp && (api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP) != 0;
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<std::uintptr_t>(data);
  reg.range.len = bytes;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | (wp ? UFFDIO_REGISTER_MODE_WP : 0);
  if (::ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
    if (!wp) return errno;
    wp = false;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(fd, UFFDIO_REGISTER, &reg) != 0) return errno;
  }
  if ((reg.ioctls & (std::uint64_t{1} << _UFFDIO_COPY)) == 0) return EOPNOTSUPP;
  if (wp && (reg.ioctls & (std::uint64_t{1} << _UFFDIO_WRITEPROTECT)) == 0) return EOPNOTSUPP;
  return 0;
}

}  // namespace

struct UffdRegion::State {
  Options options;
  std::size_t system_page = 0;
  MemoryMapping range;
  MemoryMapping staging;  // one page; page-aligned as UFFDIO_COPY wants its source
  UniqueFd uffd;
  UniqueFd stop;  // eventfd: written once to end the handler thread
  bool kernel_faults = false;
  bool wp = false;  // pages are installed write-protected (Note [Written pages])

  mutable std::mutex mutex;  // guards everything below; callbacks run under it
  std::vector<std::uint8_t> resident;
  std::vector<std::uint8_t> dirty;  // written since installed (wp only)
  std::vector<std::uint8_t> poisoned;  // made inaccessible by a failed fill (Note [Fill errors])
  std::vector<PageId> fill_order;  // resident pages, oldest fill first
  Stats stats;
  std::string first_error;

  std::thread handler;

  std::byte* page_address(PageId page) const {
    return range.data() + static_cast<std::size_t>(page) * options.page_size;
  }

  void record_error(const std::string& what) {
    ++stats.fill_errors;
    if (first_error.empty()) first_error = what;
  }

  void wake(PageId page) {
    uffdio_range r{};
    r.start = reinterpret_cast<std::uintptr_t>(page_address(page));
    r.len = options.page_size;
    LEMA_SYS_TRY(::ioctl(uffd.get(), UFFDIO_WAKE, &r));
  }

  // Note [Written pages]
  // ~~~~~~~~~~~~~~~~~~~~
  // Pages are anonymous memory, so a write to one lands in it and would vanish with the
  // MADV_DONTNEED of its eviction. Where the kernel has userfaultfd write protection, pages are
  // installed write-protected (UFFDIO_COPY_MODE_WP): the first write to each stops in a
  // UFFD_PAGEFAULT_FLAG_WP fault, which marks the page dirty and lifts the protection of that
  // page (UFFDIO_WRITEPROTECT, mode 0, which wakes the writer); a write that finds the page
  // missing gets it installed unprotected and dirty at once. Evicting a dirty page hands its
  // bytes to `save` first. Where the kernel lacks write protection no write is seen, so every
  // evicted page is saved (correct, at the cost of a copy per eviction; logged once). With
  // `refuse_write` the protection stays and the write is refused: the writer is poisoned as for
  // a failed fill (Note [Fill errors]).
  //
  // A dirty page is write-protected again before it is saved: a thread writing it meanwhile
  // stops in a write-protect fault, which this (handler) thread serves only after the
  // MADV_DONTNEED; it finds the page gone, wakes the writer, whose retry refills the page from
  // what was saved and writes again. So no write slips between the save and the drop. (Without
  // write protection a write racing the eviction of its page can be lost; a write while no
  // eviction runs cannot.)
  void zap(PageId page) {
    if (options.save && (dirty[page] != 0 || !wp)) {
      if (wp) set_write_protect(page, true);
      options.save(page, page_address(page));
      ++stats.dirty_evictions;
    }
    LEMA_SYS_TRY(::madvise(page_address(page), options.page_size, MADV_DONTNEED));
    dirty[page] = 0;
    resident[page] = 0;
    std::erase(fill_order, page);
    ++stats.evictions;
    --stats.resident_pages;
  }

  void evict_for(PageId incoming) {
    PageId victim = fill_order.front();
    if (options.choose_victim) {
      const PageId chosen = options.choose_victim(fill_order);
      // A chooser outside the resident set must not break the budget: keep the default.
      if (chosen < options.page_count && resident[chosen] != 0 && chosen != incoming)
        victim = chosen;
    }
    zap(victim);
  }

  /// Installs the staging page at `page` without waking; retries what the kernel asks to.
  /// Write-protected where the region tracks writes, unless `written` (a write is waiting).
  void copy_in(PageId page, bool written) {
    std::size_t done = 0;
    while (done < options.page_size) {
      uffdio_copy c{};
      c.dst = reinterpret_cast<std::uintptr_t>(page_address(page) + done);
      c.src = reinterpret_cast<std::uintptr_t>(staging.data() + done);
      c.len = options.page_size - done;
      c.mode = UFFDIO_COPY_MODE_DONTWAKE | (wp && !written ? UFFDIO_COPY_MODE_WP : 0);
      if (::ioctl(uffd.get(), UFFDIO_COPY, &c) == 0) return;
      const int err = errno;
      if (c.copy > 0) done += static_cast<std::size_t>(c.copy);
      if (err == EAGAIN) continue;  // the mapping changed under the copy: copy the rest again
      if (err == EEXIST) {          // that system page is in already (an earlier partial copy)
        done += system_page;
        continue;
      }
      ::lema::detail::throw_system_error(__FILE__, __LINE__, "ioctl(UFFDIO_COPY)", err);
    }
  }

  // Note [Fill errors]
  // ~~~~~~~~~~~~~~~~~~
  // A faulting thread cannot be handed an error: it waits in the kernel until its page exists.
  // Installing anything but the page's bytes would show wrong bytes at its address, so a failed
  // fill makes the page inaccessible instead and wakes the thread, which then gets SIGSEGV at
  // that address; the error is kept for first_error() and logged first, so that the user sees
  // which file failed before the signal. Callers that can fail softly make a page resident
  // through prefetch() before touching it: there a fill error is thrown to the caller and the
  // page stays absent, not poisoned (MappedCheckpoint::read_tensor_range in fault mode does so
  // page by page). A later successful fill of a poisoned page (a prefetch) makes it accessible
  // again.
  void poison(PageId page) noexcept {
    if (::mprotect(page_address(page), options.page_size, PROT_NONE) == 0) poisoned[page] = 1;
    try {
      wake(page);
    } catch (...) {
    }
  }

  /// Makes `page` resident; false when it already was. Caller holds `mutex`. A fill error is
  /// rethrown for a prefetch; for a fault the page is poisoned (Note [Fill errors]).
  bool install(PageId page, bool for_fault, bool for_write = false) {
    if (resident[page] != 0) return false;
    if (fill_order.size() >= options.budget_pages) evict_for(page);
    try {
      options.fill(page, staging.data());
    } catch (const std::exception& e) {
      if (!for_fault) throw;
      const std::string what = "filling page " + std::to_string(page) + ": " + e.what();
      spdlog::error(
          "{}; the thread that touched the page gets SIGSEGV (fault mode cannot hand "
          "it an error)",
          what);
      record_error(what);
      poison(page);
      return false;
    }
    // A write waiting on a missing page: installed writable and dirty at once, saving the
    // write-protect fault that would follow (unless writes are refused: it then comes).
    if (poisoned[page] != 0) {
      LEMA_SYS_TRY(::mprotect(page_address(page), options.page_size, PROT_READ | PROT_WRITE));
      poisoned[page] = 0;
    }
    const bool written = wp && for_write && !refuses_write(page);
    copy_in(page, written);
    dirty[page] = written ? 1 : 0;
    resident[page] = 1;
    fill_order.push_back(page);
    stats.peak_resident_pages = std::max(stats.peak_resident_pages, ++stats.resident_pages);
    wake(page);
    return true;
  }

  /// The first write to a write-protected resident page (Note [Written pages]).
  void serve_write(PageId page) {
    if (resident[page] == 0) {  // evicted since: the writer's retry faults as missing
      wake(page);
      return;
    }
    ++stats.write_faults;
    if (options.refuse_write) {
      std::string refused = options.refuse_write(page);
      if (!refused.empty()) {
        record_error(std::move(refused));
        poison(page);
        return;
      }
    }
    dirty[page] = 1;
    set_write_protect(page, false);  // which wakes the writer
  }

  bool refuses_write(PageId page) const {
    return options.refuse_write && !options.refuse_write(page).empty();
  }

  void set_write_protect(PageId page, bool on) {
    uffdio_writeprotect w{};
    w.range.start = reinterpret_cast<std::uintptr_t>(page_address(page));
    w.range.len = options.page_size;
    w.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    LEMA_SYS_TRY(::ioctl(uffd.get(), UFFDIO_WRITEPROTECT, &w));
  }

  void serve_fault(const uffd_msg& msg) {
    const auto base = reinterpret_cast<std::uintptr_t>(range.data());
    const auto page =
        static_cast<PageId>((msg.arg.pagefault.address - base) / options.page_size);
    const std::uint64_t flags = msg.arg.pagefault.flags;
    std::lock_guard lock(mutex);
    if ((flags & UFFD_PAGEFAULT_FLAG_WP) != 0) return serve_write(page);
    if (install(page, /*for_fault=*/true, (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0)) {
      ++stats.faults;
    } else if (resident[page] != 0) {
      ++stats.shared_faults;  // filled since this fault was queued; its thread needs a wake
      wake(page);
    }
  }

  void run_handler() noexcept {
    pollfd fds[2] = {{uffd.get(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
    uffd_msg msgs[16];
    for (;;) {
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return fail("poll on the userfaultfd");
      }
      if (fds[1].revents != 0) return;
      if ((fds[0].revents & (POLLERR | POLLHUP)) != 0) return fail("userfaultfd closed");
      const ssize_t n = ::read(uffd.get(), msgs, sizeof(msgs));
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        return fail("read of the userfaultfd");
      }
      for (std::size_t i = 0; i < static_cast<std::size_t>(n) / sizeof(uffd_msg); ++i) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        try {
          serve_fault(msgs[i]);
        } catch (const std::exception& e) {
          std::lock_guard lock(mutex);
          record_error(e.what());
        }
      }
    }
  }

  void fail(const char* what) noexcept {
    const int err = errno;
    std::lock_guard lock(mutex);
    record_error(std::string(what) + ": " + std::strerror(err));
  }

  ~State() {
    if (handler.joinable()) {
      const std::uint64_t one = 1;
      [[maybe_unused]] const ssize_t w = ::write(stop.get(), &one, sizeof(one));
      handler.join();
    }
  }
};

std::optional<std::string> UffdRegion::unavailable_reason() {
  OpenedUffd opened = open_uffd();
  if (!opened.fd) return explain(opened.error);
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  try {
    MemoryMapping probe = MemoryMapping::anonymous(page, "the userfaultfd probe", MAP_NORESERVE);
    bool wp = false;
    if (const int err = handshake_and_register(opened.fd.get(), probe.data(), page, true, wp);
        err != 0)
      return explain(err);
  } catch (const SystemError& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}

UffdRegion::UffdRegion(Options options) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.system_page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  LEMA_EXPECTS(options.page_count > 0, "a userfaultfd region needs at least one page");
  LEMA_EXPECTS(options.page_size > 0 && options.page_size % s.system_page == 0,
               "userfaultfd page size " + std::to_string(options.page_size) +
                   " is not a multiple of the system page size " + std::to_string(s.system_page));
  LEMA_EXPECTS(options.budget_pages >= 1,
               "a userfaultfd region needs a budget of at least one page (budget 0 pages of " +
                   std::to_string(options.page_size) + " bytes)");
  LEMA_EXPECTS(static_cast<bool>(options.fill), "a userfaultfd region needs a fill callback");
  LEMA_EXPECTS(
      options.page_count <= (std::size_t{1} << 32) &&
          options.page_count <= SIZE_MAX / options.page_size,
      "userfaultfd region of " + std::to_string(options.page_count) + " pages is too large");
  s.options = std::move(options);
  s.resident.assign(s.options.page_count, 0);
  s.dirty.assign(s.options.page_count, 0);
  s.poisoned.assign(s.options.page_count, 0);

  OpenedUffd opened = open_uffd();
  if (!opened.fd) throw SystemError(explain(opened.error), opened.error);
  s.uffd = std::move(opened.fd);
  s.kernel_faults = opened.kernel_faults;
  s.range = MemoryMapping::anonymous(s.options.page_count * s.options.page_size,
                                     "the userfaultfd range", MAP_NORESERVE);
  s.staging =
      MemoryMapping::anonymous(s.options.page_size, "the userfaultfd staging page", MAP_NORESERVE);
  const bool want_wp = s.options.write_protect && (s.options.save || s.options.refuse_write);
  if (const int err = handshake_and_register(s.uffd.get(), s.range.data(), s.range.size(),
                                             want_wp, s.wp);
      err != 0)
    throw SystemError(explain(err), err);
  if (s.options.save && !s.wp)
    spdlog::warn("userfaultfd write protection is not available{}: every evicted page is kept "
                 "as if written (correct, one copy per eviction)",
                 s.options.write_protect ? " in this kernel" : " (turned off)");
  s.stop = UniqueFd(LEMA_SYS_TRY(::eventfd(0, EFD_CLOEXEC)));
  s.handler = std::thread([&s] { s.run_handler(); });
}

UffdRegion::UffdRegion(UffdRegion&&) noexcept = default;
UffdRegion& UffdRegion::operator=(UffdRegion&&) noexcept = default;
UffdRegion::~UffdRegion() = default;

std::byte* UffdRegion::data() const noexcept {
  return state_->range.data();
}
std::size_t UffdRegion::page_size() const noexcept {
  return state_->options.page_size;
}
std::size_t UffdRegion::page_count() const noexcept {
  return state_->options.page_count;
}
std::size_t UffdRegion::budget_pages() const noexcept {
  return state_->options.budget_pages;
}
bool UffdRegion::handles_kernel_faults() const noexcept {
  return state_->kernel_faults;
}
bool UffdRegion::tracks_writes() const noexcept {
  return state_->wp;
}

void UffdRegion::evict(PageId page) {
  LEMA_EXPECTS(page < page_count(), "evict of page " + std::to_string(page) + " outside the " +
                                        std::to_string(page_count()) + "-page region");
  std::lock_guard lock(state_->mutex);
  if (state_->resident[page] != 0) state_->zap(page);
}

bool UffdRegion::discard(PageId page) {
  LEMA_EXPECTS(page < page_count(), "discard of page " + std::to_string(page) + " outside the " +
                                        std::to_string(page_count()) + "-page region");
  std::lock_guard lock(state_->mutex);
  if (state_->resident[page] == 0) return false;
  LEMA_SYS_TRY(::madvise(state_->page_address(page), state_->options.page_size, MADV_DONTNEED));
  state_->dirty[page] = 0;
  state_->resident[page] = 0;
  std::erase(state_->fill_order, page);
  --state_->stats.resident_pages;
  return true;
}

bool UffdRegion::prefetch(PageId page) {
  LEMA_EXPECTS(page < page_count(), "prefetch of page " + std::to_string(page) + " outside the " +
                                        std::to_string(page_count()) + "-page region");
  std::lock_guard lock(state_->mutex);
  const bool filled = state_->install(page, /*for_fault=*/false);
  if (filled) ++state_->stats.prefetches;
  return filled;
}

bool UffdRegion::is_resident(PageId page) const {
  std::lock_guard lock(state_->mutex);
  return page < page_count() && state_->resident[page] != 0;
}

UffdRegion::Stats UffdRegion::stats() const {
  std::lock_guard lock(state_->mutex);
  return state_->stats;
}

std::string UffdRegion::first_error() const {
  std::lock_guard lock(state_->mutex);
  return state_->first_error;
}

}  // namespace lema::runtime::detail
