// `lema prof`: the collector of a recording, and the numbers of a report.
#include "prof_report.hpp"

#include <fmt/core.h>

#include <algorithm>
#include <boost/interprocess/shared_memory_object.hpp>
#include <filesystem>
#include <numeric>

#include "lema/base/units.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::tools {

using runtime::EventKind;
using runtime::PageId;
using runtime::ProfileEvent;
using runtime::Recording;

// ---- ProfileCollector ----

// Segments of runs killed before they could remove their own are removed here, as in `top`.
ProfileCollector::ProfileCollector(std::uint64_t recorder_pid) : recorder_pid_(recorder_pid) {
  runtime::ProfileSegment::remove_orphans();
}

void ProfileCollector::poll() {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("lema-prof-", 0) != 0 || seen_.count(name) != 0) continue;
    seen_[name] = true;
    try {
      auto a = runtime::ProfileAttachment::try_attach(name);
      if (a && a->recorder_pid() == recorder_pid_) attached_.push_back({std::move(*a), {}});
    } catch (const std::exception&) {
      // Not ours to read (another version, another user's): someone else's business.
    }
  }
  for (Attached& a : attached_) a.attachment.drain(a.events);
}

Recording ProfileCollector::finish() {
  poll();
  Recording rec;
  for (Attached& a : attached_) {
    a.attachment.drain(a.events, true);
    const auto offset = static_cast<std::uint16_t>(rec.sources.size());
    for (auto& s : a.attachment.sources()) rec.sources.push_back(std::move(s));
    for (ProfileEvent e : a.events) {
      e.source = static_cast<std::uint16_t>(e.source + offset);
      rec.events.push_back(e);
    }
    rec.dropped += a.attachment.dropped();
    boost::interprocess::shared_memory_object::remove(a.attachment.name().c_str());
  }
  std::stable_sort(
      rec.events.begin(), rec.events.end(),
      [](const ProfileEvent& a, const ProfileEvent& b) { return a.time_ns < b.time_ns; });
  return rec;
}

// ---- the page map ----

PageMap::PageMap(const runtime::ProfileSourceInfo& src) {
  std::map<std::string, std::int32_t> label_index;
  for (std::uint32_t i = 0; i < src.tensors.size(); ++i) {
    const auto& t = src.tensors[i];
    const std::uint64_t end =
        std::min<std::uint64_t>(src.page_count, std::uint64_t{t.first_page} + t.page_count);
    if (t.first_page >= end) continue;
    std::string label = t.layer >= 0 ? "layer " + std::to_string(t.layer)
                        : t.name.find("embed") != std::string::npos ? "embedding"
                                                                    : "head";
    auto [it, fresh] = label_index.emplace(label, static_cast<std::int32_t>(labels_.size()));
    if (fresh) labels_.push_back(label);
    ranges_.push_back({t.first_page, end, end, i, it->second, t.layer >= 0});
  }
  std::stable_sort(ranges_.begin(), ranges_.end(),
                   [](const Range& a, const Range& b) { return a.first < b.first; });
  std::uint64_t reach = 0;
  for (Range& r : ranges_) r.reach = reach = std::max(reach, r.end);
}

template <typename Fn>
void PageMap::for_each_on(std::uint64_t p, Fn&& fn) const {
  // `reach` ascends: skip every range that ends before p, stop at the first starting after it.
  auto at = std::partition_point(ranges_.begin(), ranges_.end(),
                                 [p](const Range& r) { return r.reach <= p; });
  for (; at != ranges_.end() && at->first <= p; ++at)
    if (p < at->end) fn(*at);
}

std::int32_t PageMap::group(std::uint64_t p) const {
  // A page shared by a layer and an unnumbered tensor (a group boundary never is) keeps the
  // layer.
  std::int32_t g = -1;
  for_each_on(p, [&](const Range& r) {
    if (g < 0 || r.layer) g = r.group;
  });
  return g;
}

void PageMap::tensors_on(std::uint64_t p, std::vector<std::uint32_t>& out) const {
  out.clear();
  for_each_on(p, [&](const Range& r) { out.push_back(r.tensor); });
}

