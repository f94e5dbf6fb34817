// Byte sizes: literals (2_MiB), parsing of user-given sizes ("64MiB", "1.5 GiB", "4096"),
// and human-readable formatting.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace lema {

constexpr std::uint64_t operator""_KiB(unsigned long long v) {
  return v << 10;
}
constexpr std::uint64_t operator""_MiB(unsigned long long v) {
  return v << 20;
}
constexpr std::uint64_t operator""_GiB(unsigned long long v) {
  return v << 30;
}

/// Parses a size: plain bytes, or a number (decimals allowed) followed by B, KiB, MiB, GiB, TiB
/// (also K/M/G/T, KB/MB/GB/TB meaning powers of 1024). Throws lema::InvalidArgument naming
/// `setting` (e.g. "--budget") on malformed or overflowing input.
std::uint64_t parse_size(std::string_view text, std::string_view setting = "size");

/// "64 MiB", "1.50 GiB", "512 B".
std::string format_size(std::uint64_t bytes);

constexpr bool is_power_of_two(std::uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}
constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) {
  return (v + a - 1) / a * a;
}
constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t a) {
  return v / a * a;
}

}  // namespace lema
