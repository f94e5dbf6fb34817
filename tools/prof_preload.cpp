#include "prof_preload.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "lema/base/units.hpp"

namespace lema::tools {
namespace {

using runtime::PreloadCall;
using runtime::PreloadEvent;
using runtime::PreloadRoute;

constexpr std::size_t kTimelinePoints = 20;

PreloadCallLine line_of(const PreloadEvent& e, std::uint64_t start_ns, std::string what) {
  PreloadCallLine l;
  l.time_s = e.time_ns > start_ns ? static_cast<double>(e.time_ns - start_ns) * 1e-9 : 0.0;
  l.call = runtime::preload_call_name(e.call);
  l.route = runtime::preload_route_name(e.route);
  l.what = std::move(what);
  l.bytes = e.bytes;
  l.address = e.address;
  l.thread = e.thread;
  l.result = e.result;
  return l;
}

}  // namespace

// Note [Outstanding bytes from the events]: the hook knows the size of a free only for its own
// managed memory; the report pairs every successful free with the allocation that gave its
// address out, so the bytes outstanding count every route. A free whose allocation was dropped
// (the ring was full) cannot be paired and is left out: the report says the figure is then
// incomplete. A refused free whose address was freed before and not given out since is a double
// free even where the hook could not tell (it passes frees through untouched when not routing).
PreloadReport summarize_preload(const runtime::PreloadEvents& p, std::uint64_t start_ns,
                                std::size_t top_n) {
  PreloadReport r;
  r.recorded = p.events.size();
  r.dropped = p.dropped;
  r.capacity = p.capacity;
  r.complete = p.dropped == 0;

  std::vector<std::uint32_t> order(p.events.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
    return p.events[a].time_ns < p.events[b].time_ns;
  });
  auto rel = [&](std::uint64_t t) {
    return t > start_ns ? static_cast<double>(t - start_ns) * 1e-9 : 0.0;
  };

  std::map<std::pair<std::uint8_t, std::uint8_t>, PreloadRow> rows;
  std::unordered_map<std::uint64_t, std::uint64_t> live;  // address → bytes
  std::unordered_set<std::uint64_t> freed;                // freed, not given out since
  std::set<std::uint32_t> threads;
  std::uint64_t out = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> steps;  // (time, outstanding)
  for (std::uint32_t i : order) {
    const PreloadEvent& e = p.events[i];
    threads.insert(e.thread);
    PreloadRow& row = rows[{static_cast<std::uint8_t>(e.call), static_cast<std::uint8_t>(e.route)}];
    ++row.count;
    if (e.result != 0) ++row.failed;
    std::uint64_t bytes = e.bytes;
    const bool ok = e.result == 0;
    if (runtime::preload_call_allocates(e.call) && ok && e.address) {
      if (auto it = live.find(e.address); it != live.end()) out -= it->second;
      live[e.address] = e.bytes;
      freed.erase(e.address);
      out += e.bytes;
      steps.emplace_back(e.time_ns, out);
    } else if (runtime::preload_call_frees(e.call) && e.address) {
      if (ok) {
        if (auto it = live.find(e.address); it != live.end()) {
          bytes = it->second;
          out -= it->second;
          live.erase(it);
          steps.emplace_back(e.time_ns, out);
        }
        freed.insert(e.address);
      } else if (e.flags & (runtime::kPreloadBadFree | runtime::kPreloadDoubleFree)) {
        const bool twice = (e.flags & runtime::kPreloadDoubleFree) || freed.count(e.address);
        ++r.bad_free_count;
        if (r.bad_frees.size() < top_n)
          r.bad_frees.push_back(line_of(
              e, start_ns, twice ? "double free" : "not memory given out (or freed twice)"));
      }
    }
    if (e.route == PreloadRoute::refused) {
      ++r.refused_count;
      if (r.refused.size() < top_n) r.refused.push_back(line_of(e, start_ns, "over the budget"));
    }
    if (e.call != PreloadCall::mem_get_info) {
      row.bytes += bytes;
      row.largest = std::max(row.largest, bytes);
    }
    if (out > r.peak_outstanding) {
      r.peak_outstanding = out;
      r.peak_at_s = rel(e.time_ns);
    }
  }
  r.outstanding_at_exit = out;
  r.threads = threads.size();
  for (auto& [key, row] : rows) {
    row.call = runtime::preload_call_name(static_cast<PreloadCall>(key.first));
    row.route = runtime::preload_route_name(static_cast<PreloadRoute>(key.second));
    r.rows.push_back(std::move(row));
  }

