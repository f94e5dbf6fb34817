// The hook's settings, read from the environment once while the library loads
// (docs/USER_GUIDE.md, "LD_PRELOAD hook", lists them all).
//
// Note [Bad settings pass through]: a setting that cannot be read is reported in one line naming
// it, its value and what it accepts, and the hook then passes every call through to the real
// runtime untouched: a program must never run under half of what its user asked for (a budget
// without its threshold, say), nor be stopped by a typo in an environment variable.
#pragma once

#include <cstdint>

namespace lema::preload {

inline constexpr std::uint64_t kDefaultThreshold = std::uint64_t{1} << 20;
inline constexpr std::uint64_t kDefaultTableEntries = std::uint64_t{1} << 16;
inline constexpr std::uint64_t kMinTableEntries = 16;
inline constexpr std::uint64_t kMaxTableEntries = std::uint64_t{1} << 24;
// Records of the event ring (event_ring.hpp), 40 bytes each, mapped but touched only as used.
inline constexpr std::uint64_t kDefaultEvents = std::uint64_t{1} << 20;
inline constexpr std::uint64_t kMaxEvents = std::uint64_t{1} << 26;

struct Settings {
  bool managed = true;                                 // LEMA_PRELOAD_MODE=managed|passthrough
  std::uint64_t threshold = kDefaultThreshold;         // LEMA_PRELOAD_THRESHOLD
  std::uint64_t budget = 0;                            // LEMA_BUDGET; 0: none
  bool advise = true;                                  // LEMA_PRELOAD_ADVISE
  std::uint64_t table_entries = kDefaultTableEntries;  // LEMA_PRELOAD_TABLE, a power of two
  char profile_path[1024] = {};                        // LEMA_PRELOAD_PROFILE; empty: off
  std::uint64_t events = kDefaultEvents;  // LEMA_PRELOAD_EVENTS; 0: off (kept with the profile)
};

/// Reads the environment; sets the report level and file first, so that what follows is
/// reported where the user asked. Never fails: see Note [Bad settings pass through].
Settings read_settings() noexcept;

/// Parses a size the way lema::parse_size does (the project's --budget): bytes, or a number
/// (decimals allowed) followed by B, K/KB/KiB, M/MB/MiB, G/GB/GiB or T/TB/TiB, all powers of
/// 1024, case-insensitive, spaces allowed around the unit. False on malformed or overflowing
/// input. Does not allocate.
bool parse_size(const char* text, std::uint64_t* out) noexcept;

}  // namespace lema::preload
