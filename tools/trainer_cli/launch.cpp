// `lema train --nproc N`: starts N local ranks of this same command, as `torchrun --standalone`
// would, and reports the first one that fails.
//
// Note [Local launcher]
// The launcher picks a free port on the loopback interface (bind to port 0, read it, close; the
// moment between closing and rank 0 binding it is the same race torchrun --standalone accepts),
// then forks and re-executes /proc/self/exe with the same arguments and torchrun's environment
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a rank sees
// WORLD_SIZE and trains instead of launching. SIGINT, SIGTERM and SIGHUP are forwarded to every
// rank, and each rank dies with the launcher (PR_SET_PDEATHSIG). When a rank fails, the others
// notice through their collectives (Note [A rank that fails]); the launcher gives them until
// --dist-timeout and a little more to stop on their own, then kills what is left, and exits
// non-zero naming the first rank that failed and how. A rank that hung rather than failed (the
// others timed out waiting for it) is named instead, with its pid, and killed at once (Note
// [Naming a hung rank] in trainer/src/rank_progress.cpp).
#include "launch.hpp"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/trainer/rank_progress.hpp"

namespace lema::tools {

namespace {

std::vector<std::string> g_argv;
volatile sig_atomic_t g_forward = 0;
pid_t g_children[1024];
volatile sig_atomic_t g_child_count = 0;

void forward_signal(int sig) {
  g_forward = sig;
  for (sig_atomic_t i = 0; i < g_child_count; ++i) {
    if (g_children[i] > 0) ::kill(g_children[i], sig);
  }
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error(fmt::format("--nproc: cannot open a socket ({})", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(fmt::format("--nproc: cannot find a free port on 127.0.0.1 ({})",
                            std::strerror(err)));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) {
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status),
                       ::strsignal(WTERMSIG(status)));
  }
  return fmt::format("exited with status {}", WEXITSTATUS(status));
}

bool failed(int status) { return !WIFEXITED(status) || WEXITSTATUS(status) != 0; }

// Whether the kernel says `pid` is stopped (by SIGSTOP, or a debugger).
bool stopped(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto paren = text.rfind(") ");
  return paren != std::string::npos && paren + 2 < text.size() &&
         (text[paren + 2] == 'T' || text[paren + 2] == 't');
}

struct HungRank {
  int rank;
  pid_t pid;
  double idle_s;
  bool stopped;
};

// The ranks still running that the others waited for (Note [Naming a hung rank]): stopped, or
// behind in collectives and idle for --dist-timeout.
std::vector<HungRank> hung_ranks(const trainer::RankProgressBoard& board,
                                 const std::vector<pid_t>& pids,
                                 std::chrono::milliseconds dist_timeout) {
  std::uint64_t most = 0;
  for (int r = 0; r < static_cast<int>(pids.size()); ++r)
    most = std::max(most, board.read(r).arrivals);
  std::vector<HungRank> hung;
  for (int r = 0; r < static_cast<int>(pids.size()); ++r) {
    const pid_t pid = pids[static_cast<std::size_t>(r)];
    if (pid <= 0) continue;
    const trainer::RankProgressBoard::Record rec = board.read(r);
    const bool is_stopped = stopped(pid);
    if (is_stopped || (rec.arrivals < most && rec.since_last >= dist_timeout))
      hung.push_back({r, pid, std::chrono::duration<double>(rec.since_last).count(), is_stopped});
  }
  return hung;
}

std::string describe_hung(const std::vector<HungRank>& hung, int nproc,
                          std::chrono::milliseconds dist_timeout) {
  std::string who, why;
  for (const HungRank& h : hung) {
    who += fmt::format("{}rank {} (pid {})", who.empty() ? "" : ", ", h.rank, h.pid);
    why += fmt::format("{}{} reached no collective for {:.1f} s{}", why.empty() ? "" : "; ",
                       hung.size() > 1 ? fmt::format("rank {}", h.rank) : std::string("it"),
                       h.idle_s, h.stopped ? " and is stopped by a signal" : "");
  }
  return fmt::format("{} of {} (lema train --nproc {}) hung: {} (--dist-timeout {:g} s)", who,
                     nproc, nproc, why,
                     std::chrono::duration<double>(dist_timeout).count());
}

}  // namespace

