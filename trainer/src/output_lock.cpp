// The output directory's exclusive lock (Note [Output directory lock] in train_state.hpp).
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <spdlog/fmt/fmt.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

#include "lema/base/error.hpp"
#include "lema/trainer/train_state.hpp"

namespace lema::trainer {

namespace {

// How long a refused run waits for the holder's pid to appear in the lock file.
constexpr auto kPidWait = std::chrono::seconds(2);

std::optional<long> read_pid(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (n <= 0) return std::nullopt;
  long pid = 0;
  const auto [end, ec] = std::from_chars(buf, buf + n, pid);
  if (ec != std::errc() || pid <= 0 || (end != buf + n && *end != '\n')) return std::nullopt;
  return pid;
}

bool alive(long pid) {
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

void write_pid(int fd, const std::filesystem::path& file) {
  const std::string text = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 ||
      ::pwrite(fd, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
    const int err = errno;
    throw InvalidArgument(fmt::format("cannot write {}: {}; choose another --out", file.string(),
                                      std::strerror(err)));
  }
}

}  // namespace

OutputDirLock OutputDirLock::acquire(const std::filesystem::path& out_dir) {
  prepare_output_dir(out_dir);
  const auto file = out_dir / kLockFile;
  UniqueFd fd(::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) {
    const int err = errno;
    throw InvalidArgument(fmt::format("cannot open {}: {}; choose another --out", file.string(),
                                      std::strerror(err)));
  }
  const auto deadline = std::chrono::steady_clock::now() + kPidWait;
  std::optional<long> holder;
  for (;;) {
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) == 0) break;
    if (errno == EINTR) continue;
    if (errno != EWOULDBLOCK) {
      const int err = errno;
      throw InvalidArgument(fmt::format("cannot lock {}: {}; choose another --out", file.string(),
                                        std::strerror(err)));
    }
    holder = read_pid(fd.get());
    if ((holder && alive(*holder)) || std::chrono::steady_clock::now() >= deadline) {
      throw InvalidArgument(fmt::format(
          "output directory {} is in use by another run ({}); wait for it to end or choose "
          "another --out",
          out_dir.string(),
          holder && alive(*holder) ? fmt::format("pid {}", *holder) : "pid unknown"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  write_pid(fd.get(), file);
  OutputDirLock lock(out_dir, std::move(fd));
  lock.removed_ = remove_interrupted_saves(out_dir);
  return lock;
}

}  // namespace lema::trainer
