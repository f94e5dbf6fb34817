#include "settings.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "report.hpp"

namespace lema::preload {
namespace {

bool is_space(char c) {
  return c == ' ' || c == '\t';
}
char lower(char c) {
  return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}
bool equals(const char* a, const char* b) {
  while (*a && *b && lower(*a) == lower(*b)) ++a, ++b;
  return *a == 0 && *b == 0;
}

void bad_setting(const char* name, const char* value, const char* accepted) {
  Line line;
  line.add(name)
      .add("='")
      .add(value)
      .add("' is not ")
      .add(accepted)
      .add("; the hook passes every call through to the CUDA runtime (fix or unset ")
      .add(name)
      .add(")");
  report(Level::warn, line);
}

}  // namespace

bool parse_size(const char* text, std::uint64_t* out) noexcept {
  if (!text) return false;
  const char* p = text;
  while (is_space(*p)) ++p;
  std::uint64_t whole = 0, frac = 0, frac_scale = 1;
  bool digits = false, dot = false;
  for (; (*p >= '0' && *p <= '9') || (*p == '.' && !dot); ++p) {
    if (*p == '.') {
      dot = true;
      continue;
    }
    digits = true;
    const unsigned d = static_cast<unsigned>(*p - '0');
    if (!dot) {
      if (whole > (UINT64_MAX - 9) / 10) return false;
      whole = whole * 10 + d;
    } else if (frac_scale < 1000000000) {  // nine decimals are more than any unit resolves
      frac = frac * 10 + d;
      frac_scale *= 10;
    }
  }
  if (!digits) return false;
  while (is_space(*p)) ++p;
  char unit[4] = {};
  int n = 0;
  for (; *p && !is_space(*p); ++p) {
    if (n == 3) return false;
    unit[n++] = lower(*p);
  }
  while (is_space(*p)) ++p;
  if (*p) return false;
  int shift = -1;
  static constexpr struct {
    const char* name;
    int shift;
  } units[] = {{"", 0},     {"b", 0},   {"k", 10},   {"kb", 10}, {"kib", 10},
               {"m", 20},   {"mb", 20}, {"mib", 20}, {"g", 30},  {"gb", 30},
               {"gib", 30}, {"t", 40},  {"tb", 40},  {"tib", 40}};
  for (const auto& u : units)
    if (std::strcmp(unit, u.name) == 0) shift = u.shift;
  if (shift < 0) return false;
  if (shift && whole > (UINT64_MAX >> shift)) return false;
  std::uint64_t v = whole << shift;
  // The fraction times the unit, rounded to the nearest byte: frac < frac_scale ≤ 1e9 < 2^30,
  // so frac << 40 fits; the product is split to stay within 64 bits.
  const std::uint64_t unit_bytes = std::uint64_t{1} << shift;
  const std::uint64_t part = (unit_bytes / frac_scale) * frac +
                             ((unit_bytes % frac_scale) * frac + frac_scale / 2) / frac_scale;
  if (v > UINT64_MAX - part) return false;
  *out = v + part;
  return true;
}

Settings read_settings() noexcept {
  Settings s;
  bool ok = true;

  if (const char* v = std::getenv("LEMA_PRELOAD_LOG"); v && *v) {
    if (equals(v, "off"))
      set_report_level(Level::off);
    else if (equals(v, "warn"))
      set_report_level(Level::warn);
    else if (equals(v, "info"))
      set_report_level(Level::info);
    else if (equals(v, "debug"))
      set_report_level(Level::debug);
    else {
      bad_setting("LEMA_PRELOAD_LOG", v, "off, warn, info or debug");
      ok = false;
    }
  }
  if (const char* v = std::getenv("LEMA_PRELOAD_LOG_FILE"); v && *v) {
    const int fd = ::open(v, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      set_report_fd(fd);
    } else {
      Line line;
      line.add("LEMA_PRELOAD_LOG_FILE='")
          .add(v)
          .add("' cannot be opened for appending (")
          .add(std::strerror(errno))
          .add("); reporting to stderr");
      report(Level::warn, line);
    }
  }
  if (const char* v = std::getenv("LEMA_PRELOAD_MODE"); v && *v) {
    if (equals(v, "managed"))
      s.managed = true;
    else if (equals(v, "passthrough"))
      s.managed = false;
    else {
      bad_setting("LEMA_PRELOAD_MODE", v, "managed or passthrough");
      ok = false;
    }
  }
  if (const char* v = std::getenv("LEMA_PRELOAD_THRESHOLD"); v && *v) {
    if (!parse_size(v, &s.threshold)) {
      bad_setting("LEMA_PRELOAD_THRESHOLD", v, "a size (e.g. 1048576, 1M, 4MiB)");
      ok = false;
    }
  }
  if (const char* v = std::getenv("LEMA_BUDGET"); v && *v) {
    if (!parse_size(v, &s.budget) || s.budget == 0) {
      bad_setting("LEMA_BUDGET", v, "a size above zero (e.g. 40G, 512MiB)");
      ok = false;
    }
  }
  if (const char* v = std::getenv("LEMA_PRELOAD_ADVISE"); v && *v) {
    if (equals(v, "1") || equals(v, "on") || equals(v, "true"))
      s.advise = true;
    else if (equals(v, "0") || equals(v, "off") || equals(v, "false"))
      s.advise = false;
    else {
      bad_setting("LEMA_PRELOAD_ADVISE", v, "1 or 0");
      ok = false;
    }
  }
  if (const char* v = std::getenv("LEMA_PRELOAD_TABLE"); v && *v) {
    std::uint64_t n = 0;
    if (!parse_size(v, &n) || n < kMinTableEntries || n > kMaxTableEntries) {
      bad_setting("LEMA_PRELOAD_TABLE", v, "a count of entries from 16 to 16777216");
      ok = false;
    } else {
      s.table_entries = kMinTableEntries;
      while (s.table_entries < n) s.table_entries <<= 1;
    }
  }
  if (const char* v = std::getenv("LEMA_PRELOAD_PROFILE"); v && *v) {
    if (std::strlen(v) >= sizeof s.profile_path) {
      bad_setting("LEMA_PRELOAD_PROFILE", v, "a path shorter than 1024 bytes");
      ok = false;
    } else {
      std::strcpy(s.profile_path, v);
    }
  }
  // Note [Bad settings pass through] holds here too: a malformed count passes every call through,
  // and the ring keeps its default size, so the profile still shows what the program did.
  if (const char* v = std::getenv("LEMA_PRELOAD_EVENTS"); v && *v) {
    std::uint64_t n = 0;
    if (!parse_size(v, &n) || n > kMaxEvents) {
      bad_setting("LEMA_PRELOAD_EVENTS", v, "a count of events from 0 (off) to 67108864");
      ok = false;
    } else {
      s.events = n;
    }
  }
  if (!ok) s.managed = false;
  return s;
}

}  // namespace lema::preload
