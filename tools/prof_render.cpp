// `lema prof report --chrome/--svg`: a recording drawn as a Chrome trace and as an SVG timeline.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "lema/base/units.hpp"
#include "prof_report.hpp"

namespace lema::tools {

using runtime::EventKind;
using runtime::ProfileEvent;
using runtime::Recording;

namespace {

void append_json(std::string& out, std::string_view s) {
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      fmt::format_to(std::back_inserter(out), "\\u{:04x}", static_cast<int>(ch));
    } else {
      out += ch;
    }
  }
}

void append_xml(std::string& out, std::string_view s) {
  for (char ch : s) {
    if (ch == '<')
      out += "&lt;";
    else if (ch == '>')
      out += "&gt;";
    else if (ch == '&')
      out += "&amp;";
    else if (ch == '"')
      out += "&quot;";
    else if (static_cast<unsigned char>(ch) >= 0x20)
      out += ch;
  }
}

std::pair<std::uint64_t, std::uint64_t> time_span(const Recording& rec) {
  std::uint64_t t0 = rec.start_ns, t1 = rec.end_ns;
  std::uint64_t first = ~std::uint64_t{0}, last = 0;
  for (const ProfileEvent& e : rec.events) {
    first = std::min(first, e.time_ns);
    last = std::max(last, e.time_ns + e.duration_ns);
  }
  if (rec.events.empty()) first = last = t0;
  if (t0 == 0 || t0 > first) t0 = first;
  t1 = std::max(t1, last);
  if (t1 <= t0) t1 = t0 + 1;
  return {t0, t1};
}

}  // namespace

