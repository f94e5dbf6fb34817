#include "report.hpp"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace lema::preload {
namespace {

std::atomic<int> g_level{static_cast<int>(Level::warn)};
std::atomic<int> g_fd{2};
std::atomic<unsigned> g_warnings{0};
constexpr unsigned kMaxWarnings = 32;

void write_all(int fd, const char* p, std::size_t n) noexcept {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

}  // namespace

Line& Line::add(const char* text, std::size_t n) noexcept {
  const std::size_t room = sizeof buf_ - n_;
  if (n > room) n = room;
  std::memcpy(buf_ + n_, text, n);
  n_ += n;
  return *this;
}

Line& Line::add(const char* text) noexcept {
  return add(text, text ? std::strlen(text) : 0);
}

Line& Line::dec(std::uint64_t v) noexcept {
  char tmp[24];
  std::size_t i = sizeof tmp;
  do {
    tmp[--i] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v);
  return add(tmp + i, sizeof tmp - i);
}

Line& Line::hex(std::uintptr_t v) noexcept {
  char tmp[2 + 2 * sizeof v];
  std::size_t i = sizeof tmp;
  do {
    tmp[--i] = "0123456789abcdef"[v & 15];
    v >>= 4;
  } while (v);
  tmp[--i] = 'x';
  tmp[--i] = '0';
  return add(tmp + i, sizeof tmp - i);
}

Line& Line::size(std::uint64_t bytes) noexcept {
  static constexpr const char* units[] = {" TiB", " GiB", " MiB", " KiB"};
  static constexpr int shifts[] = {40, 30, 20, 10};
  for (int k = 0; k < 4; ++k) {
    const std::uint64_t unit = std::uint64_t{1} << shifts[k];
    if (bytes >= unit && bytes % unit == 0) return dec(bytes >> shifts[k]).add(units[k]);
  }
  return dec(bytes).add(bytes == 1 ? " byte" : " bytes");
}

void set_report_level(Level level) noexcept {
  g_level.store(static_cast<int>(level), std::memory_order_relaxed);
}
void set_report_fd(int fd) noexcept {
  g_fd.store(fd, std::memory_order_relaxed);
}
Level report_level() noexcept {
  return static_cast<Level>(g_level.load(std::memory_order_relaxed));
}

void report(Level level, const Line& line) noexcept {
  if (!reporting(level)) return;
  const int fd = g_fd.load(std::memory_order_relaxed);
  if (level == Level::warn) {
    const unsigned n = g_warnings.fetch_add(1, std::memory_order_relaxed);
    if (n > kMaxWarnings) return;
    if (n == kMaxWarnings) {
      static constexpr char kMore[] = "lema preload: further warnings suppressed\n";
      write_all(fd, kMore, sizeof kMore - 1);
      return;
    }
  }
  Line out;
  out.add("lema preload: ").add(line.data(), line.length());
  char buf[sizeof(Line) + 2];
  std::memcpy(buf, out.data(), out.length());
  buf[out.length()] = '\n';
  write_all(fd, buf, out.length() + 1);  // one write: lines from threads do not interleave
}

}  // namespace lema::preload
