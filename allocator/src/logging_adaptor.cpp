#include "lema/allocator/logging_adaptor.hpp"

#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>

#include "lema/base/error.hpp"

namespace lema::allocator {

LoggingAdaptor::LoggingAdaptor(std::unique_ptr<MemoryResource> upstream, const std::string& path)
    : upstream_(std::move(upstream)),
      file_(std::make_unique<std::ofstream>(path, std::ios::out | std::ios::trunc)),
      out_(file_.get()),
      start_(std::chrono::steady_clock::now()) {
  LEMA_EXPECTS(upstream_ != nullptr, "LoggingAdaptor needs an upstream resource, got null");
  if (!*file_) {
    const int err = errno;
    throw SystemError("allocation log '" + path +
                          "' cannot be opened for writing; check that its directory exists and "
                          "is writable",
                      err);
  }
  *out_ << kHeader << '\n' << std::flush;
}

LoggingAdaptor::LoggingAdaptor(std::unique_ptr<MemoryResource> upstream, std::ostream& out)
    : upstream_(std::move(upstream)), out_(&out), start_(std::chrono::steady_clock::now()) {
  LEMA_EXPECTS(upstream_ != nullptr, "LoggingAdaptor needs an upstream resource, got null");
  *out_ << kHeader << '\n' << std::flush;
}

bool LoggingAdaptor::good() const {
  std::lock_guard lock(mutex_);
  return out_->good();
}

// Note [Log order]: an allocate is logged after the upstream returns the block, a free before
// the block goes back to it. While a pointer is logged as live no other thread can be given it,
// so in the file every free follows its allocate and no pointer is allocated twice before being
// freed: the lines are a valid serial order of the calls, which replay relies on.
void* LoggingAdaptor::do_allocate(std::size_t bytes, std::size_t alignment) {
  void* p = upstream_->allocate(bytes, alignment);
  write_line("allocate", p, bytes, alignment);
  return p;
}

void LoggingAdaptor::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept {
  write_line("free", p, bytes, alignment);
  upstream_->deallocate(p, bytes, alignment);
}

void LoggingAdaptor::write_line(const char* action, const void* p, std::size_t bytes,
                                std::size_t alignment) noexcept {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now() - start_)
                      .count();
  // Formatted on the stack: logging a free must not allocate.
  char line[160];
  const int n = std::snprintf(line, sizeof line, "%lld,%ld,%s,0x%" PRIxPTR ",%zu,%zu\n",
                              static_cast<long long>(ns), static_cast<long>(::gettid()), action,
                              reinterpret_cast<std::uintptr_t>(p), bytes, alignment);
  std::lock_guard lock(mutex_);
  try {
    out_->write(line, n);
    out_->flush();  // to the kernel at once: the log survives a crash of this process
  } catch (...) {
    // A stream set to throw: the failure stays visible through good(); the call goes on.
  }
}

}  // namespace lema::allocator
