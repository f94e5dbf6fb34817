// `lema prof`: recording a program's profile segments and reporting a recorded profile.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "lema/runtime/profile.hpp"
#include "profile_reader.hpp"
#include "lema/runtime/profile_file.hpp"

namespace lema::tools {

/// Drains every profile segment whose recorder is `recorder_pid` (found under /dev/shm by name)
/// into one Recording. Not thread-safe; one collector per recording.
class ProfileCollector {
 public:
  explicit ProfileCollector(std::uint64_t recorder_pid);
  /// Attaches to new segments and drains all of them (call every few milliseconds).
  void poll();
  /// The last drain (the writers are gone): removes the segments, returns the recording with
  /// events sorted by time. start/end/pid/command/exit code are the caller's to fill.
  runtime::Recording finish();
  std::size_t segments() const noexcept { return attached_.size(); }

 private:
  struct Attached {
    runtime::ProfileAttachment attachment;
    std::vector<runtime::ProfileEvent> events;
  };
  std::uint64_t recorder_pid_;
  std::vector<Attached> attached_;
  std::map<std::string, bool> seen_;  // segment names already looked at
};

/// Stall, faults and bytes attributed to a layer or a tensor.
struct StallShare {
  std::string name;
  std::uint64_t faults = 0;
  std::uint64_t bytes = 0;
  double stall_ns = 0;
  std::uint64_t gpu_faults = 0;  // over unified memory: the driver's GPU page faults
};

struct ProfileSummary {
  std::string command;
  std::uint64_t pid = 0;
  std::int32_t exit_code = 0;
  double wall_s = 0;
  std::uint64_t events = 0;
  std::uint64_t dropped = 0;
  // From the publishers' counters (summed over publishers; peak and budget: the largest).
  runtime::PagerStats counters;
  double hit_rate = 0;     // hits / (hits + faults)
  double stall_share = 0;  // stall time / wall time
  // From the events.
  std::uint64_t read_bytes_events = 0;
  double read_busy_s = 0;     // union of the intervals spent reading
  double read_bandwidth = 0;  // bytes per second while reading
  std::string io_path, policy;
  // Over unified memory (any source with a status): GPU faults and migrations are in
  // `counters`; uvm_counters joins the sources' statuses ("on", or why not).
  std::string uvm_counters;
  bool unified_memory() const noexcept { return !uvm_counters.empty(); }
  // Against Belady's MIN for the same access trace (faults and hits in time order) and budget.
  std::uint64_t accesses = 0;
  std::uint64_t run_fetches = 0;  // faults + prefetches issued
  std::uint64_t belady_fetches = 0;
  std::uint64_t lru_fetches = 0;
  double belady_bytes = 0;          // belady_fetches × the run's mean bytes per fetch
  bool trace_complete = true;       // false when events were dropped
  std::vector<StallShare> layers;   // by stall, descending (top N)
  std::vector<StallShare> tensors;  // by stall, descending (top N)
};

/// `top_n`: rows kept in the per-layer and per-tensor lists.
ProfileSummary summarize(const runtime::Recording& rec, std::size_t top_n);
std::string format_summary(const ProfileSummary& s);
nlohmann::json summary_json(const ProfileSummary& s);
/// Chrome trace event format (opens in Perfetto and chrome://tracing).
void write_chrome_trace(const runtime::Recording& rec, std::ostream& out);
/// A timeline: time × page, faults, prefetches and evictions coloured, resident bytes against
/// the budget below.
void write_svg(const runtime::Recording& rec, std::ostream& out);

/// Indices of the recording's events in time order (stable).
std::vector<std::uint32_t> time_order(const runtime::Recording& rec);

/// A label for each page of source `src` ("layer N", "embedding", "head"), and the tensors on it.
/// Kept per tensor, not per page (Note [Tensor page ranges] in profile_file.cpp): a page is
/// looked up by binary search, so memory follows the tensors a file holds, never the page count
/// it claims. Exact for tensors in layout order; for others it stays in bounds.
class PageMap {
 public:
  explicit PageMap(const runtime::ProfileSourceInfo& src);
  /// Index into labels() of page `p`'s group; -1 when no tensor covers it.
  std::int32_t group(std::uint64_t p) const;
  /// The tensors on page `p` (indices into the source's tensors), in layout order, into `out`.
  void tensors_on(std::uint64_t p, std::vector<std::uint32_t>& out) const;
  const std::vector<std::string>& labels() const noexcept { return labels_; }
  /// Maximal runs of pages of one group, ascending (gaps without a tensor end a run).
  struct Band {
    std::uint64_t first, end;
    std::int32_t group;
  };
  std::vector<Band> bands() const;

 private:
  template <typename Fn>
  void for_each_on(std::uint64_t p, Fn&& fn) const;
  struct Range {
    std::uint64_t first, end;  // pages [first, end), clamped to the source's pages
    std::uint64_t reach;       // the largest `end` of this and every earlier range
    std::uint32_t tensor;
    std::int32_t group;
    bool layer;  // the tensor has a layer number
  };
  std::vector<Range> ranges_;  // tensors with pages, ordered by first page (stable)
  std::vector<std::string> labels_;
};

}  // namespace lema::tools
