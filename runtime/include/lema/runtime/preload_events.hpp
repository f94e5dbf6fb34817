// The LD_PRELOAD hook's per-call events, as a profile file keeps them (profile_file.hpp).
//
// Note [Preload event section]: the hook (allocator/preload, LEMA_PRELOAD_EVENTS) records one
// event per CUDA runtime call it sees: which call, the bytes, the route it took, the result, the
// thread and when. They are none of the pager's EventKinds (a fault, a prefetch, an eviction of
// pages of a source): an allocation has no page, it has an address, a thread and a route, and
// fitting those into the page fields of a pager event would give every reader of the format
// events it misreads. So they follow the body as a section of their own, outside the body's
// byte count and checksum:
//   u8[8] "LEMAPEVT" | u32 version (1) | u32 record bytes (40) | u64 record count |
//   u64 dropped | u64 capacity | u32 crc32 of the records | u32 reserved, 48 bytes; then
//   per record, 40 bytes: u64 time_ns (steady clock, when the call returned) | u64 bytes |
//     u64 address | u32 thread id | i32 result (cudaError_t) | u8 call | u8 route | u8 flags |
//     u8[5] reserved.
// A record with call 0 was still being written when the process exited; it is skipped (the
// writer counted it in dropped). A file without the section (every file written before it, or
// with LEMA_PRELOAD_EVENTS=0) is read as before, and a reader that predates the section reads
// the body and ignores what follows it; the version number of the file is unchanged.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "lema/runtime/preload_event_values.hpp"

namespace lema::runtime {

struct PreloadEvent {
  std::uint64_t time_ns = 0;
  std::uint64_t bytes = 0;  // requested; a free of managed memory: its size, else 0; meminfo: free
  std::uint64_t address = 0;  // given out (allocations) or passed (frees)
  std::uint32_t thread = 0;
  std::int32_t result = 0;
  PreloadCall call = PreloadCall::malloc;
  PreloadRoute route = PreloadRoute::passthrough;
  std::uint8_t flags = 0;
};

struct PreloadEvents {
  std::uint64_t capacity = 0;        // LEMA_PRELOAD_EVENTS
  std::uint64_t dropped = 0;         // calls not recorded: the ring was full (or a call unfinished)
  std::vector<PreloadEvent> events;  // in the order the calls claimed their records
};

/// "cudaMalloc", "cudaFreeAsync", ...
std::string_view preload_call_name(PreloadCall call);
/// "passthrough", "managed", "refused", "budget".
std::string_view preload_route_name(PreloadRoute route);
inline bool preload_call_allocates(PreloadCall c) {
  return c == PreloadCall::malloc || c == PreloadCall::malloc_async ||
         c == PreloadCall::malloc_managed;
}
inline bool preload_call_frees(PreloadCall c) {
  return c == PreloadCall::free || c == PreloadCall::free_async;
}

}  // namespace lema::runtime
