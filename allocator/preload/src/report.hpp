// One-line messages from the hook, built in a fixed buffer and written with write(2): nothing
// here allocates, locks or throws, so a message can be reported from any path of any hook,
// including a failing one (Note [No exceptions in the hook]).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lema::preload {

enum class Level : int { off = 0, warn = 1, info = 2, debug = 3 };

/// A message under construction; add() truncates silently at the buffer's end.
class Line {
 public:
  Line& add(const char* text) noexcept;
  Line& add(const char* text, std::size_t n) noexcept;
  Line& dec(std::uint64_t v) noexcept;
  Line& hex(std::uintptr_t v) noexcept;
  /// "4 MiB" when a whole number of KiB/MiB/GiB/TiB, else "1234567 bytes".
  Line& size(std::uint64_t bytes) noexcept;
  const char* data() const noexcept { return buf_; }
  std::size_t length() const noexcept { return n_; }

 private:
  char buf_[640];
  std::size_t n_ = 0;
};

/// Where lines go and which are written. Set once while the library loads (single-threaded).
void set_report_level(Level level) noexcept;
void set_report_fd(int fd) noexcept;
Level report_level() noexcept;
inline bool reporting(Level level) noexcept {
  return static_cast<int>(level) <= static_cast<int>(report_level());
}

/// Writes "lema preload: <line>\n" when `level` is on. Warnings beyond the 32nd are replaced by
/// one line saying that further warnings are suppressed, so a misbehaving program cannot flood
/// its log through the hook.
void report(Level level, const Line& line) noexcept;

}  // namespace lema::preload
