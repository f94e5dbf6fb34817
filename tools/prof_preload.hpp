// `lema prof report` on a profile the LD_PRELOAD hook wrote with per-call events
// (runtime/include/lema/runtime/preload_events.hpp): what each call and route did, the bytes
// outstanding over time, and the calls that went wrong.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lema/runtime/preload_events.hpp"

namespace lema::tools {

struct PreloadRow {
  std::string call, route;
  std::uint64_t count = 0;
  std::uint64_t bytes = 0;    // requested; frees: the bytes of the allocation they released
  std::uint64_t largest = 0;  // the largest of those
  std::uint64_t failed = 0;   // calls that returned an error
};

/// One listed call (refused, or a bad free).
struct PreloadCallLine {
  double time_s = 0;  // since the profile's start
  std::string call, route, what;
  std::uint64_t bytes = 0, address = 0;
  std::uint32_t thread = 0;
  std::int32_t result = 0;
};

struct PreloadReport {
  std::uint64_t recorded = 0, dropped = 0, capacity = 0, threads = 0;
  bool complete = true;          // nothing dropped: the outstanding bytes are exact
  std::vector<PreloadRow> rows;  // by call, then route
  std::uint64_t peak_outstanding = 0;
  double peak_at_s = 0;
  std::uint64_t outstanding_at_exit = 0;
  struct Point {
    double time_s;
    std::uint64_t bytes;  // the most outstanding within the interval that starts here
  };
  std::vector<Point> timeline;  // equal intervals over the recorded calls
  std::uint64_t refused_count = 0, bad_free_count = 0;
  std::vector<PreloadCallLine> refused, bad_frees;  // the first `top_n` of each
};

/// Times are reported relative to `start_ns` (the profile's start).
PreloadReport summarize_preload(const runtime::PreloadEvents& events, std::uint64_t start_ns,
                                std::size_t top_n);
std::string format_preload(const PreloadReport& r);
nlohmann::json preload_json(const PreloadReport& r);

}  // namespace lema::tools
