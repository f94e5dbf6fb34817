// The guard-mode fault fallback (see detail/guard_fallback.hpp).
//
// Note [Guard fault fallback]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Guard mode makes pages resident around each op; any other read of a weight (numpy over the
// storage, torch.save, a write(2) from the range, an Inductor kernel reading data_ptr, a C
// extension) used to land on PROT_NONE memory and kill the process. The fallback keeps the fast
// path and serves every miss of it by demand paging:
//  - Unmapped pages are placeholder memory: anonymous, PROT_READ|PROT_WRITE, MAP_NORESERVE, and
//    registered with one userfaultfd in MISSING mode. A touch blocks the thread in the kernel
//    (a system call's touch too, since the descriptor is made without UFFD_USER_MODE_ONLY where
//    the process may) and queues a message.
//  - The worker thread asks the Pager for the page (Pager::fault_in: an acquire, so the fill
//    goes through the pool window and the chunk is mapped MAP_FIXED over the placeholder,
//    replacing its VMA) and releases it at once: the page stays resident but unpinned,
//    evictable like any other, counted as a fault (or a hit) and as a fallback_fault. Then
//    UFFDIO_WAKE: the woken thread retries its access and finds the mapped chunk. Neither
//    thread ever touches the model range; the placeholder is never resolved with
//    UFFDIO_ZEROPAGE or UFFDIO_COPY, so it can never read as zeros.
//  - Eviction (Backend::unmap) must put registered placeholder memory back in one step: a fresh
//    anonymous VMA is not registered, and any moment at which the page is an unregistered
//    readable VMA shows zeros, or, made PROT_NONE until registered, a signal, to a concurrent
//    reader. So place() maps the placeholder at a scratch address, registers it there, and
//    mremap(MREMAP_FIXED)s it over the page, which replaces the old mapping atomically; with
//    UFFD_FEATURE_EVENT_REMAP the registration moves with it (without, mremap drops it).
//    The kernel makes mremap wait until the handler has read the UFFD_EVENT_REMAP message, and
//    the pager calls unmap under its lock; so a dedicated reader thread consumes messages and
//    never takes the pager's lock, while the worker, which may wait for that lock, serves the
//    faults it queues. One remap costs a round trip to the reader thread (docs/PERFORMANCE.md).
//  - Failure (a read error, or every chunk of the budget pinned for longer than the patience:
//    typically the faulting thread itself pins them in an op): one error line naming the file,
//    tensor and page, then the placeholder is made PROT_NONE and the thread woken; it gets
//    SIGSEGV, since a thread blocked in a page fault cannot be handed an error. The next
//    acquire of the page maps it again, so the poison lasts until then.
//  - Where userfaultfd (or its remap events) is refused, nothing changes: unmapped pages stay
//    PROT_NONE and the reason is logged once and kept (MappedCheckpoint::fault_fallback_reason).
//  - fork(): the child does not inherit the registration; Note [Fork] makes the reservation
//    PROT_NONE in it.
#include "detail/guard_fallback.hpp"

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
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "detail/kernel_ordering.hpp"
#include "detail/uffd_open.hpp"
#include "lema/base/error.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/runtime/layout.hpp"

namespace lema::runtime::detail {
namespace {

std::string why_not(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err) +
         (err == EPERM || err == EACCES
              ? " (userfaultfd is not permitted: vm.unprivileged_userfaultfd=0 without "
                "CAP_SYS_PTRACE, or a seccomp filter)"
              : "");
}

int register_missing(int uffd, std::byte* addr, std::uint64_t bytes) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<std::uintptr_t>(addr);
  reg.range.len = bytes;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  return ::ioctl(uffd, UFFDIO_REGISTER, &reg) == 0 ? 0 : errno;
}

}  // namespace

struct GuardFallback::State {
  Pager* pager = nullptr;
  Backend* backend = nullptr;
  std::byte* base = nullptr;
  std::uint64_t bytes = 0;
  std::uint64_t page_size = 0;
  Options options;
  UniqueFd uffd;
  UniqueFd stop;  // eventfd: written once to end the reader
  bool kernel_faults = false;

  std::mutex mutex;  // guards queue and serving
  std::condition_variable queued;
  std::deque<std::uintptr_t> queue;  // fault addresses, oldest first
  bool serving = true;

  std::atomic<bool> placeholder_failed{false};
  std::thread reader;
  std::thread worker;

  std::byte* page_address(PageId page) const { return base + page * page_size; }

  void wake(std::byte* page) noexcept {
    uffdio_range r{};
    r.start = reinterpret_cast<std::uintptr_t>(page);
    r.len = page_size;
    if (::ioctl(uffd.get(), UFFDIO_WAKE, &r) != 0)
      spdlog::error("guard fault fallback: waking the threads at {} failed: {}",
                    static_cast<void*>(page), std::strerror(errno));
  }

