// The io_uring reader: one ring, owned by one thread that submits pieces and reaps completions.
//
// Note [O_DIRECT reads]
// Each file is opened twice: buffered, and with O_DIRECT where the file system accepts it.
// O_DIRECT needs offset, length and memory aligned to the logical block size (4096 covers every
// common device). A piece whose offset, length and destination are aligned is read straight into
// the destination; any other piece reads the aligned span enclosing it into the bounce buffer of
// its ring slot and copies the wanted bytes out. split_batch() cuts requests whose destination
// shares the offset's alignment at their first and last 4096 boundary, so only the unaligned
// edges of such a request go through a bounce buffer. A read that stops at the end of the file is
// fine while it covers the wanted bytes; one that does not is an unexpected end of file.
#include "detail/reader_impls.hpp"

#ifdef LEMA_HAVE_URING

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

#include "detail/read_piece.hpp"
#include "lema/base/error.hpp"

namespace lema::io::detail {
namespace {

/// Owner of an io_uring instance (not movable: the reader keeps it in place).
class Ring {
 public:
  Ring() = default;
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring() {
    if (live_) io_uring_queue_exit(&ring_);
  }
  /// Returns 0 or -errno.
  int init(unsigned entries) {
    const int r = io_uring_queue_init(entries, &ring_, 0);
    live_ = r == 0;
    return r;
  }
  io_uring* get() noexcept { return &ring_; }

 private:
  io_uring ring_{};
  bool live_ = false;
};

/// Owner of page-aligned memory.
struct AlignedFree {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using AlignedBytes = std::unique_ptr<std::byte, AlignedFree>;

AlignedBytes allocate_aligned(std::size_t bytes) {
  void* p = std::aligned_alloc(kDirectAlign, bytes);
  if (p == nullptr) {
    throw OutOfMemory("cannot allocate " + std::to_string(bytes) +
                      " bytes of bounce buffers for O_DIRECT reads; lower queue_depth or "
                      "request_bytes");
  }
  return AlignedBytes(static_cast<std::byte*>(p));
}

bool aligned(std::uint64_t v) {
  return v % kDirectAlign == 0;
}

constexpr std::uint64_t kWakeTag = ~std::uint64_t{0};  // user_data of the eventfd poll

class UringReader final : public Reader {
 public:
  UringReader(const std::vector<std::filesystem::path>& files, const ReaderOptions& options)
      : files_(files), options_(options) {
    fds_.reserve(files_.size());
    for (const auto& f : files_) {
      fds_.push_back(open_for_read(f));
      stamps_.push_back(stamp_of(fds_.back().get()));
      UniqueFd direct;
      if (options_.direct) {
        // EINVAL: the file system does not do O_DIRECT (tmpfs on older kernels, some FUSE).
        const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd >= 0)
          direct.reset(fd);
        else
          spdlog::debug("{}: no O_DIRECT ({}); reading it buffered", f.string(),
                        std::strerror(errno));
      }
      direct_ok_.push_back(static_cast<bool>(direct));
      any_direct_ = any_direct_ || static_cast<bool>(direct);
      direct_fds_.push_back(std::move(direct));
    }
  }
  UringReader(const UringReader&) = delete;
  UringReader& operator=(const UringReader&) = delete;

