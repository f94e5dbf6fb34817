#include "event_ring.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>

#include "settings.hpp"

namespace lema::preload {
namespace {

// The thread's id, asked once per thread. Initial-exec TLS: reading it never calls into the
// dynamic loader (which may allocate), so recording stays free of allocation.
__attribute__((tls_model("initial-exec"))) thread_local std::uint32_t t_thread = 0;

std::uint32_t thread_id() noexcept {
  if (t_thread == 0) t_thread = static_cast<std::uint32_t>(::syscall(SYS_gettid));
  return t_thread;
}

}  // namespace

bool EventRing::init(std::uint64_t capacity) noexcept {
  if (capacity == 0) return true;
  if (capacity > kMaxEvents) {
    errno = EINVAL;
    return false;
  }
  void* p = ::mmap(nullptr, capacity * sizeof(EventRecord), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  records_ = static_cast<EventRecord*>(p);
  capacity_ = capacity;
  return true;
}

void EventRing::record(Call call, Route route, std::uint64_t bytes, const void* address, int result,
                       std::uint8_t flags) noexcept {
  if (!records_) return;
  const std::uint64_t i = next_.fetch_add(1, std::memory_order_relaxed);
  if (i >= capacity_) return;  // dropped: counted by the index (Note [Preload event ring])
  EventRecord& r = records_[i];
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  r.time_ns = static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
              static_cast<std::uint64_t>(ts.tv_nsec);
  r.bytes = bytes;
  r.address = reinterpret_cast<std::uintptr_t>(address);
  r.thread = thread_id();
  r.result = result;
  r.route = static_cast<std::uint8_t>(route);
  r.flags = flags;
  __atomic_store_n(&r.call, static_cast<std::uint8_t>(call), __ATOMIC_RELEASE);
}

}  // namespace lema::preload