  // Note [Guard fault fallback], failure: the thread retries on PROT_NONE and gets SIGSEGV.
  // Skipped when the page was mapped meanwhile (an acquire on another thread), which would
  // otherwise be made inaccessible under its op; the check and the mprotect are not atomic
  // with respect to such an acquire, a window only a failing access opens.
  void poison(std::byte* page, bool mapped) noexcept {
    if (!mapped) ::mprotect(page, page_size, PROT_NONE);
    wake(page);
  }

  std::string describe(std::uintptr_t address) const {
    const Layout& layout = pager->space().layout();
    const std::uint64_t offset = address - reinterpret_cast<std::uintptr_t>(base);
    const auto& tensors = layout.tensors();
    auto it = std::upper_bound(tensors.begin(), tensors.end(), offset,
                               [](std::uint64_t o, const TensorPlacement& t) { return o < t.offset; });
    std::string what = "page " + std::to_string(offset / page_size);
    if (it != tensors.begin() && !tensors.empty()) {
      const TensorPlacement& t = *std::prev(it);
      what += (offset < t.offset + t.nbytes ? " (tensor '" : " (after tensor '") + t.name +
              "' of " + layout.files()[t.file].string() + ")";
    }
    else if (!options.source.empty())
      what += " of " + options.source;
    return what;
  }

  void serve(std::uintptr_t address) noexcept {
    // What the faulting thread did before its fault happens before this, and what this does
    // before the wake happens before its read goes on: both through the kernel's fault queue
    // (Note [Orderings ThreadSanitizer cannot see]).
    const KernelOrderedAccess unseen;
    const std::uint64_t offset = address - reinterpret_cast<std::uintptr_t>(base);
    const PageId page = static_cast<PageId>(offset / page_size);
    std::byte* at = page_address(page);
    std::string why;
    try {
      if (page >= pager->space().page_count()) {
        why = "the address lies past the last page";
      } else if (pager->fault_in(page, options.patience)) {
        wake(at);
        return;
      } else {
        why = "every page of the budget stayed pinned for " +
              std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                 options.patience).count()) +
              " ms (the reading thread holds them in an op?); raise the budget";
      }
    } catch (const std::exception& e) {
      why = e.what();
    }
    spdlog::error("a read of {} at {} outside a guarded op could not be served: {}; the "
                  "reading thread gets SIGSEGV",
                  describe(address), reinterpret_cast<void*>(address), why);
    bool mapped = false;
    try {
      mapped = page < pager->space().page_count() && pager->is_resident(page);
    } catch (...) {
    }
    poison(at, mapped);
  }

  void run_worker() noexcept {
    std::unique_lock lock(mutex);
    for (;;) {
      queued.wait(lock, [&] { return !serving || !queue.empty(); });
      if (!serving) return;
      const std::uintptr_t address = queue.front();
      queue.pop_front();
      lock.unlock();
      serve(address);
      lock.lock();
    }
  }

  // Should the reader ever stop on an error, an mremap would wait for it forever under the
  // pager's lock: from then on evictions place PROT_NONE memory instead.
  void reader_failed(const char* what) noexcept {
    placeholder_failed.store(true);
    spdlog::error("guard fault fallback: {} failed ({}); from now on a read outside an op of a "
                  "page that is not resident gets SIGSEGV",
                  what, std::strerror(errno));
  }

  void run_reader() noexcept {
    pollfd fds[2] = {{uffd.get(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
    uffd_msg msgs[32];
    for (;;) {
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return reader_failed("polling the userfaultfd");
      }
      if (fds[1].revents != 0) return;
      const ssize_t n = ::read(uffd.get(), msgs, sizeof(msgs));
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        return reader_failed("reading the userfaultfd");
      }
      // Reading a UFFD_EVENT_REMAP message is all it needs: the mremap waiting for it returns.
      std::lock_guard lock(mutex);
      for (std::size_t i = 0; i < static_cast<std::size_t>(n) / sizeof(uffd_msg); ++i) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        const auto address = static_cast<std::uintptr_t>(msgs[i].arg.pagefault.address);
        if (serving) {
          queue.push_back(address);
        } else {
          const std::uint64_t offset = address - reinterpret_cast<std::uintptr_t>(base);
          poison(base + offset / page_size * page_size, false);
        }
      }
      queued.notify_one();
    }
  }

  void stop_worker() noexcept {
    {
      std::lock_guard lock(mutex);
      if (!serving) return;
      serving = false;
      for (std::uintptr_t address : queue) {
        const std::uint64_t offset = address - reinterpret_cast<std::uintptr_t>(base);
        poison(base + offset / page_size * page_size, false);
      }
      queue.clear();
    }
    queued.notify_all();
    if (worker.joinable()) worker.join();
  }
};

