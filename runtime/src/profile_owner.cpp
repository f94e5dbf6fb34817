// Who owns a profile segment, and removing the segments of owners that are gone.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "lema/runtime/profile.hpp"
#include "profile_shm.hpp"

namespace lema::runtime {

// Note [Segment owners]: a process removes its segment when it exits, but one killed by SIGKILL
// (or the OOM killer) cannot, and a segment lives in /dev/shm until reboot. So whoever creates a
// segment or scans for them (`lema prof top`, `lema prof record`) first removes those whose
// owner is gone. The pid alone cannot tell: pids are reused, and a zombie still answers
// kill(pid, 0). The header records the owner's start time (field 22 of /proc/PID/stat), which
// with the pid names one process for the life of the system; a segment is the owner's while
// /proc/PID/stat exists, is not a zombie's, and shows that start time. Only names LEMA makes
// ("lema-prof-<digits>", "lema-init-<digits>-…") are candidates, and a segment whose recorder
// still runs is left to the recorder, which reads it once more after the owner is gone.
// Processes in another pid namespace that share /dev/shm would look gone: profiling across pid
// namespaces is not supported.

namespace profile_shm {
namespace {

struct ProcStat {
  char state = 0;
  std::uint64_t start_ticks = 0;
};

/// /proc/PID/stat's state and start time; nullopt when the process does not exist.
std::optional<ProcStat> read_stat(std::uint64_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  if (!f) return std::nullopt;
  std::string line;
  std::getline(f, line);
  // The command (field 2) is in parentheses and may hold spaces or ')': fields 3… follow the
  // last ')'.
  const std::size_t close = line.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream rest(line.substr(close + 1));
  ProcStat st;
  std::string field;
  rest >> st.state;
  for (int i = 4; i <= 22 && rest >> field; ++i)
    if (i == 22) std::from_chars(field.data(), field.data() + field.size(), st.start_ticks);
  return st;
}

bool proc_mounted() {
  static const bool mounted = ::access("/proc/self/stat", R_OK) == 0;
  return mounted;
}

/// The pid in "<prefix><digits>" (`dash_after`: "<prefix><digits>-<anything>"); 0 for any
/// other name.
std::uint64_t pid_in(std::string_view name, std::string_view prefix, bool dash_after) {
  if (!name.starts_with(prefix)) return 0;
  name.remove_prefix(prefix.size());
  std::uint64_t pid = 0;
  auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), pid);
  if (ec != std::errc() || end == name.data() || name.front() == '+') return 0;
  const std::string_view rest(end, static_cast<std::size_t>(name.data() + name.size() - end));
  if (dash_after ? !rest.starts_with('-') : !rest.empty()) return 0;
  return pid;
}

struct Owner {
  std::uint64_t pid, recorder_pid, start_ticks;
};

/// The owner fields of segment `name`'s header, read without mapping the rest; nullopt when it
/// cannot be read (gone, another user's, shorter than a header) or is not a profile segment.
std::optional<Owner> read_owner(const std::string& name) {
  const int fd = ::shm_open(("/" + name).c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) < sizeof(Header)) {
    ::close(fd);
    return std::nullopt;
  }
  void* p = ::mmap(nullptr, sizeof(Header), PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) return std::nullopt;
  const auto* h = static_cast<const Header*>(p);
  std::optional<Owner> out;
  if (std::memcmp(h->magic, kMagic, sizeof(kMagic)) == 0)
    out = Owner{h->pid, h->recorder_pid, h->start_ticks};
  ::munmap(p, sizeof(Header));
  return out;
}

}  // namespace

std::uint64_t process_start_ticks(std::uint64_t pid) {
  const auto st = read_stat(pid);
  return st ? st->start_ticks : 0;
}

bool process_running(std::uint64_t pid, std::uint64_t start_ticks) {
  if (pid == 0 || pid > static_cast<std::uint64_t>(std::numeric_limits<pid_t>::max())) return false;
  if (!proc_mounted()) return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
  const auto st = read_stat(pid);
  if (!st) return false;
  if (st->state == 'Z' || st->state == 'X') return false;
  return start_ticks == 0 || st->start_ticks == start_ticks;
}

}  // namespace profile_shm

std::vector<std::string> ProfileSegment::remove_orphans() noexcept {
  using namespace profile_shm;
  std::vector<std::string> removed;
  try {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(kShmDirectory, ec)) {
      const std::string name = entry.path().filename().string();
      bool gone = false;
      if (const std::uint64_t pid = pid_in(name, "lema-prof-", false); pid != 0) {
        const auto h = read_owner(name);
        if (!h) continue;  // not ours to judge: another user's, or not a profile segment
        const std::uint64_t start = h->pid == pid ? h->start_ticks : 0;
        gone = !process_running(pid, start) &&
               (h->recorder_pid == 0 || !process_running(h->recorder_pid, 0));
      } else if (const std::uint64_t maker = pid_in(name, "lema-init-", true); maker != 0) {
        gone = !process_running(maker, 0);
      }
      if (gone && ::shm_unlink(("/" + name).c_str()) == 0) removed.push_back(name);
    }
  } catch (...) {
    // Best effort: a scan that fails leaves the segments as they were.
  }
  return removed;
}

}  // namespace lema::runtime