  /// Sets up the ring and starts its thread. Returns false with `why` when io_uring is refused.
  bool start(std::string& why) {
    const unsigned depth = options_.queue_depth;
    if (const int r = ring_.init(depth + 1); r < 0) {  // +1: the wake-up poll
      why = std::string("io_uring_queue_init failed: ") + std::strerror(-r) +
            (r == -EPERM || r == -ENOSYS
                 ? " (kernel.io_uring_disabled or a seccomp profile forbids io_uring)"
                 : "");
      return false;
    }
    // Some sandboxes allow setting a ring up but not entering it: try one no-op.
    io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
    io_uring_prep_nop(sqe);
    io_uring_cqe* cqe = nullptr;
    int r = io_uring_submit_and_wait(ring_.get(), 1);
    if (r >= 0) r = io_uring_peek_cqe(ring_.get(), &cqe);
    if (r < 0) {
      why = std::string("io_uring_enter failed: ") + std::strerror(-r);
      return false;
    }
    io_uring_cqe_seen(ring_.get(), cqe);

    slots_.resize(depth);
    for (unsigned i = depth; i-- > 0;) free_slots_.push_back(i);
    if (any_direct_) {
      slot_bytes_ = options_.request_bytes + 2 * kDirectAlign;
      bounce_ = allocate_aligned(slot_bytes_ * depth);
      std::vector<iovec> iov(depth);
      for (unsigned i = 0; i < depth; ++i) iov[i] = {bounce(i), slot_bytes_};
      // Registered buffers spare the kernel pinning them per read; RLIMIT_MEMLOCK may refuse.
      const int rr = io_uring_register_buffers(ring_.get(), iov.data(), depth);
      fixed_buffers_ = rr == 0;
      if (rr < 0) spdlog::debug("io_uring_register_buffers: {}", std::strerror(-rr));
    }
    const int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) throw SystemError(std::string("eventfd failed: ") + std::strerror(errno), errno);
    wake_fd_.reset(efd);
    thread_ = std::thread([this] { run(); });
    return true;
  }

  ~UringReader() override {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake();
    thread_.join();  // the thread finishes every queued and in-flight piece first
  }

  ReadTicket submit(std::vector<ReadRequest> batch, Callback on_done) override {
    SplitBatch split =
        split_batch(batch, files_.size(), options_.request_bytes, any_direct_, std::move(on_done));
    counters_.batches.fetch_add(1, std::memory_order_relaxed);
    counters_.requests.fetch_add(split.pieces.size(), std::memory_order_relaxed);
    if (!split.pieces.empty()) {
      {
        std::lock_guard lock(mutex_);
        for (auto& p : split.pieces) incoming_.push_back(std::move(p));
      }
      wake();
    }
    return ReadTicket(std::move(split.state));
  }

  std::string path_name() const override { return any_direct_ ? "io_uring+O_DIRECT" : "io_uring"; }
  ReaderStats stats() const override { return counters_.snapshot(); }
  int cached_read_fd(std::uint32_t file) const noexcept override {
    return options_.fault_injector || file >= fds_.size() ? -1 : fds_[file].get();
  }
  const std::vector<std::filesystem::path>& files() const override { return files_; }

 private:
  enum class Mode { buffered, direct, bounce };

  // A ring slot: one piece in flight, and the bounce buffer of the same index.
  struct Slot {
    ReadPiece piece;
    Mode mode = Mode::buffered;
    std::uint64_t head = 0;  // bounce: bytes of the aligned span before the wanted offset
    std::optional<long> injected;
  };

  std::byte* bounce(unsigned slot) { return bounce_.get() + std::size_t{slot} * slot_bytes_; }

  void wake() {
    const std::uint64_t one = 1;
    // Cannot fail short of a bad descriptor; an overflowing counter still wakes the ring thread.
    [[maybe_unused]] auto r = ::write(wake_fd_.get(), &one, sizeof one);
  }

  // ---- everything below runs on the ring thread ----

  void run() {
    bool wake_armed = false;
    for (;;) {
      bool stopping;
      {
        std::lock_guard lock(mutex_);
        stopping = stopping_;
        while (!incoming_.empty()) {
          pending_.push_back(std::move(incoming_.front()));
          incoming_.pop_front();
        }
      }
      while (!free_slots_.empty() && !pending_.empty()) {
        ReadPiece piece = std::move(pending_.front());
        pending_.pop_front();
        if (piece.batch->failed()) {  // not worth reading: the batch already failed
          piece.batch->finish_one();
          continue;
        }
        const unsigned slot = free_slots_.back();
        free_slots_.pop_back();
        issue(slot, std::move(piece));
      }
      if (stopping && pending_.empty() && free_slots_.size() == slots_.size()) break;
      if (!wake_armed && !stopping) {
        io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
        io_uring_prep_poll_add(sqe, wake_fd_.get(), POLLIN);
        io_uring_sqe_set_data64(sqe, kWakeTag);
        wake_armed = true;
      }
      const int r = io_uring_submit_and_wait(ring_.get(), 1);
      if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
        spdlog::error("io_uring_submit_and_wait failed: {}", std::strerror(-r));
      }
      io_uring_cqe* cqe;
      unsigned head;
      unsigned seen = 0;
      io_uring_for_each_cqe(ring_.get(), head, cqe) {
        ++seen;
        const std::uint64_t tag = io_uring_cqe_get_data64(cqe);
        if (tag == kWakeTag) {
          std::uint64_t count;
          [[maybe_unused]] auto n = ::read(wake_fd_.get(), &count, sizeof count);
          wake_armed = false;
        } else {
          complete(static_cast<unsigned>(tag), cqe->res);
        }
      }
      io_uring_cq_advance(ring_.get(), seen);
    }
    // An armed wake-up poll left behind is cancelled by io_uring_queue_exit; it owns no memory.
  }