void remember_command_line(int argc, char** argv) { g_argv.assign(argv, argv + argc); }

int launch_local_ranks(int nproc, std::chrono::milliseconds dist_timeout) {
  LEMA_EXPECTS(!g_argv.empty(), "the command line was not remembered");
  if (nproc > 1024) throw InvalidArgument(fmt::format("--nproc {} is more than 1024", nproc));
  const int port = free_port();
  struct sigaction action{};
  action.sa_handler = forward_signal;
  ::sigemptyset(&action.sa_mask);
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &action, nullptr);

  const trainer::RankProgressBoard board(nproc);
  const std::string board_fd = board.fd_text();
  const pid_t launcher = ::getpid();
  std::vector<pid_t> pids(static_cast<std::size_t>(nproc), -1);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      forward_signal(SIGTERM);
      throw Error(fmt::format("--nproc: cannot start rank {} ({})", r, std::strerror(errno)));
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) ::_exit(1);  // the launcher died before prctl
      for (const int sig : {SIGINT, SIGTERM, SIGHUP}) ::signal(sig, SIG_DFL);
      const std::string rank = std::to_string(r), world = std::to_string(nproc),
                        port_text = std::to_string(port);
      ::setenv("RANK", rank.c_str(), 1);
      ::setenv("LOCAL_RANK", rank.c_str(), 1);
      ::setenv("WORLD_SIZE", world.c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", world.c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", port_text.c_str(), 1);
      ::setenv("LEMA_RANK_PROGRESS_FD", board_fd.c_str(), 1);
      // c10d logs every broken connection with a stack trace; the ranks' own errors say more.
      ::setenv("TORCH_CPP_LOG_LEVEL", "ERROR", 0);
      std::vector<char*> argv;
      for (auto& a : g_argv) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      std::fprintf(stderr, "error: rank %d: cannot run /proc/self/exe (%s)\n", r,
                   std::strerror(errno));
      ::_exit(127);
    }
    pids[static_cast<std::size_t>(r)] = pid;
    g_children[r] = pid;
    g_child_count = r + 1;
  }

  // Wait for every rank; after the first failure the others get until the deadline to stop.
  int first_failed = -1, first_status = 0, running = nproc;
  std::chrono::steady_clock::time_point deadline{};
  bool killed = false;
  std::vector<HungRank> hung;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0 && errno != EINTR) break;
    if (pid > 0) {
      for (int r = 0; r < nproc; ++r) {
        if (pids[static_cast<std::size_t>(r)] != pid) continue;
        pids[static_cast<std::size_t>(r)] = -1;
        g_children[r] = -1;
        --running;
        if (failed(status) && first_failed < 0) {
          first_failed = r;
          first_status = status;
          deadline = std::chrono::steady_clock::now() + dist_timeout + std::chrono::seconds(10);
          // The others waited for these: they never finish, so no grace.
          hung = hung_ranks(board, pids, dist_timeout);
          for (const HungRank& h : hung) ::kill(h.pid, SIGKILL);
        }
      }
      continue;
    }
    if (first_failed >= 0 && !killed && std::chrono::steady_clock::now() > deadline) {
      for (const pid_t p : pids) {
        if (p > 0) ::kill(p, SIGKILL);
      }
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  g_child_count = 0;
  if (first_failed >= 0 && !hung.empty()) {
    std::fprintf(stderr, "error: %s, so rank %d %s; %s killed%s\n",
                 describe_hung(hung, nproc, dist_timeout).c_str(), first_failed,
                 describe(first_status).c_str(), hung.size() > 1 ? "they were" : "it was",
                 killed ? ", and the ranks still running too" : "");
    return 1;
  }
  if (first_failed >= 0) {
    std::fprintf(stderr, "error: rank %d of %d (lema train --nproc %d) %s%s\n", first_failed,
                 nproc, nproc, describe(first_status).c_str(),
                 killed ? "; the ranks still running were killed" : "");
    return 1;
  }
  if (g_forward != 0) return 128 + g_forward;
  return 0;
}

}  // namespace lema::tools
