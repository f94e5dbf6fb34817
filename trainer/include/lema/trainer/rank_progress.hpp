// How far each local rank of `lema train --nproc N` got: a record per rank in a memory file the
// launcher makes and the ranks inherit (LEMA_RANK_PROGRESS_FD), so the launcher can tell which
// rank hung when another one timed out waiting for it (Note [Naming a hung rank]).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace lema::trainer {

/// A rank reached a collective (an all-reduce, a broadcast, a barrier): its count goes up and
/// its time is now. Does nothing outside `lema train --nproc` (no LEMA_RANK_PROGRESS_FD).
/// Thread-safe, lock-free, never throws.
void note_rank_arrival(int rank) noexcept;

/// The launcher's side: the shared records of `ranks` ranks.
class RankProgressBoard {
 public:
  /// Creates the memory file (inherited by children, across exec). Throws Error on failure.
  explicit RankProgressBoard(int ranks);
  ~RankProgressBoard();
  RankProgressBoard(const RankProgressBoard&) = delete;
  RankProgressBoard& operator=(const RankProgressBoard&) = delete;

  /// The value of LEMA_RANK_PROGRESS_FD for the ranks.
  std::string fd_text() const;

  struct Record {
    std::uint64_t arrivals = 0;  // collectives reached
    std::chrono::steady_clock::duration since_last{};  // since the last one (or the start)
  };
  Record read(int rank) const;

 private:
  int fd_ = -1;
  int ranks_ = 0;
  void* map_ = nullptr;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace lema::trainer