  // Starts the device read of what is left of the piece in `slot`.
  void issue(unsigned slot_index, ReadPiece piece) {
    Slot& slot = slots_[slot_index];
    slot.piece = std::move(piece);
    ReadPiece& p = slot.piece;
    const std::uint64_t offset = p.offset + p.done;
    const std::uint64_t length = p.length - p.done;
    std::byte* dest = p.dest + p.done;
    slot.injected.reset();
    if (options_.fault_injector)
      slot.injected = options_.fault_injector->inject(p.file, offset, length);

    io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());  // never null: depth + 1 entries
    if (slot.injected && *slot.injected < 0) {
      io_uring_prep_nop(sqe);  // the injected error replaces the read
    } else if (!direct_ok_[p.file]) {
      slot.mode = Mode::buffered;
      io_uring_prep_read(sqe, fds_[p.file].get(), dest, static_cast<unsigned>(length), offset);
      // Inline buffered reads of a cold file crawl along at the readahead window (about 5x
      // slower than pread threads, measured); io-wq workers read and copy in parallel.
      sqe->flags |= IOSQE_ASYNC;
    } else if (aligned(offset) && aligned(length) &&
               aligned(reinterpret_cast<std::uintptr_t>(dest))) {
      slot.mode = Mode::direct;
      io_uring_prep_read(sqe, direct_fds_[p.file].get(), dest, static_cast<unsigned>(length),
                         offset);
    } else {
      // See Note [O_DIRECT reads].
      slot.mode = Mode::bounce;
      const std::uint64_t start = offset / kDirectAlign * kDirectAlign;
      const std::uint64_t end = (offset + length + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
      slot.head = offset - start;
      const int fd = direct_fds_[p.file].get();
      const auto span = static_cast<unsigned>(end - start);
      if (fixed_buffers_) {
        io_uring_prep_read_fixed(sqe, fd, bounce(slot_index), span, start,
                                 static_cast<int>(slot_index));
      } else {
        io_uring_prep_read(sqe, fd, bounce(slot_index), span, start);
      }
    }
    io_uring_sqe_set_data64(sqe, slot_index);
  }

