// Note [Naming a hung rank]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// A rank that hangs (stopped by a signal, stuck in a read) neither exits nor closes its
// connections: the others wait in their next collective until --dist-timeout and fail, and the
// launcher only sees them fail. To name the culprit, each rank counts the collectives it reached
// in a record of a memory file that the launcher creates before forking (memfd, inherited across
// exec, named to the ranks by LEMA_RANK_PROGRESS_FD), with the steady clock's time of the last
// one. When a rank fails, the launcher looks for ranks still running that reached fewer
// collectives than the most any rank did and reached none for --dist-timeout: those are the
// ones the others waited for. It names them (rank and pid, and whether the kernel says the
// process is stopped) and kills them at once instead of after its grace: by the ranks' own
// definition (--dist-timeout) they hung, and a peer is gone, so they can never finish. A count,
// not a step number: a rank that hung in the middle of a step's backward pass has done the same
// steps as the one waiting in that step's all-reduce, but one collective fewer. The records are
// written with relaxed atomics: the launcher needs a recent value, not an ordered one. A memory
// file, not the rendezvous store: the store is served by rank 0, which may be the one that hung.
#include "lema/trainer/rank_progress.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include <spdlog/fmt/fmt.h>

#include "lema/base/error.hpp"

namespace lema::trainer {
namespace {

struct alignas(64) Slot {
  std::atomic<std::uint64_t> arrivals;
  std::atomic<std::int64_t> last_ns;  // steady clock; 0: none yet
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The ranks' view of the board: mapped on first use, for the life of the process.
Slot* rank_board(int rank) {
  static Slot* board = [] () -> Slot* {
    const char* text = std::getenv("LEMA_RANK_PROGRESS_FD");
    const char* world = std::getenv("LOCAL_WORLD_SIZE");
    if (text == nullptr || world == nullptr) return nullptr;
    char* end = nullptr;
    const long fd = std::strtol(text, &end, 10);
    if (*end != 0 || fd < 0) return nullptr;
    const long n = std::strtol(world, &end, 10);
    if (*end != 0 || n <= 0 || n > 1024) return nullptr;
    // Only the launcher's memory file: a number inherited by some other route is left alone.
    char target[128] = {};
    const std::string link = "/proc/self/fd/" + std::to_string(fd);
    if (::readlink(link.c_str(), target, sizeof target - 1) < 0 ||
        std::strncmp(target, "/memfd:lema-rank-progress", 25) != 0)
      return nullptr;
    void* p = ::mmap(nullptr, static_cast<std::size_t>(n) * sizeof(Slot),
                     PROT_READ | PROT_WRITE, MAP_SHARED, static_cast<int>(fd), 0);
    ::close(static_cast<int>(fd));  // the mapping stays; nothing the rank starts inherits it
    return p == MAP_FAILED ? nullptr : static_cast<Slot*>(p);
  }();
  const char* world = std::getenv("LOCAL_WORLD_SIZE");
  if (board == nullptr || world == nullptr || rank < 0 || rank >= std::atoi(world))
    return nullptr;
  return board + rank;
}

}  // namespace

void note_rank_arrival(int rank) noexcept {
  Slot* s = rank_board(rank);
  if (s == nullptr) return;
  s->arrivals.fetch_add(1, std::memory_order_relaxed);
  s->last_ns.store(now_ns(), std::memory_order_relaxed);
}

RankProgressBoard::RankProgressBoard(int ranks)
    : ranks_(ranks), start_(std::chrono::steady_clock::now()) {
  fd_ = ::memfd_create("lema-rank-progress", 0);  // no CLOEXEC: the ranks inherit it
  const std::size_t bytes = static_cast<std::size_t>(ranks) * sizeof(Slot);
  if (fd_ < 0 || ::ftruncate(fd_, static_cast<off_t>(bytes)) != 0)
    throw Error(fmt::format("--nproc: cannot create the ranks' progress records ({})",
                            std::strerror(errno)));
  map_ = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(fmt::format("--nproc: cannot map the ranks' progress records ({})",
                            std::strerror(errno)));
  }
}

RankProgressBoard::~RankProgressBoard() {
  if (map_ != nullptr) ::munmap(map_, static_cast<std::size_t>(ranks_) * sizeof(Slot));
  if (fd_ >= 0) ::close(fd_);
}

std::string RankProgressBoard::fd_text() const { return std::to_string(fd_); }

RankProgressBoard::Record RankProgressBoard::read(int rank) const {
  const Slot& s = static_cast<const Slot*>(map_)[rank];
  Record r;
  r.arrivals = s.arrivals.load(std::memory_order_relaxed);
  const std::int64_t last = s.last_ns.load(std::memory_order_relaxed);
  const auto now = std::chrono::steady_clock::now();
  r.since_last = last == 0 ? now - start_
                           : now.time_since_epoch() - std::chrono::nanoseconds(last);
  return r;
}

}  // namespace lema::trainer