std::vector<PageMap::Band> PageMap::bands() const {
  // A page's group changes only where a range starts or ends.
  std::vector<std::uint64_t> cuts;
  cuts.reserve(2 * ranges_.size());
  for (const Range& r : ranges_) {
    cuts.push_back(r.first);
    cuts.push_back(r.end);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<Band> out;
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    const std::int32_t g = group(cuts[k]);
    if (g < 0) continue;
    if (!out.empty() && out.back().end == cuts[k] && out.back().group == g)
      out.back().end = cuts[k + 1];
    else
      out.push_back({cuts[k], cuts[k + 1], g});
  }
  return out;
}

std::vector<std::uint32_t> time_order(const Recording& rec) {
  std::vector<std::uint32_t> order(rec.events.size());
  std::iota(order.begin(), order.end(), 0u);
  auto earlier = [](const ProfileEvent& a, const ProfileEvent& b) { return a.time_ns < b.time_ns; };
  if (!std::is_sorted(rec.events.begin(), rec.events.end(), earlier))
    std::stable_sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
      return earlier(rec.events[a], rec.events[b]);
    });
  return order;
}

// ---- summary ----

namespace {

struct Interval {
  std::uint64_t start, end;
};

double union_seconds(std::vector<Interval>& v) {
  std::sort(v.begin(), v.end(),
            [](const Interval& a, const Interval& b) { return a.start < b.start; });
  std::uint64_t total = 0, cur_start = 0, cur_end = 0;
  bool open = false;
  for (const Interval& i : v) {
    if (!open || i.start > cur_end) {
      if (open) total += cur_end - cur_start;
      cur_start = i.start;
      cur_end = i.end;
      open = true;
    } else {
      cur_end = std::max(cur_end, i.end);
    }
  }
  if (open) total += cur_end - cur_start;
  return static_cast<double>(total) / 1e9;
}

std::vector<StallShare> top_by_stall(std::vector<StallShare> v, std::size_t n) {
  v.erase(std::remove_if(v.begin(), v.end(),
                         [](const StallShare& s) {
                           return s.faults == 0 && s.stall_ns == 0 && s.gpu_faults == 0;
                         }),
          v.end());
  // GPU faults cost the kernels time the pager does not see: they order rows of equal stall.
  std::stable_sort(v.begin(), v.end(), [](const StallShare& a, const StallShare& b) {
    return a.stall_ns != b.stall_ns ? a.stall_ns > b.stall_ns : a.gpu_faults > b.gpu_faults;
  });
  if (v.size() > n) v.resize(n);
  return v;
}

}  // namespace

