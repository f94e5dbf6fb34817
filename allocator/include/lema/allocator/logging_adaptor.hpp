// LoggingAdaptor: writes one CSV line for every allocate and deallocate that passes through it to
// its upstream, for replay (allocation_log.hpp reads the file back and replays it).
//
// Columns (the first line is this header):
//   time_ns,thread,action,pointer,bytes,alignment
//   time_ns    nanoseconds since the adaptor was made (steady clock)
//   thread     the calling thread's kernel id (gettid)
//   action     allocate | free
//   pointer    the block's address, 0x-prefixed hex
// A failed allocate and allocate(0) write nothing. The log is a valid serialization of the calls
// even under concurrency (Note [Log order]).
//
// Every line is flushed to the file (or stream) before the call returns, so the log of a process
// that crashes ends with its last completed call. A write that fails does not fail the
// allocation (memory the caller got must not leak because a log disk filled up): the stream's
// state shows it, and good() reports it.
// Owns its upstream (Note [Adaptors own their upstream]).
// Thread safety: fully thread-safe; one mutex orders the lines, held only while one is written.
#pragma once

#include <chrono>
#include <fstream>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>

#include "lema/allocator/memory_resource.hpp"

namespace lema::allocator {

class LoggingAdaptor final : public MemoryResource {
 public:
  /// Logs to a file made (or truncated) at `path`; throws lema::SystemError naming the path when
  /// it cannot be opened, lema::InvalidArgument for a null upstream.
  LoggingAdaptor(std::unique_ptr<MemoryResource> upstream, const std::string& path);
  /// Logs to `out`, which must outlive the adaptor.
  LoggingAdaptor(std::unique_ptr<MemoryResource> upstream, std::ostream& out);

  /// False once a line could not be written.
  bool good() const;
  MemoryResource& upstream() const noexcept { return *upstream_; }

  static constexpr const char* kHeader = "time_ns,thread,action,pointer,bytes,alignment";

 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override;
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) noexcept override;
  void write_line(const char* action, const void* p, std::size_t bytes,
                  std::size_t alignment) noexcept;

  std::unique_ptr<MemoryResource> upstream_;
  std::unique_ptr<std::ofstream> file_;  // set when logging to a path
  std::ostream* out_;                    // file_ or the caller's stream
  const std::chrono::steady_clock::time_point start_;
  mutable std::mutex mutex_;  // orders lines; guards *out_
};

}  // namespace lema::allocator
