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

// CRC-32 (zlib's): start with 0xFFFFFFFF, feed, complement at the end. Slicing by eight over
// tables built at compile time: the event section can be tens of megabytes, and a bit at a time
// would cost seconds at exit.
struct CrcTables {
  std::uint32_t t[8][256];
};
constexpr CrcTables make_crc_tables() {
  CrcTables c{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t v = i;
    for (int k = 0; k < 8; ++k) v = (v >> 1) ^ (0xEDB88320u & (0u - (v & 1u)));
    c.t[0][i] = v;
  }
  for (std::uint32_t i = 0; i < 256; ++i)
    for (int k = 1; k < 8; ++k) c.t[k][i] = (c.t[k - 1][i] >> 8) ^ c.t[0][c.t[k - 1][i] & 0xFF];
  return c;
}
constexpr CrcTables kCrc = make_crc_tables();

std::uint32_t crc32_update(std::uint32_t c, const unsigned char* p, std::size_t n) {
  for (; n >= 8; n -= 8, p += 8) {
    const std::uint32_t lo = c ^ (std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8 |
                                  std::uint32_t{p[2]} << 16 | std::uint32_t{p[3]} << 24);
    c = kCrc.t[7][lo & 0xFF] ^ kCrc.t[6][(lo >> 8) & 0xFF] ^ kCrc.t[5][(lo >> 16) & 0xFF] ^
        kCrc.t[4][lo >> 24] ^ kCrc.t[3][p[4]] ^ kCrc.t[2][p[5]] ^ kCrc.t[1][p[6]] ^ kCrc.t[0][p[7]];
  }
  for (; n > 0; --n, ++p) c = (c >> 8) ^ kCrc.t[0][(c ^ *p) & 0xFF];
  return c;
}
std::uint32_t crc32(const unsigned char* p, std::size_t n) {
  return ~crc32_update(0xFFFFFFFFu, p, n);
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

// Note [Preload event section] (runtime/include/lema/runtime/preload_events.hpp): a 48-byte head
// and the ring's records. The records are copied out in chunks, a record still being written
// (call byte 0) zeroed and counted as dropped, and the checksum taken over the copies, so a
// thread still inside a hook at exit cannot make the file disagree with its checksum. The head,
// which holds that checksum, is written last, in the place kept for it.
bool write_event_section(int fd, off_t at, const EventRing& ring) {
  static unsigned char chunk[256 * sizeof(EventRecord)];
  const std::uint64_t claimed = ring.claimed();
  const std::uint64_t count = claimed < ring.capacity() ? claimed : ring.capacity();
  constexpr std::size_t kHead = 48;
  if (::lseek(fd, at + static_cast<off_t>(kHead), SEEK_SET) < 0) return false;
  std::uint32_t crc = 0xFFFFFFFFu;
  std::uint64_t lost = 0;
  for (std::uint64_t i = 0; i < count;) {
    std::size_t n = 0;
    for (; i < count && n + sizeof(EventRecord) <= sizeof chunk; ++i, n += sizeof(EventRecord)) {
      const EventRecord& r = ring.records()[i];
      if (__atomic_load_n(&r.call, __ATOMIC_ACQUIRE) == 0) {
        std::memset(chunk + n, 0, sizeof(EventRecord));
        ++lost;
      } else {
        std::memcpy(chunk + n, &r, sizeof(EventRecord));
      }
    }
    crc = crc32_update(crc, chunk, n);
    if (::write(fd, chunk, n) != static_cast<ssize_t>(n)) return false;
  }
  unsigned char head_buf[kHead];
  Out head{head_buf, sizeof head_buf};
  head.bytes("LEMAPEVT", 8);
  head.put<std::uint32_t>(1);  // version
  head.put<std::uint32_t>(sizeof(EventRecord));
  head.put<std::uint64_t>(count);
  head.put<std::uint64_t>(claimed - count + lost);  // dropped
  head.put<std::uint64_t>(ring.capacity());
  head.put<std::uint32_t>(~crc);
  head.put<std::uint32_t>(0);
  return ::pwrite(fd, head_buf, head.n, at) == static_cast<ssize_t>(head.n);
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
  if (ok && s.events && s.events->on())
    ok = write_event_section(fd, static_cast<off_t>(header.n + body.n), *s.events);
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