ProfileSummary summarize(const Recording& rec, std::size_t top_n) {
  ProfileSummary s;
  s.command = rec.command;
  s.pid = rec.pid;
  s.exit_code = rec.exit_code;
  s.events = rec.events.size();
  s.dropped = rec.dropped;
  s.trace_complete = rec.dropped == 0;
  std::uint64_t t0 = rec.start_ns, t1 = rec.end_ns;
  if (t0 == 0 || t1 <= t0) {
    t0 = rec.events.empty() ? 0 : rec.events.front().time_ns;
    t1 = t0;
    for (const ProfileEvent& e : rec.events) t1 = std::max(t1, e.time_ns + e.duration_ns);
  }
  s.wall_s = static_cast<double>(t1 - t0) / 1e9;

  auto& c = s.counters;
  for (const auto& src : rec.sources) {
    const auto& x = src.counters;
    c.faults += x.faults;
    c.hits += x.hits;
    c.prefetches_issued += x.prefetches_issued;
    c.prefetches_used += x.prefetches_used;
    c.prefetches_wasted += x.prefetches_wasted;
    c.bytes_read += x.bytes_read;
    c.evictions += x.evictions;
    c.stall_ns += x.stall_ns;
    c.resident_bytes += x.resident_bytes;
    c.peak_resident_bytes = std::max(c.peak_resident_bytes, x.peak_resident_bytes);
    c.gpu_faults += x.gpu_faults;
    c.cpu_faults += x.cpu_faults;
    c.migrated_to_device_bytes += x.migrated_to_device_bytes;
    c.migrated_to_host_bytes += x.migrated_to_host_bytes;
    c.budget_bytes = std::max(c.budget_bytes, src.budget_bytes);
    c.page_size = std::max(c.page_size, src.page_size);
    auto join = [](std::string& to, const std::string& v) {
      if (v.empty() || to == v || to.find(v + ",") == 0) return;
      to = to.empty() ? v : to + "," + v;
    };
    join(s.io_path, src.io_path);
    join(s.policy, src.policy);
    if (!src.uvm_counters.empty() && s.uvm_counters.find(src.uvm_counters) == std::string::npos)
      s.uvm_counters += (s.uvm_counters.empty() ? "" : "; ") + src.uvm_counters;
  }
  c.io_path = s.io_path;
  c.uvm_counters = s.uvm_counters;
  const std::uint64_t accesses_counted = c.hits + c.faults;
  s.hit_rate = accesses_counted ? static_cast<double>(c.hits) / accesses_counted : 0;
  s.stall_share = s.wall_s > 0 ? static_cast<double>(c.stall_ns) / 1e9 / s.wall_s : 0;

  const std::vector<std::uint32_t> order = time_order(rec);
  // Faults served together share one start and duration (and sit together in time order):
  // each page of the batch gets its part of the stall.
  std::vector<std::uint32_t> batch_size(rec.events.size(), 1);
  for (std::size_t k = 0; k < order.size();) {
    std::size_t j = k;
    while (j < order.size() && rec.events[order[j]].time_ns == rec.events[order[k]].time_ns) ++j;
    for (std::size_t x = k; j - k > 1 && x < j; ++x) {
      const ProfileEvent& e = rec.events[order[x]];
      if (e.kind != EventKind::fault) continue;
      std::uint32_t n = 0;
      for (std::size_t y = k; y < j; ++y) {
        const ProfileEvent& f = rec.events[order[y]];
        n += f.kind == EventKind::fault && f.duration_ns == e.duration_ns && f.source == e.source;
      }
      batch_size[order[x]] = n;
    }
    k = j;
  }

  std::vector<PageMap> maps;
  maps.reserve(rec.sources.size());
  for (const auto& src : rec.sources) maps.emplace_back(src);
  std::vector<std::uint32_t> on_page;
  // Per layer (by label, merged over sources) and per tensor (per source).
  std::map<std::string, StallShare> layers;
  std::vector<std::vector<StallShare>> tensors(rec.sources.size());
  for (std::size_t i = 0; i < rec.sources.size(); ++i) {
    tensors[i].resize(rec.sources[i].tensors.size());
    for (std::size_t t = 0; t < tensors[i].size(); ++t)
      tensors[i][t].name = rec.sources[i].tensors[t].name;
  }
  auto attribute = [&](const ProfileEvent& e, double stall, bool fault,
                       std::uint64_t gpu_faults = 0) {
    if (e.source >= maps.size()) return;
    const PageMap& m = maps[e.source];
    const PageId p = e.first_page;
    if (const std::int32_t g = m.group(p); g >= 0) {
      StallShare& l = layers[m.labels()[static_cast<std::size_t>(g)]];
      l.stall_ns += stall;
      l.gpu_faults += gpu_faults;
      if (fault) {
        ++l.faults;
        l.bytes += e.bytes;
      }
    }
    m.tensors_on(p, on_page);
    const auto n = static_cast<std::uint32_t>(on_page.size());
    for (std::uint32_t id : on_page) {
      StallShare& t = tensors[e.source][id];
      t.stall_ns += stall / n;
      t.gpu_faults += gpu_faults;  // each tensor on the page was in the way
      if (fault) {
        ++t.faults;
        t.bytes += e.bytes / n;
      }
    }
  };

  std::vector<Interval> reading;
  std::vector<std::vector<PageId>> trace(rec.sources.size());
  for (std::uint32_t idx : order) {
    const ProfileEvent& e = rec.events[idx];
    switch (e.kind) {
      case EventKind::fault: {
        const std::uint32_t n = batch_size[idx];
        attribute(e, static_cast<double>(e.duration_ns) / n, true);
        reading.push_back({e.time_ns, e.time_ns + e.duration_ns});
        s.read_bytes_events += e.bytes;
        if (e.source < trace.size()) trace[e.source].push_back(e.first_page);
        break;
      }
      case EventKind::hit:
        if (e.source < trace.size()) trace[e.source].push_back(e.first_page);
        break;
      case EventKind::stall:
        attribute(e, static_cast<double>(e.duration_ns), false);
        break;
      case EventKind::prefetch_done:
        reading.push_back({e.time_ns, e.time_ns + e.duration_ns});
        s.read_bytes_events += e.bytes;
        break;
      case EventKind::gpu_fault:  // bytes: the number of faults on the page
        attribute(e, 0, false, e.bytes);
        break;
      case EventKind::prefetch_issued:
      case EventKind::evict:
      case EventKind::migrate_to_device:
      case EventKind::migrate_to_host:
        break;
    }
  }
  s.read_busy_s = union_seconds(reading);
  s.read_bandwidth = s.read_busy_s > 0 ? s.read_bytes_events / s.read_busy_s : 0;

  for (std::size_t i = 0; i < rec.sources.size(); ++i) {
    const auto& src = rec.sources[i];
    s.accesses += trace[i].size();
    s.run_fetches += src.counters.faults + src.counters.prefetches_issued;
    const std::size_t cap = std::max<std::uint64_t>(src.pool_pages, 1);
    s.belady_fetches += runtime::belady_fetches(trace[i], cap);
    s.lru_fetches += runtime::lru_fetches(trace[i], cap);
  }
  const double per_fetch = s.run_fetches ? static_cast<double>(c.bytes_read) / s.run_fetches : 0;
  s.belady_bytes = static_cast<double>(s.belady_fetches) * per_fetch;

  std::vector<StallShare> layer_rows;
  for (auto& [name, row] : layers) {
    row.name = name;
    layer_rows.push_back(row);
  }
  s.layers = top_by_stall(std::move(layer_rows), top_n);
  std::vector<StallShare> tensor_rows;
  for (auto& per_source : tensors)
    for (auto& row : per_source) tensor_rows.push_back(std::move(row));
  s.tensors = top_by_stall(std::move(tensor_rows), top_n);
  return s;
}

