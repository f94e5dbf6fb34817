// Reads byte ranges of checkpoint files into memory, asynchronously, in batches.
//
// Two implementations behind one interface:
//  - io_uring (liburing): O_DIRECT where the file system allows it, several 1–4 MiB requests in
//    flight, short reads resubmitted, EAGAIN/EINTR retried;
//  - pread on a small thread pool: the fallback when io_uring is refused (EPERM/ENOSYS, e.g. a
//    container's seccomp profile).
// Reader::open picks automatically; LEMA_IO=uring|pread (or ReaderOptions::kind) overrides.
// The path that runs is logged once and reported by path_name() and stats().
//
// Thread safety: submit(), read() and stats() may be called from any thread concurrently.
// Completion callbacks run on one of the reader's own threads and must not block on the reader.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lema/io/errors.hpp"

namespace lema::io {

class Checkpoint;

struct ReadRequest {
  std::uint32_t file = 0;    // index into the reader's file list (= Checkpoint::files())
  std::uint64_t offset = 0;  // absolute offset in the file
  std::uint64_t length = 0;
  std::byte* dest = nullptr;  // any alignment; length bytes writable
};

enum class IoKind { automatic, uring, pread };

/// Test seam: lets tests make device requests fail or come back short, on either path.
/// Called on a reader thread before each device request (one read syscall or io_uring read of
/// `length` bytes at `offset` of file `file`); must be thread-safe. Returning std::nullopt lets
/// the request run normally. Otherwise the value replaces the request's result: -EIO (or any
/// negative errno), -EAGAIN / -EINTR (retried), or a byte count N with 0 < N < length, in which
/// case the read is really performed but only its first N bytes count as arrived, so the reader
/// must fetch the remainder itself.
struct FaultInjector {
  virtual ~FaultInjector() = default;
  virtual std::optional<long> inject(std::uint32_t file, std::uint64_t offset,
                                     std::uint64_t length) = 0;
};

struct ReaderOptions {
  IoKind kind = IoKind::automatic;  // automatic honours LEMA_IO
  bool direct = true;               // use O_DIRECT where the file system accepts it
  unsigned queue_depth = 8;         // io_uring requests in flight (1–1024)
  // Large reads are split into requests of this size: a multiple of 4096, 4 KiB–64 MiB.
  std::uint64_t request_bytes = 2u << 20;
  unsigned threads = 4;                           // pread worker threads (1–256)
  std::shared_ptr<FaultInjector> fault_injector;  // tests only; null in production
};

struct ReaderStats {
  std::uint64_t batches = 0;
  std::uint64_t requests = 0;      // device requests issued (after splitting)
  std::uint64_t bytes = 0;         // bytes delivered to callers
  std::uint64_t direct_bytes = 0;  // of which read with O_DIRECT
  std::uint64_t short_reads = 0;   // resubmitted partial reads
  std::uint64_t retries = 0;       // EAGAIN/EINTR retries
  std::uint64_t errors = 0;
};

namespace detail {
struct BatchState;
}

/// Handle on a submitted batch.
class ReadTicket {
 public:
  ReadTicket() = default;
  explicit ReadTicket(std::shared_ptr<detail::BatchState> s) : state_(std::move(s)) {}
  /// Blocks until every request of the batch completed; rethrows its first error (ReadError).
  void wait() const;
  /// True once the batch completed (successfully or not). Never blocks.
  bool ready() const;
  /// False for a default-constructed ticket (nothing was submitted).
  bool valid() const noexcept { return state_ != nullptr; }

 private:
  std::shared_ptr<detail::BatchState> state_;
};

class Reader {
 public:
  /// Called once per batch when it completes: nullptr on success, else the ReadError.
  using Callback = std::function<void(std::exception_ptr)>;

  /// Opens the files read-only and chooses the io path. Throws SystemError / ReadError when a
  /// file cannot be opened.
  static std::unique_ptr<Reader> open(std::vector<std::filesystem::path> files,
                                      ReaderOptions options = {});
  static std::unique_ptr<Reader> open(const Checkpoint& checkpoint, ReaderOptions options = {});

  virtual ~Reader() = default;

  /// Queues a batch and returns at once. Requests of a batch may complete in any order.
  virtual ReadTicket submit(std::vector<ReadRequest> batch, Callback on_done = {}) = 0;
  /// submit() + wait().
  void read(std::vector<ReadRequest> batch) { submit(std::move(batch)).wait(); }

  /// Reads on the calling thread what of `batch` the page cache already holds (preadv2 with
  /// RWF_NOWAIT: it never waits for the disk and hands nothing to the reader's threads) and
  /// returns the requests, or their remainders, still to be read: submit those. For a caller
  /// that waits for the bytes anyway (a demand fault), this saves two thread hand-offs when the
  /// data is cached. Returns `batch` unchanged where it cannot help (a fault injector is
  /// installed, the kernel or file system refuses RWF_NOWAIT). Never throws for IO errors: a
  /// failing range is left for submit() to report.
  std::vector<ReadRequest> read_cached(std::vector<ReadRequest> batch);
  /// Bytes read_cached() delivered.
  std::uint64_t cached_bytes() const noexcept {
    return cached_bytes_.load(std::memory_order_relaxed);
  }

  /// "io_uring+O_DIRECT", "io_uring" (buffered) or "pread".
  virtual std::string path_name() const = 0;
  virtual ReaderStats stats() const = 0;
  /// The files, in index order.
  virtual const std::vector<std::filesystem::path>& files() const = 0;

 protected:
  /// A buffered descriptor of `file` for read_cached(), or -1 to disable it.
  virtual int cached_read_fd(std::uint32_t file) const noexcept = 0;

 private:
  std::atomic<bool> nowait_refused_{false};
  std::atomic<std::uint64_t> cached_bytes_{0};
};

}  // namespace lema::io
