// Completion state of one submitted batch, shared by its ReadTicket and the reader's threads.
//
// Each device piece of the batch reports once through finish_one(); the first error is kept.
// When the last piece reports, the callback runs (once, on the reporting reader thread) and only
// then are waiters woken, so wait() returning implies the callback has returned.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>

namespace lema::io::detail {

struct BatchState {
  using Callback = std::function<void(std::exception_ptr)>;

  BatchState(std::size_t pieces, Callback on_done)
      : outstanding_(pieces), callback_(std::move(on_done)) {}
  BatchState(const BatchState&) = delete;
  BatchState& operator=(const BatchState&) = delete;

  /// One piece finished; `error` is null on success.
  void finish_one(std::exception_ptr error = nullptr);
  /// Completes a batch that has no pieces (an empty batch, or only zero-length requests).
  void finish_empty() { complete(); }

  /// True once some piece failed: the reader may skip the batch's remaining pieces.
  bool failed() const noexcept { return failed_.load(std::memory_order_acquire); }
  /// Blocks until completion; rethrows the first error.
  void wait();
  bool ready() const;

 private:
  void complete();

  mutable std::mutex mutex_;
  std::condition_variable done_cv_;
  std::size_t outstanding_;   // guarded by mutex_
  std::exception_ptr error_;  // guarded by mutex_; immutable once outstanding_ hits 0
  bool done_ = false;         // guarded by mutex_
  std::atomic<bool> failed_{false};
  Callback callback_;  // touched only by the thread that completes the batch
};

}  // namespace lema::io::detail