std::string format_summary(const ProfileSummary& s) {
  const auto& c = s.counters;
  auto ms = [](double ns) { return fmt::format("{:.1f} ms", ns / 1e6); };
  std::string out;
  auto line = [&](std::string_view key, const std::string& value) {
    out += fmt::format("  {:<22} {}\n", key, value);
  };
  out += fmt::format("profile of `{}` (pid {}, exit {})\n", s.command, s.pid, s.exit_code);
  line("wall time", fmt::format("{:.3f} s", s.wall_s));
  line("faults", std::to_string(c.faults));
  line("hits", std::to_string(c.hits));
  line("hit rate", fmt::format("{:.1f} %", 100 * s.hit_rate));
  line("bytes read", format_size(c.bytes_read));
  line("read bandwidth",
       fmt::format("{}/s (reading {:.3f} s)",
                   format_size(static_cast<std::uint64_t>(s.read_bandwidth)), s.read_busy_s));
  line("stall time", fmt::format("{} ({:.1f} % of wall time)", ms(static_cast<double>(c.stall_ns)),
                                 100 * s.stall_share));
  line("prefetches", fmt::format("{} issued, {} used, {} wasted", c.prefetches_issued,
                                 c.prefetches_used, c.prefetches_wasted));
  line("evictions", std::to_string(c.evictions));
  line("peak resident", format_size(c.peak_resident_bytes));
  line("budget", format_size(c.budget_bytes));
  line("page size", format_size(c.page_size));
  line("io path", s.io_path.empty() ? "-" : s.io_path);
  line("policy", s.policy.empty() ? "-" : s.policy);
  if (s.unified_memory()) {
    line("uvm counters", s.uvm_counters);
    line("GPU page faults", fmt::format("{} (CPU page faults {})", c.gpu_faults, c.cpu_faults));
    line("migrated by driver",
         fmt::format("{} to the device, {} to the host", format_size(c.migrated_to_device_bytes),
                     format_size(c.migrated_to_host_bytes)));
  }
  line("events", fmt::format("{} recorded, {} dropped", s.events, s.dropped));
  out += fmt::format("\nagainst the best schedule for this budget ({} accesses{}):\n", s.accesses,
                     s.trace_complete ? "" : "; incomplete: events were dropped");
  line("fetches",
       fmt::format("run {}, Belady {}, LRU {}", s.run_fetches, s.belady_fetches, s.lru_fetches));
  line("bytes", fmt::format("run {}, Belady ~{} ({:.2f}x the optimum)", format_size(c.bytes_read),
                            format_size(static_cast<std::uint64_t>(s.belady_bytes)),
                            s.belady_bytes > 0 ? c.bytes_read / s.belady_bytes : 0.0));
  auto table = [&](std::string_view title, const std::vector<StallShare>& rows) {
    if (rows.empty()) return;
    out += fmt::format("\n{:<44} {:>10} {:>8} {:>10}", title, "stall", "faults", "read");
    out += s.unified_memory() ? fmt::format(" {:>10}\n", "GPU faults") : "\n";
    for (const StallShare& r : rows) {
      out += fmt::format("  {:<42} {:>10} {:>8} {:>10}", r.name, ms(r.stall_ns), r.faults,
                         format_size(r.bytes));
      out += s.unified_memory() ? fmt::format(" {:>10}\n", r.gpu_faults) : "\n";
    }
  };
  table("by layer", s.layers);
  table("by tensor", s.tensors);
  return out;
}

