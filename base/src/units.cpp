#include "lema/base/units.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <string>

#include "lema/base/error.hpp"

namespace lema {

std::uint64_t parse_size(std::string_view text, std::string_view setting) {
  auto fail = [&](const char* why) {
    throw InvalidArgument(std::string(setting) + ": cannot read size '" + std::string(text) +
                          "': " + why + " (use e.g. 4096, 64MiB, 1.5GiB)");
  };
  std::size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  std::size_t num_begin = i;
  bool seen_digit = false, seen_dot = false;
  while (i < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[i])) || (text[i] == '.' && !seen_dot))) {
    seen_dot |= text[i] == '.';
    seen_digit |= text[i] != '.';
    ++i;
  }
  if (!seen_digit) fail("no number");
  std::string number(text.substr(num_begin, i - num_begin));
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  std::string unit;
  for (; i < text.size(); ++i) {
    if (std::isspace(static_cast<unsigned char>(text[i]))) break;
    unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
  }
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  if (i != text.size()) fail("unexpected characters after the unit");

  int shift = 0;
  if (unit.empty() || unit == "b")
    shift = 0;
  else if (unit == "k" || unit == "kb" || unit == "kib")
    shift = 10;
  else if (unit == "m" || unit == "mb" || unit == "mib")
    shift = 20;
  else if (unit == "g" || unit == "gb" || unit == "gib")
    shift = 30;
  else if (unit == "t" || unit == "tb" || unit == "tib")
    shift = 40;
  else
    fail("unknown unit");

  if (!seen_dot) {
    std::uint64_t v = 0;
    for (char c : number) {
      if (v > (UINT64_MAX - 9) / 10) fail("too large");
      v = v * 10 + static_cast<std::uint64_t>(c - '0');
    }
    if (shift && v > (UINT64_MAX >> shift)) fail("too large");
    return v << shift;
  }
  long double v = std::strtold(number.c_str(), nullptr) * std::ldexp(1.0L, shift);
  if (!(v < 18446744073709551615.0L)) fail("too large");
  return static_cast<std::uint64_t>(std::llround(v));
}

std::string format_size(std::uint64_t bytes) {
  static constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (v == std::floor(v))
    std::snprintf(buf, sizeof buf, "%.0f %s", v, units[u]);
  else
    std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

}  // namespace lema