  // The timeline: the most outstanding in each of equal intervals between the first and the
  // last recorded call (the level carried over into intervals without a change).
  if (!order.empty()) {
    const std::uint64_t t0 = p.events[order.front()].time_ns;
    const std::uint64_t t1 = p.events[order.back()].time_ns;
    const std::uint64_t span = std::max<std::uint64_t>(t1 - t0, 1);
    r.timeline.resize(kTimelinePoints);
    std::uint64_t level = 0;
    std::size_t k = 0;
    for (std::size_t b = 0; b < kTimelinePoints; ++b) {
      const std::uint64_t begin = t0 + span * b / kTimelinePoints;
      const std::uint64_t end =
          b + 1 == kTimelinePoints ? UINT64_MAX : t0 + span * (b + 1) / kTimelinePoints;
      std::uint64_t most = level;
      for (; k < steps.size() && steps[k].first < end; ++k) {
        level = steps[k].second;
        most = std::max(most, level);
      }
      r.timeline[b] = {rel(begin), most};
    }
  }
  return r;
}

std::string format_preload(const PreloadReport& r) {
  std::string out;
  out += fmt::format("\nLD_PRELOAD hook: {} calls recorded on {} thread{}", r.recorded, r.threads,
                     r.threads == 1 ? "" : "s");
  if (r.dropped)
    out += fmt::format(", {} dropped (the ring holds {}; raise LEMA_PRELOAD_EVENTS)", r.dropped,
                       r.capacity);
  out += "\n";
  out += fmt::format("  {:<18} {:<12} {:>9} {:>12} {:>12} {:>7}\n", "call", "route", "calls",
                     "bytes", "largest", "failed");
  for (const PreloadRow& row : r.rows)
    out += fmt::format("  {:<18} {:<12} {:>9} {:>12} {:>12} {:>7}\n", row.call, row.route,
                       row.count, row.call == "cudaMemGetInfo" ? "-" : format_size(row.bytes),
                       row.call == "cudaMemGetInfo" ? "-" : format_size(row.largest), row.failed);
  out +=
      fmt::format("  {:<22} {} at {:.6f} s; {} at exit{}\n", "outstanding peak",
                  format_size(r.peak_outstanding), r.peak_at_s, format_size(r.outstanding_at_exit),
                  r.complete ? "" : " (incomplete: calls were dropped)");
  if (!r.timeline.empty()) {
    // Intervals of one level are merged into one line.
    out += "  outstanding over time (the most in each twentieth of the calls' span):\n";
    for (std::size_t i = 0; i < r.timeline.size();) {
      std::size_t j = i + 1;
      while (j < r.timeline.size() && r.timeline[j].bytes == r.timeline[i].bytes) ++j;
      out += fmt::format("    from {:>12.6f} s  {}\n", r.timeline[i].time_s,
                         format_size(r.timeline[i].bytes));
      i = j;
    }
  }
  auto list = [&](std::string_view title, std::uint64_t count,
                  const std::vector<PreloadCallLine>& lines) {
    out += fmt::format("  {}: {}\n", title, count);
    for (const PreloadCallLine& l : lines)
      out += fmt::format("    {:>12.6f} s  thread {:<8} {}({}) {} (error {}): {}\n", l.time_s,
                         l.thread, l.call,
                         l.call.find("Free") != std::string::npos ? fmt::format("{:#x}", l.address)
                                                                  : format_size(l.bytes),
                         l.route, l.result, l.what);
    if (count > lines.size()) out += fmt::format("    ... {} more\n", count - lines.size());
  };
  list("refused", r.refused_count, r.refused);
  list("bad frees", r.bad_free_count, r.bad_frees);
  return out;
}

nlohmann::json preload_json(const PreloadReport& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const PreloadRow& row : r.rows)
    rows.push_back({{"call", row.call},
                    {"route", row.route},
                    {"count", row.count},
                    {"bytes", row.bytes},
                    {"largest", row.largest},
                    {"failed", row.failed}});
  nlohmann::json timeline = nlohmann::json::array();
  for (const auto& p : r.timeline) timeline.push_back({{"time_s", p.time_s}, {"bytes", p.bytes}});
  auto lines = [](const std::vector<PreloadCallLine>& v) {
    nlohmann::json a = nlohmann::json::array();
    for (const PreloadCallLine& l : v)
      a.push_back({{"time_s", l.time_s},
                   {"call", l.call},
                   {"route", l.route},
                   {"what", l.what},
                   {"bytes", l.bytes},
                   {"address", l.address},
                   {"thread", l.thread},
                   {"result", l.result}});
    return a;
  };
  return {{"recorded", r.recorded},
          {"dropped", r.dropped},
          {"capacity", r.capacity},
          {"threads", r.threads},
          {"complete", r.complete},
          {"calls", rows},
          {"peak_outstanding_bytes", r.peak_outstanding},
          {"peak_at_s", r.peak_at_s},
          {"outstanding_at_exit_bytes", r.outstanding_at_exit},
          {"timeline", timeline},
          {"refused_count", r.refused_count},
          {"refused", lines(r.refused)},
          {"bad_free_count", r.bad_free_count},
          {"bad_frees", lines(r.bad_frees)}};
}

}  // namespace lema::tools