nlohmann::json summary_json(const ProfileSummary& s) {
  const auto& c = s.counters;
  auto rows = [](const std::vector<StallShare>& v) {
    nlohmann::json a = nlohmann::json::array();
    for (const StallShare& r : v)
      a.push_back({{"name", r.name},
                   {"stall_ns", r.stall_ns},
                   {"faults", r.faults},
                   {"bytes", r.bytes},
                   {"gpu_faults", r.gpu_faults}});
    return a;
  };
  return {{"command", s.command},
          {"pid", s.pid},
          {"exit_code", s.exit_code},
          {"wall_s", s.wall_s},
          {"faults", c.faults},
          {"hits", c.hits},
          {"hit_rate", s.hit_rate},
          {"bytes_read", c.bytes_read},
          {"read_busy_s", s.read_busy_s},
          {"read_bandwidth", s.read_bandwidth},
          {"stall_ns", c.stall_ns},
          {"stall_share", s.stall_share},
          {"prefetches_issued", c.prefetches_issued},
          {"prefetches_used", c.prefetches_used},
          {"prefetches_wasted", c.prefetches_wasted},
          {"evictions", c.evictions},
          {"peak_resident_bytes", c.peak_resident_bytes},
          {"budget_bytes", c.budget_bytes},
          {"page_size", c.page_size},
          {"io_path", s.io_path},
          {"policy", s.policy},
          {"uvm_counters", s.uvm_counters},
          {"gpu_faults", c.gpu_faults},
          {"cpu_faults", c.cpu_faults},
          {"migrated_to_device_bytes", c.migrated_to_device_bytes},
          {"migrated_to_host_bytes", c.migrated_to_host_bytes},
          {"events", s.events},
          {"dropped", s.dropped},
          {"belady",
           {{"accesses", s.accesses},
            {"run_fetches", s.run_fetches},
            {"belady_fetches", s.belady_fetches},
            {"lru_fetches", s.lru_fetches},
            {"run_bytes", c.bytes_read},
            {"belady_bytes", s.belady_bytes},
            {"trace_complete", s.trace_complete}}},
          {"layers", rows(s.layers)},
          {"tensors", rows(s.tensors)}};
}

}  // namespace lema::tools