// Note [Trace lanes]: complete events on one thread track must nest. Faults of different
// threads, and prefetches next to faults, overlap without nesting, so each kind of each source
// gets lanes (tids): an event goes to the first lane free at its start. Faults served as one
// batch (same start and duration) become one event.
void write_chrome_trace(const Recording& rec, std::ostream& os) {
  const auto [t0, t1] = time_span(rec);
  (void)t1;
  std::vector<PageMap> maps;
  for (const auto& src : rec.sources) maps.emplace_back(src);
  std::vector<std::uint32_t> on_page;
  std::string out;
  out.reserve(rec.events.size() * 160 + 4096);
  out += "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  bool first = true;
  auto sep = [&] {
    if (!first) out += ",\n";
    first = false;
  };
  auto pid_of = [&](std::uint16_t source) {
    return source < rec.sources.size() && rec.sources[source].pid ? rec.sources[source].pid
                                                                  : rec.pid;
  };
  for (std::size_t i = 0; i < rec.sources.size(); ++i) {
    sep();
    out += fmt::format(
        "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{},\"tid\":0,\"ts\":0,\"args\":{{"
        "\"name\":\"",
        pid_of(static_cast<std::uint16_t>(i)));
    append_json(out, rec.command.empty() ? std::string("lema") : rec.command);
    out += "\"}}";
  }
  // lanes[source][kind] = end time of the last event in each lane
  enum Lane { kFault, kPrefetch, kStall, kGpuFault, kMigration, kLaneKinds };
  constexpr const char* kLaneName[] = {"faults", "prefetches", "stalls", "GPU faults",
                                       "migrations"};
  std::vector<std::array<std::vector<std::uint64_t>, kLaneKinds>> lanes(
      std::max<std::size_t>(rec.sources.size(), 1));
  auto lane_for = [&](std::uint16_t source, Lane kind, std::uint64_t start, std::uint64_t end) {
    auto& v = lanes[source < lanes.size() ? source : 0][kind];
    std::size_t i = 0;
    while (i < v.size() && v[i] > start) ++i;
    if (i == v.size()) {
      v.push_back(end);
      const int tid = static_cast<int>(source) * 1000 + kind * 100 + static_cast<int>(i) + 1;
      sep();
      out += fmt::format(
          "{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{},\"tid\":{},\"ts\":0,"
          "\"args\":{{\"name\":\"{} {}\"}}}}",
          pid_of(source), tid, kLaneName[kind], i + 1);
    } else {
      v[i] = end;
    }
    return static_cast<int>(source) * 1000 + kind * 100 + static_cast<int>(i) + 1;
  };
  auto where = [&](const ProfileEvent& e) {
    std::string w;
    if (e.source >= maps.size()) return w;
    const PageMap& m = maps[e.source];
    if (const std::int32_t g = m.group(e.first_page); g >= 0) {
      w += ",\"layer\":\"";
      append_json(w, m.labels()[static_cast<std::size_t>(g)]);
      w += "\"";
    }
    m.tensors_on(e.first_page, on_page);
    if (!on_page.empty()) {
      w += ",\"tensor\":\"";
      append_json(w, rec.sources[e.source].tensors[on_page.front()].name);
      w += "\"";
    }
    return w;
  };
  const auto order = time_order(rec);
  const auto us = [t0 = t0](std::uint64_t ns) { return static_cast<double>(ns - t0) / 1e3; };
  for (std::size_t k = 0; k < order.size(); ++k) {
    const ProfileEvent& e = rec.events[order[k]];
    switch (e.kind) {
      case EventKind::fault: {
        std::uint64_t bytes = e.bytes;
        std::size_t n = 1;
        while (k + 1 < order.size()) {  // the rest of its batch
          const ProfileEvent& f = rec.events[order[k + 1]];
          if (f.kind != EventKind::fault || f.time_ns != e.time_ns ||
              f.duration_ns != e.duration_ns || f.source != e.source)
            break;
          bytes += f.bytes;
          ++n;
          ++k;
        }
        const int tid = lane_for(e.source, kFault, e.time_ns, e.time_ns + e.duration_ns);
        sep();
        out += fmt::format(
            "{{\"ph\":\"X\",\"cat\":\"pager\",\"name\":\"fault\",\"pid\":{},\"tid\":{},"
            "\"ts\":{:.3f},\"dur\":{:.3f},\"args\":{{\"page\":{},\"pages\":{},\"bytes\":{}{}}}}}",
            pid_of(e.source), tid, us(e.time_ns), e.duration_ns / 1e3, e.first_page, n, bytes,
            where(e));
        break;
      }
      case EventKind::prefetch_done:
      case EventKind::stall: {
        const bool pf = e.kind == EventKind::prefetch_done;
        const int tid =
            lane_for(e.source, pf ? kPrefetch : kStall, e.time_ns, e.time_ns + e.duration_ns);
        sep();
        out += fmt::format(
            "{{\"ph\":\"X\",\"cat\":\"pager\",\"name\":\"{}\",\"pid\":{},\"tid\":{},"
            "\"ts\":{:.3f},\"dur\":{:.3f},\"args\":{{\"page\":{},\"pages\":{},\"bytes\":{}{}}}}}",
            pf ? "prefetch" : "stall", pid_of(e.source), tid, us(e.time_ns), e.duration_ns / 1e3,
            e.first_page, e.page_count, e.bytes, where(e));
        break;
      }
      case EventKind::evict:
        sep();
        out += fmt::format(
            "{{\"ph\":\"i\",\"s\":\"p\",\"cat\":\"pager\",\"name\":\"evict\",\"pid\":{},"
            "\"tid\":0,\"ts\":{:.3f},\"args\":{{\"page\":{}{}}}}}",
            pid_of(e.source), us(e.time_ns), e.first_page, where(e));
        break;
      // Over unified memory, the driver's side: GPU page faults it served (bytes: their number)
      // and its migrations, timed by CUPTI.
      case EventKind::gpu_fault: {
        const int tid = lane_for(e.source, kGpuFault, e.time_ns, e.time_ns + e.duration_ns);
        sep();
        out += fmt::format(
            "{{\"ph\":\"X\",\"cat\":\"driver\",\"name\":\"GPU fault\",\"pid\":{},\"tid\":{},"
            "\"ts\":{:.3f},\"dur\":{:.3f},\"args\":{{\"page\":{},\"faults\":{}{}}}}}",
            pid_of(e.source), tid, us(e.time_ns), e.duration_ns / 1e3, e.first_page, e.bytes,
            where(e));
        break;
      }
      case EventKind::migrate_to_device:
      case EventKind::migrate_to_host: {
        const int tid = lane_for(e.source, kMigration, e.time_ns, e.time_ns + e.duration_ns);
        sep();
        out += fmt::format(
            "{{\"ph\":\"X\",\"cat\":\"driver\",\"name\":\"{}\",\"pid\":{},\"tid\":{},"
            "\"ts\":{:.3f},\"dur\":{:.3f},\"args\":{{\"page\":{},\"pages\":{},\"bytes\":{}{}}}}}",
            e.kind == EventKind::migrate_to_device ? "to device" : "to host", pid_of(e.source), tid,
            us(e.time_ns), e.duration_ns / 1e3, e.first_page, e.page_count, e.bytes, where(e));
        break;
      }
      case EventKind::hit:
      case EventKind::prefetch_issued:
        break;
    }
    if (out.size() > (8u << 20)) {
      os.write(out.data(), static_cast<std::streamsize>(out.size()));
      out.clear();
    }
  }
  out += "\n]}\n";
  os.write(out.data(), static_cast<std::streamsize>(out.size()));
}

