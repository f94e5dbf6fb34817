// The pread fallback: a small pool of threads taking pieces from one queue.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "detail/read_piece.hpp"
#include "detail/reader_impls.hpp"

namespace lema::io::detail {
namespace {

class PreadReader final : public Reader {
 public:
  PreadReader(std::vector<std::filesystem::path> files, const ReaderOptions& options)
      : files_(std::move(files)), options_(options) {
    fds_.reserve(files_.size());
    for (const auto& f : files_) {
      fds_.push_back(open_for_read(f));
      stamps_.push_back(stamp_of(fds_.back().get()));
    }
    try {
      for (unsigned i = 0; i < options_.threads; ++i) threads_.emplace_back([this] { work(); });
    } catch (...) {
      stop();
      throw;
    }
  }
  PreadReader(const PreadReader&) = delete;
  PreadReader& operator=(const PreadReader&) = delete;
  ~PreadReader() override { stop(); }

  ReadTicket submit(std::vector<ReadRequest> batch, Callback on_done) override {
    SplitBatch split = split_batch(batch, files_.size(), options_.request_bytes,
                                   /*direct_cuts=*/false, std::move(on_done));
    counters_.batches.fetch_add(1, std::memory_order_relaxed);
    counters_.requests.fetch_add(split.pieces.size(), std::memory_order_relaxed);
    if (!split.pieces.empty()) {
      {
        std::lock_guard lock(mutex_);
        for (auto& p : split.pieces) queue_.push_back(std::move(p));
      }
      work_cv_.notify_all();
    }
    return ReadTicket(std::move(split.state));
  }

  std::string path_name() const override { return "pread"; }
  ReaderStats stats() const override { return counters_.snapshot(); }
  int cached_read_fd(std::uint32_t file) const noexcept override {
    return options_.fault_injector || file >= fds_.size() ? -1 : fds_[file].get();
  }
  const std::vector<std::filesystem::path>& files() const override { return files_; }

 private:
  // Finishes the queued pieces, then ends the threads.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  void work() {
    for (;;) {
      ReadPiece piece;
      {
        std::unique_lock lock(mutex_);
        work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        piece = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr error;
      if (!piece.batch->failed()) {  // a failed batch's other pieces are not worth reading
        try {
          read(piece);
          counters_.bytes.fetch_add(piece.length, std::memory_order_relaxed);
        } catch (...) {
          counters_.errors.fetch_add(1, std::memory_order_relaxed);
          error = std::current_exception();
        }
      }
      piece.batch->finish_one(std::move(error));
    }
  }

  // Reads the whole piece or throws ReadError.
  void read(ReadPiece& p) {
    const int fd = fds_[p.file].get();
    FaultInjector* injector = options_.fault_injector.get();
    while (p.done < p.length) {
      const std::uint64_t offset = p.offset + p.done;
      const std::uint64_t length = p.length - p.done;
      std::optional<long> injected;
      if (injector) injected = injector->inject(p.file, offset, length);
      long n;
      int err = 0;
      if (injected && *injected < 0) {
        n = -1;
        err = static_cast<int>(-*injected);
      } else {
        n = ::pread(fd, p.dest + p.done, length, static_cast<off_t>(offset));
        if (n < 0) err = errno;
        if (n > 0 && injected) n = std::min(n, *injected);
      }
      if (n < 0) {
        if ((err == EINTR || err == EAGAIN) && p.retries < kMaxRetries) {
          ++p.retries;
          counters_.retries.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        throw ReadError(
            files_[p.file].string(), offset, length, err,
            read_error_detail(fd, stamps_[p.file], false,
                              p.retries >= kMaxRetries ? "still failing after many retries" : ""));
      }
      if (n == 0) {
        throw ReadError(files_[p.file].string(), offset, length, 0,
                        read_error_detail(fd, stamps_[p.file], true, ""));
      }
      p.retries = 0;
      p.done += static_cast<std::uint64_t>(n);
      if (p.done < p.length) counters_.short_reads.fetch_add(1, std::memory_order_relaxed);
    }
  }

  std::vector<std::filesystem::path> files_;
  std::vector<UniqueFd> fds_;
  std::vector<FileStamp> stamps_;  // the files as opened
  ReaderOptions options_;
  StatsCounters counters_;

  std::mutex mutex_;  // guards queue_ and stopping_
  std::condition_variable work_cv_;
  std::deque<ReadPiece> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace

std::unique_ptr<Reader> make_pread_reader(std::vector<std::filesystem::path> files,
                                          const ReaderOptions& options) {
  return std::make_unique<PreadReader>(std::move(files), options);
}

}  // namespace lema::io::detail