std::unique_ptr<GuardFallback> GuardFallback::arm(Pager& pager, Options options,
                                                  std::string& reason) {
  const AddressSpace& space = pager.space();
  auto s = std::make_unique<State>();
  s->pager = &pager;
  s->backend = &space.backend();
  s->base = space.base();
  s->bytes = space.size();
  s->page_size = space.page_size();
  s->options = std::move(options);
  if (!s->backend->capabilities().host_pages) {
    reason = "the " + std::string(s->backend->name()) + " backend's pages are not host pages";
    return nullptr;
  }
  // UFFD_FEATURE_EXACT_ADDRESS only sharpens the tensor named when an access fails; a kernel
  // without it (before 5.18) refuses the handshake, so it is asked for, then done without.
  for (const std::uint64_t features :
       {std::uint64_t{UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EXACT_ADDRESS},
        std::uint64_t{UFFD_FEATURE_EVENT_REMAP}}) {
    OpenedUffd opened = open_uffd();
    if (!opened.fd) {
      reason = why_not("userfaultfd", opened.error);
      return nullptr;
    }
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = features;
    if (::ioctl(opened.fd.get(), UFFDIO_API, &api) == 0) {
      s->uffd = std::move(opened.fd);
      s->kernel_faults = opened.kernel_faults;
      break;
    }
    reason = why_not("userfaultfd with remap events (UFFDIO_API)", errno);
  }
  if (!s->uffd) return nullptr;
  reason.clear();
  // The reservation is still PROT_NONE and holds no mapping: registered first, then opened, so
  // it is never readable unregistered.
  if (const int err = register_missing(s->uffd.get(), s->base, s->bytes); err != 0) {
    reason = why_not("registering the reservation with userfaultfd", err);
    return nullptr;
  }
  if (::mprotect(s->base, s->bytes, PROT_READ | PROT_WRITE) != 0) {
    reason = why_not("opening the registered reservation (mprotect)", errno);
    return nullptr;  // the descriptor closes with s: the range stays PROT_NONE
  }
  s->stop = UniqueFd(LEMA_SYS_TRY(::eventfd(0, EFD_CLOEXEC)));
  State& st = *s;
  st.reader = std::thread([&st] { st.run_reader(); });
  st.worker = std::thread([&st] { st.run_worker(); });
  std::unique_ptr<GuardFallback> fallback(new GuardFallback(std::move(s)));
  if (!st.backend->set_unmapped_pages(fallback.get())) {
    reason = "the " + std::string(st.backend->name()) + " backend keeps its own unmapped pages";
    return nullptr;  // the destructor makes the range PROT_NONE again
  }
  return fallback;
}

GuardFallback::GuardFallback(std::unique_ptr<State> state) : state_(std::move(state)) {}

GuardFallback::~GuardFallback() {
  State& s = *state_;
  s.stop_worker();
  s.backend->set_unmapped_pages(nullptr);
  // Before the descriptor closes and the placeholders become plain memory reading zeros.
  ::mprotect(s.base, s.bytes, PROT_NONE);
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t w = ::write(s.stop.get(), &one, sizeof(one));
  if (s.reader.joinable()) s.reader.join();
}

void GuardFallback::stop_serving() noexcept {
  state_->stop_worker();
}

bool GuardFallback::handles_kernel_faults() const noexcept {
  return state_->kernel_faults;
}

void GuardFallback::place(std::byte* addr, std::uint64_t bytes) {
  State& s = *state_;
  if (!s.placeholder_failed.load(std::memory_order_relaxed)) {
    void* scratch = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    int err = scratch == MAP_FAILED ? errno : 0;
    if (err == 0) err = register_missing(s.uffd.get(), static_cast<std::byte*>(scratch), bytes);
    if (err == 0 && ::mremap(scratch, bytes, bytes, MREMAP_MAYMOVE | MREMAP_FIXED, addr) ==
                        MAP_FAILED)
      err = errno;
    if (err == 0) return;
    if (scratch != MAP_FAILED) ::munmap(scratch, bytes);
    // A failure to build a placeholder (out of VMAs: vm.max_map_count) leaves the page as
    // guard mode without the fallback has it; said once.
    if (!s.placeholder_failed.exchange(true))
      spdlog::error("guard fault fallback: cannot place a registered page at {} ({}); from now "
                    "on evicted pages are PROT_NONE and a read of them outside an op gets "
                    "SIGSEGV",
                    static_cast<void*>(addr), std::strerror(err));
  }
  if (::mmap(addr, bytes, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
             -1, 0) == MAP_FAILED)
    ::lema::detail::throw_system_error(__FILE__, __LINE__, "mmap(PROT_NONE unmap)", errno);
}

}  // namespace lema::runtime::detail