// ---- SVG ----

namespace {

/// 1, 2 or 5 × 10^k just above range / target.
double nice_step(double range, int target) {
  if (range <= 0) return 1;
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

template <typename... T>
void emit(std::string& out, fmt::format_string<T...> format, T&&... args) {
  fmt::format_to(std::back_inserter(out), format, std::forward<T>(args)...);
}

}  // namespace

// Note [Timeline density]: a run has up to millions of events; drawing each would make an SVG
// no viewer opens. Events are binned into one cell per pixel column and page row, and each kind
// is drawn as a single path of horizontal runs of occupied cells, so the file stays small and
// the picture reads the same.
void write_svg(const Recording& rec, std::ostream& os) {
  const auto [t0, t1] = time_span(rec);
  constexpr int kW = 1200, kLeft = 100, kRight = 40, kTop = 70, kPlotH = 420, kGap = 60;
  constexpr int kResH = 130, kBottom = 50;
  constexpr int kPlotW = kW - kLeft - kRight;
  constexpr int kH = kTop + kPlotH + kGap + kResH + kBottom;
  const int res_top = kTop + kPlotH + kGap;

  // Sources stacked on the page axis.
  std::vector<std::uint64_t> page_offset(rec.sources.size() + 1, 0);
  for (std::size_t i = 0; i < rec.sources.size(); ++i)
    page_offset[i + 1] = page_offset[i] + std::max<std::uint64_t>(rec.sources[i].page_count, 1);
  const std::uint64_t pages = std::max<std::uint64_t>(page_offset.back(), 1);
  const int rows = static_cast<int>(std::min<std::uint64_t>(pages, kPlotH));
  const double row_h = static_cast<double>(kPlotH) / rows;
  const double span = static_cast<double>(t1 - t0);
  auto col_of = [&](std::uint64_t t) {
    const double c = (static_cast<double>(t - std::min(t, t0))) / span * kPlotW;
    return std::clamp(static_cast<int>(c), 0, kPlotW - 1);
  };
  auto row_of = [&](std::uint64_t page) {  // row 0 at the bottom
    return std::clamp(static_cast<int>(page * rows / pages), 0, rows - 1);
  };
  auto y_of_row = [&](int row) { return kTop + kPlotH - (row + 1) * row_h; };

  enum Kind { kEvict, kPrefetch, kFault, kKinds };
  std::vector<std::vector<std::uint8_t>> cells(
      kKinds, std::vector<std::uint8_t>(std::size_t(kPlotW) * rows));
  std::vector<std::uint8_t> stalled(kPlotW, 0);
  // Resident pages per source, reconstructed from the events; max per column.
  std::vector<std::int64_t> resident(rec.sources.size(), 0);
  std::int64_t resident_total = 0;
  std::vector<std::int64_t> res_col(kPlotW, -1);
  const double page_bytes =
      rec.sources.empty() ? 0.0 : static_cast<double>(rec.sources[0].page_size);
  for (std::uint32_t idx : time_order(rec)) {
    const ProfileEvent& e = rec.events[idx];
    const std::uint64_t base = e.source < rec.sources.size() ? page_offset[e.source] : 0;
    const int col = col_of(e.time_ns);
    auto mark = [&](Kind k) {
      const std::uint32_t n = std::max<std::uint32_t>(e.page_count, 1);
      const int r0 = row_of(base + e.first_page), r1 = row_of(base + e.first_page + n - 1);
      for (int r = r0; r <= r1; ++r) cells[k][std::size_t(r) * kPlotW + col] = 1;
    };
    auto resident_add = [&](std::int64_t d) {
      if (e.source >= resident.size()) return;
      const std::int64_t before = resident[e.source];
      resident[e.source] = std::max<std::int64_t>(0, before + d);
      resident_total += resident[e.source] - before;
      res_col[col] = std::max(res_col[col], resident_total);
    };
    switch (e.kind) {
      case EventKind::fault:
        mark(kFault);
        resident_add(1);
        for (int c = col, end = col_of(e.time_ns + e.duration_ns); c <= end; ++c) stalled[c] = 1;
        break;
      case EventKind::prefetch_done:
        mark(kPrefetch);
        resident_add(1);
        break;
      case EventKind::evict:
        mark(kEvict);
        resident_add(-1);
        break;
      case EventKind::stall:
        for (int c = col, end = col_of(e.time_ns + e.duration_ns); c <= end; ++c) stalled[c] = 1;
        break;
      case EventKind::hit:
      case EventKind::prefetch_issued:
      // The driver's work over unified memory: in the table and the Chrome trace only.
      case EventKind::gpu_fault:
      case EventKind::migrate_to_device:
      case EventKind::migrate_to_host:
        break;
    }
  }

  std::string out;
  out.reserve(1 << 20);
  emit(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
  emit(out,
       "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
       "font-family=\"sans-serif\" font-size=\"12\">\n",
       kW, kH, kW, kH);
  emit(out, "<rect width=\"{}\" height=\"{}\" fill=\"white\"/>\n", kW, kH);
  std::string title = "lema prof: ";
  append_xml(title, rec.command.empty() ? std::string("(unnamed run)") : rec.command);
  emit(out, "<text x=\"{}\" y=\"22\" font-size=\"16\" font-weight=\"bold\">{}</text>\n", kLeft,
       title);
  std::uint64_t faults = 0, bytes = 0, stall = 0, budget = 0;
  for (const auto& s : rec.sources) {
    faults += s.counters.faults;
    bytes += s.counters.bytes_read;
    stall += s.counters.stall_ns;
    budget += s.budget_bytes;
  }
  emit(out,
       "<text x=\"{}\" y=\"42\" fill=\"#444\">{:.3f} s, {} faults, {} read, stall {:.1f} ms "
       "({:.1f} % "
       "of wall time), budget {}</text>\n",
       kLeft, span / 1e9, faults, format_size(bytes), stall / 1e6, 100.0 * stall / span,
       format_size(budget));

  // Layer bands and labels (Note: pages of one layer are contiguous, see layout.hpp).
  emit(out, "<g id=\"layers\">\n");
  for (std::size_t i = 0; i < rec.sources.size(); ++i) {
    const PageMap m(rec.sources[i]);
    int band = 0;
    for (const PageMap::Band& b : m.bands()) {
      const double y_hi = kTop + kPlotH - double(page_offset[i] + b.end) * kPlotH / pages;
      const double y_lo = kTop + kPlotH - double(page_offset[i] + b.first) * kPlotH / pages;
      if (band++ % 2 == 0)
        emit(out, "<rect x=\"{}\" y=\"{:.1f}\" width=\"{}\" height=\"{:.1f}\" fill=\"#f2f2f2\"/>\n",
             kLeft, y_hi, kPlotW, y_lo - y_hi);
      if (y_lo - y_hi >= 11) {
        std::string label;
        append_xml(label, m.labels()[static_cast<std::size_t>(b.group)]);
        emit(out,
             "<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\" font-size=\"10\" "
             "fill=\"#666\">{}</text>\n",
             kLeft - 6, (y_hi + y_lo) / 2 + 3, label);
      }
    }
  }
  emit(out, "</g>\n");

  // The waiting strip above the plot: columns where the program stalled on a page.
  emit(
      out,
      "<g id=\"stalls\"><text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"10\">waiting</text>"
      "<path fill=\"#ff7f0e\" d=\"",
      kLeft - 6, kTop - 6);
  for (int c = 0; c < kPlotW;) {
    if (!stalled[c]) {
      ++c;
      continue;
    }
    int d = c;
    while (d < kPlotW && stalled[d]) ++d;
    emit(out, "M{} {}h{}v6h-{}z", kLeft + c, kTop - 14, d - c, d - c);
    c = d;
  }
  emit(out, "\"/></g>\n");

  constexpr const char* kId[] = {"evictions", "prefetches", "faults"};
  constexpr const char* kColor[] = {"#9e9e9e", "#1f77b4", "#d62728"};
  for (int k = 0; k < kKinds; ++k) {
    emit(out, "<path id=\"{}\" fill=\"{}\" d=\"", kId[k], kColor[k]);
    for (int r = 0; r < rows; ++r) {
      const std::uint8_t* row = &cells[k][std::size_t(r) * kPlotW];
      const double h = std::max(row_h, 1.0);
      for (int c = 0; c < kPlotW;) {
        if (!row[c]) {
          ++c;
          continue;
        }
        int d = c;
        while (d < kPlotW && row[d]) ++d;
        emit(out, "M{} {:.1f}h{}v{:.1f}h-{}z", kLeft + c, y_of_row(r), std::max(d - c, 1), h,
             std::max(d - c, 1));
        c = d;
      }
    }
    emit(out, "\"/>\n");
  }

  // Axes of the main plot.
  emit(out,
       "<g id=\"axes\" stroke=\"#333\" fill=\"none\"><rect x=\"{}\" y=\"{}\" width=\"{}\" "
       "height=\"{}\"/><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/></g>\n",
       kLeft, kTop, kPlotW, kPlotH, kLeft, res_top, kPlotW, kResH);
  const double secs = span / 1e9;
  const double xstep = nice_step(secs, 10);
  for (double t = 0; t <= secs + 1e-12; t += xstep) {
    const double x = kLeft + t / secs * kPlotW;
    for (int y : {kTop + kPlotH, res_top + kResH})
      emit(out, "<line x1=\"{:.1f}\" y1=\"{}\" x2=\"{:.1f}\" y2=\"{}\" stroke=\"#333\"/>\n", x, y,
           x, y + 5);
    emit(out, "<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:g}</text>\n", x,
         res_top + kResH + 18, t);
  }
  emit(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since start (s)</text>\n",
       kLeft + kPlotW / 2, kH - 10);
  const double ystep = nice_step(static_cast<double>(pages), 8);
  for (double p = 0; p <= pages; p += ystep) {
    const double y = kTop + kPlotH - p / pages * kPlotH;
    emit(out, "<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#333\"/>\n",
         kLeft + kPlotW, y, kLeft + kPlotW + 5, y);
    emit(out, "<text x=\"{}\" y=\"{:.1f}\" font-size=\"10\">{:g}</text>\n", kLeft + kPlotW + 7,
         y + 3, p);
  }
  emit(out,
       "<text transform=\"translate({},{}) rotate(90)\" text-anchor=\"middle\">page (address "
       "&#8593;)</text>\n",
       kW - 8, kTop + kPlotH / 2);

  // Resident bytes against the budget.
  const double peak_pages = static_cast<double>(*std::max_element(res_col.begin(), res_col.end()));
  const double budget_pages = page_bytes > 0 ? static_cast<double>(budget) / page_bytes : 0;
  const double ymax = std::max({peak_pages, budget_pages, 1.0}) * 1.1;
  auto res_y = [&](double v) { return res_top + kResH - v / ymax * kResH; };
  emit(out,
       "<polyline id=\"resident\" fill=\"none\" stroke=\"#2ca02c\" stroke-width=\"1.5\" points=\"");
  std::int64_t last = 0;
  for (int c = 0; c < kPlotW; ++c) {
    if (res_col[c] >= 0) last = res_col[c];
    emit(out, "{},{:.1f} ", kLeft + c, res_y(static_cast<double>(last)));
  }
  emit(out, "\"/>\n");
  if (budget_pages > 0)
    emit(out,
         "<line id=\"budget\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#000\" "
         "stroke-dasharray=\"6,4\"/>\n<text x=\"{}\" y=\"{:.1f}\" font-size=\"10\">budget "
         "{}</text>\n",
         kLeft, res_y(budget_pages), kLeft + kPlotW, res_y(budget_pages), kLeft + 4,
         res_y(budget_pages) - 3, format_size(budget));
  emit(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">resident</text>\n", kLeft - 6,
       res_top + kResH / 2);
  emit(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"10\">0</text>\n", kLeft - 6,
       res_top + kResH);

  // Legend.
  emit(out, "<g id=\"legend\" font-size=\"11\">\n");
  const std::pair<const char*, const char*> legend[] = {{"#d62728", "fault (demand read)"},
                                                        {"#1f77b4", "prefetch"},
                                                        {"#9e9e9e", "eviction"},
                                                        {"#ff7f0e", "program waiting"},
                                                        {"#2ca02c", "resident bytes"}};
  int lx = kW - kRight - 5 * 130;
  for (const auto& [color, text] : legend) {
    emit(out,
         "<rect x=\"{}\" y=\"50\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" "
         "y=\"59\">{}</text>\n",
         lx, color, lx + 14, text);
    lx += 130;
  }
  emit(out, "</g>\n</svg>\n");
  os.write(out.data(), static_cast<std::streamsize>(out.size()));
}

}  // namespace lema::tools