  void complete(unsigned slot_index, int res) {
    Slot& slot = slots_[slot_index];
    ReadPiece& p = slot.piece;
    const std::uint64_t offset = p.offset + p.done;
    const std::uint64_t length = p.length - p.done;
    if (slot.injected) {
      if (*slot.injected < 0) {
        res = static_cast<int>(*slot.injected);
      } else if (res >= 0) {
        const long cap =
            *slot.injected + (slot.mode == Mode::bounce ? static_cast<long>(slot.head) : 0);
        res = static_cast<int>(std::min<long>(res, cap));
      }
    }
    if (res == -EAGAIN || res == -EINTR) {
      if (p.retries < kMaxRetries) {
        ++p.retries;
        counters_.retries.fetch_add(1, std::memory_order_relaxed);
        requeue(slot_index);
        return;
      }
      fail(slot_index, ReadError(name(p), offset, length, -res,
                                 changed_detail(p, false, "still failing after many retries")));
      return;
    }
    if (res == -EINVAL && slot.mode != Mode::buffered) {
      // The device wants a larger alignment than 4096 (or no O_DIRECT after all): go buffered.
      spdlog::warn("{}: O_DIRECT read refused (EINVAL); reading this file buffered", name(p));
      direct_ok_[p.file] = false;
      requeue(slot_index);
      return;
    }
    if (res < 0) {
      fail(slot_index,
           ReadError(name(p), offset, length, -res,
                     changed_detail(p, false, slot.mode == Mode::buffered ? "" : "O_DIRECT read")));
      return;
    }
    std::uint64_t got = static_cast<std::uint64_t>(res);
    if (slot.mode == Mode::bounce) {
      got = got > slot.head ? std::min(got - slot.head, length) : 0;
      std::memcpy(p.dest + p.done, bounce(slot_index) + slot.head, got);
    }
    if (got == 0) {
      fail(slot_index, ReadError(name(p), offset, length, 0, changed_detail(p, true, "")));
      return;
    }
    p.retries = 0;
    p.done += got;
    if (slot.mode != Mode::buffered) p.direct += got;
    if (p.done < p.length) {
      counters_.short_reads.fetch_add(1, std::memory_order_relaxed);
      requeue(slot_index);
      return;
    }
    counters_.bytes.fetch_add(p.length, std::memory_order_relaxed);
    counters_.direct_bytes.fetch_add(p.direct, std::memory_order_relaxed);
    std::shared_ptr<BatchState> batch = std::move(p.batch);
    release(slot_index);
    batch->finish_one();
  }

  // The rest of the piece goes first in line again.
  void requeue(unsigned slot_index) {
    pending_.push_front(std::move(slots_[slot_index].piece));
    release(slot_index);
  }

  void fail(unsigned slot_index, const ReadError& error) {
    counters_.errors.fetch_add(1, std::memory_order_relaxed);
    std::shared_ptr<BatchState> batch = std::move(slots_[slot_index].piece.batch);
    release(slot_index);
    batch->finish_one(std::make_exception_ptr(error));
  }

  void release(unsigned slot_index) {
    slots_[slot_index].piece = ReadPiece{};
    free_slots_.push_back(slot_index);
  }

  std::string name(const ReadPiece& p) const { return files_[p.file].string(); }
  std::string changed_detail(const ReadPiece& p, bool end_of_file,
                             const std::string& detail) const {
    return read_error_detail(fds_[p.file].get(), stamps_[p.file], end_of_file, detail);
  }

  // Declaration order is teardown order reversed: the ring goes before the buffers and files.
  std::vector<std::filesystem::path> files_;
  ReaderOptions options_;
  std::vector<UniqueFd> fds_;         // buffered
  std::vector<FileStamp> stamps_;     // the files as opened
  std::vector<UniqueFd> direct_fds_;  // O_DIRECT, or empty where refused
  bool any_direct_ = false;
  AlignedBytes bounce_;
  std::size_t slot_bytes_ = 0;
  bool fixed_buffers_ = false;
  UniqueFd wake_fd_;
  Ring ring_;
  StatsCounters counters_;

  std::mutex mutex_;  // guards incoming_ and stopping_
  std::deque<ReadPiece> incoming_;
  bool stopping_ = false;

  // Ring thread only.
  std::vector<bool> direct_ok_;
  std::vector<Slot> slots_;
  std::vector<unsigned> free_slots_;
  std::deque<ReadPiece> pending_;

  std::thread thread_;
};

}  // namespace

std::unique_ptr<Reader> make_uring_reader(const std::vector<std::filesystem::path>& files,
                                          const ReaderOptions& options, std::string& why) {
  auto reader = std::make_unique<UringReader>(files, options);
  if (!reader->start(why)) return nullptr;
  return reader;
}

}  // namespace lema::io::detail

#else  // !LEMA_HAVE_URING

namespace lema::io::detail {

std::unique_ptr<Reader> make_uring_reader(const std::vector<std::filesystem::path>&,
                                          const ReaderOptions&, std::string& why) {
  why = "this build has no io_uring support (liburing was not found when it was configured)";
  return nullptr;
}

}  // namespace lema::io::detail

#endif
