#include "profile_summary.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "report.hpp"

namespace lema::preload {
namespace {

// A little-endian writer over a fixed buffer; overflow makes the whole write fail.
struct Out {
  unsigned char* p;
  std::size_t cap;
  std::size_t n = 0;
  bool ok = true;
  void bytes(const void* data, std::size_t len) {
    if (!ok || len > cap - n) {
      ok = false;
      return;
    }
    std::memcpy(p + n, data, len);
    n += len;
  }
  template <typename T>
  void put(T v) {
    unsigned char b[sizeof(T)];
    for (std::size_t i = 0; i < sizeof(T); ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    bytes(b, sizeof b);
  }
  void str(const char* s, std::size_t len) {
    put<std::uint32_t>(static_cast<std::uint32_t>(len));
    bytes(s, len);
  }
  void str(const char* s) { str(s, std::strlen(s)); }
};

std::uint32_t crc32(const unsigned char* p, std::size_t n) {
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

// /proc/self/cmdline with its separators made spaces.
std::size_t read_command(char* buf, std::size_t cap) {
  const int fd = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = ::read(fd, buf, cap);
  ::close(fd);
  if (n <= 0) return 0;
  while (n > 0 && buf[n - 1] == 0) --n;
  for (ssize_t i = 0; i < n; ++i)
    if (buf[i] == 0) buf[i] = ' ';
  return static_cast<std::size_t>(n);
}

}  // namespace

std::uint64_t monotonic_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ull +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

bool write_profile_summary(const ProfileSummary& s) noexcept {
  static unsigned char body_buf[8192];
  Out body{body_buf, sizeof body_buf};
  const std::uint64_t pid = static_cast<std::uint64_t>(::getpid());
  body.put<std::uint64_t>(pid);
  body.put<std::int32_t>(0);  // the exit status is not known inside the process
  char command[2048];
  body.str(command, read_command(command, sizeof command));

  // The one source (Note [Preload profile]).
  body.put<std::uint64_t>(pid);
  body.str("preload");
  Line policy;
  policy.add(s.managed ? "preload managed >= " : "preload passthrough >= ").size(s.threshold);
  policy.add(": ").dec(s.counters.managed_allocs).add(" managed (").size(s.counters.managed_bytes);
  policy.add("), ").dec(s.counters.refused).add(" over budget, ").dec(s.passed_through);
  policy.add(" passed through");
  body.str(policy.data(), policy.length());
  body.str("");                // io path
  body.str("");                // unified-memory counters
  body.put<std::uint64_t>(0);  // page size
  body.put<std::uint64_t>(s.budget);
  body.put<std::uint64_t>(0);  // pool pages
  body.put<std::uint64_t>(0);  // page count
  body.put<std::uint64_t>(s.start_ns);
  body.put<std::uint64_t>(s.end_ns);
  for (int i = 0; i < 8; ++i) body.put<std::uint64_t>(0);  // faults … stall ns
  body.put<std::uint64_t>(s.counters.in_use);              // resident bytes
  body.put<std::uint64_t>(s.counters.peak);                // peak resident bytes
  for (int i = 0; i < 4; ++i) body.put<std::uint64_t>(0);  // GPU/CPU faults, migrations
  body.put<std::uint32_t>(0);                              // tensors
  if (!body.ok) {
    errno = ENOBUFS;
    return false;
  }

  unsigned char header_buf[64];
  Out header{header_buf, sizeof header_buf};
  header.bytes("LEMAPROF", 8);
  header.put<std::uint32_t>(2);
  header.put<std::uint32_t>(64);
  header.put<std::uint64_t>(body.n);
  header.put<std::uint32_t>(crc32(body_buf, body.n));
  header.put<std::uint32_t>(1);  // sources
  header.put<std::uint64_t>(0);  // events
  header.put<std::uint64_t>(0);  // dropped
  header.put<std::uint64_t>(s.start_ns);
  header.put<std::uint64_t>(s.end_ns);

  char tmp[1100];
  const int len = std::snprintf(tmp, sizeof tmp, "%s.tmp", s.path);
  if (len < 0 || static_cast<std::size_t>(len) >= sizeof tmp) {
    errno = ENAMETOOLONG;
    return false;
  }
  const int fd = ::open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  bool ok = ::write(fd, header_buf, header.n) == static_cast<ssize_t>(header.n) &&
            ::write(fd, body_buf, body.n) == static_cast<ssize_t>(body.n);
  const int err = errno;
  ok = ::close(fd) == 0 && ok;
  if (!ok || ::rename(tmp, s.path) != 0) {
    const int e = ok ? errno : err;
    ::unlink(tmp);
    errno = e;
    return false;
  }
  return true;
}

}  // namespace lema::preload
