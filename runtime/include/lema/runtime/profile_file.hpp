// A recorded profile: what `lema prof record` saves and `lema prof report` reads.
//
// File format, version 2 (all integers little-endian, strings as u32 length + bytes, no NUL):
//   header, 64 bytes:
//     char[8] magic "LEMAPROF" | u32 version | u32 header bytes (64) | u64 body bytes |
//     u32 crc32 of the body (zlib) | u32 source count | u64 event count | u64 dropped events |
//     u64 start_ns | u64 end_ns   (steady clock, the recorded run's span)
//   body:
//     u64 pid | i32 exit code | string command
//     per source: u64 pid | string kind | string policy | string io path |
//       string uvm counters ("on", "" or why not: PagerStats::uvm_counters) | u64 page size |
//       u64 budget bytes | u64 pool pages | u64 page count | u64 open_ns | u64 close_ns |
//       14 × u64 counters (faults, hits, prefetches issued/used/wasted, bytes read, evictions,
//       stall ns, resident bytes, peak resident bytes, GPU faults, CPU faults, bytes migrated
//       to the device, bytes migrated to the host) | u32 tensor count |
//       per tensor: u32 first page | u32 page count | i32 layer | string name
//     per event, 40 bytes: u64 time_ns | u64 duration_ns | u64 bytes | u32 first page |
//       u32 page count | u8 kind (EventKind: 0 fault … 5 stall, 6 gpu_fault, 7 migrate_to_device,
//       8 migrate_to_host) | u8 reserved | u16 source | u32 reserved
// After the body, a file the LD_PRELOAD hook wrote may hold its per-call events: see
// Note [Preload event section] in preload_events.hpp (outside the body, the version unchanged).
// Version 1 (before unified-memory counters: no uvm string, 10 counters, kinds 0–5) is refused
// with a message saying so.
// A reader checks the magic, the version, the sizes and the checksum before parsing, so a
// truncated, foreign or damaged file is refused with one error naming it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/runtime/preload_events.hpp"
#include "lema/runtime/profile.hpp"

namespace lema::runtime {

inline constexpr std::uint32_t kProfileFileVersion = 2;

/// A profile file that cannot be read: missing, truncated, foreign, damaged or of another
/// version. The message names the file.
class ProfileFileError : public Error {
 public:
  using Error::Error;
};

struct Recording {
  std::uint64_t pid = 0;       // the process started (or the one that saved itself)
  std::int32_t exit_code = 0;  // its exit status; 128 + signal when killed
  std::string command;
  std::uint64_t start_ns = 0;
  std::uint64_t end_ns = 0;
  std::uint64_t dropped = 0;  // events lost because the reader fell behind
  std::vector<ProfileSourceInfo> sources;
  std::vector<ProfileEvent> events;      // oldest first
  std::optional<PreloadEvents> preload;  // the hook's section, when the file has one
};

/// Writes `rec` to `path` (through a temporary file renamed into place). Throws SystemError.
void save_recording(const Recording& rec, const std::filesystem::path& path);
/// Throws ProfileFileError.
Recording load_recording(const std::filesystem::path& path);

}  // namespace lema::runtime
