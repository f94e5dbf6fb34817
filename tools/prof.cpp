// `lema prof`: record a program's paging (record), watch a running one (top), and read a
// recording (report). The program publishes through the runtime's profile segment
// (lema/runtime/profile.hpp); the file format is in lema/runtime/profile_file.hpp.
#include <fmt/core.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/events.hpp"
#include "lema/runtime/profile.hpp"
#include "profile_reader.hpp"
#include "lema/runtime/profile_file.hpp"
#include "prof_preload.hpp"
#include "prof_report.hpp"

extern char** environ;

namespace lema::tools {
namespace {

namespace fs = std::filesystem;

struct RecordArgs {
  std::string output = "lema.lprof";
  std::vector<std::string> command;
};

struct TopArgs {
  int pid = 0;
  bool once = false;
  unsigned interval_ms = 500;
};

struct ReportArgs {
  std::vector<std::string> files;
  std::string chrome;
  std::string svg;
  bool json = false;
  std::size_t top = 10;
};

/// SIGINT/SIGQUIT go to the child (same terminal) while the recorder waits for it, as system().
class IgnoreInterrupts {
 public:
  IgnoreInterrupts() {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGINT, &ignore, &int_);
    sigaction(SIGQUIT, &ignore, &quit_);
  }
  ~IgnoreInterrupts() {
    sigaction(SIGINT, &int_, nullptr);
    sigaction(SIGQUIT, &quit_, nullptr);
  }
  IgnoreInterrupts(const IgnoreInterrupts&) = delete;
  IgnoreInterrupts& operator=(const IgnoreInterrupts&) = delete;

 private:
  struct sigaction int_ {};
  struct sigaction quit_ {};
};

int run_record(const RecordArgs& a) {
  const fs::path out = fs::absolute(a.output);
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view kv(*e);
    if (kv.starts_with(std::string(runtime::kProfileEnv) + "=") ||
        kv.starts_with(std::string(runtime::kProfileRecorderEnv) + "="))
      continue;
    env.emplace_back(kv);
  }
  env.push_back(std::string(runtime::kProfileEnv) + "=" + out.string());
  env.push_back(std::string(runtime::kProfileRecorderEnv) + "=" + std::to_string(::getpid()));
  std::vector<char*> envp, argv;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = a.command;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::string command;
  for (const auto& s : a.command) command += (command.empty() ? "" : " ") + s;

  IgnoreInterrupts ignore;
  ProfileCollector collector(static_cast<std::uint64_t>(::getpid()));
  const std::uint64_t start = runtime::now_ns();
  pid_t child = 0;
  if (const int rc = posix_spawnp(&child, argv[0], nullptr, nullptr, argv.data(), envp.data());
      rc != 0)
    throw Error("cannot run '" + a.command[0] + "': " + std::strerror(rc) +
                " (is it on PATH, or give its path)");
  int status = 0;
  for (;;) {
    collector.poll();
    const pid_t done = ::waitpid(child, &status, WNOHANG);
    if (done == child) break;
    if (done < 0 && errno != EINTR) throw SystemError("waitpid on " + a.command[0], errno);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  runtime::Recording rec = collector.finish();
  rec.end_ns = runtime::now_ns();
  rec.start_ns = start;
  rec.pid = static_cast<std::uint64_t>(child);
  rec.command = command;
  rec.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  runtime::save_recording(rec, out);
  if (WIFSIGNALED(status))
    std::fprintf(
        stderr, "lema prof: %s was killed by signal %d; the profile holds what it did until then\n",
        a.command[0].c_str(), WTERMSIG(status));
  if (rec.sources.empty())
    std::fprintf(
        stderr,
        "lema prof: %s published nothing (it opened no checkpoint through LEMA's runtime)\n",
        a.command[0].c_str());
  std::fprintf(stderr,
               "lema prof: %zu events (%llu dropped) from %zu pager(s) saved to %s; read it with "
               "`lema prof report %s`\n",
               rec.events.size(), static_cast<unsigned long long>(rec.dropped), rec.sources.size(),
               out.c_str(), out.c_str());
  return rec.exit_code;
}

// ---- top ----

// The pids whose segment's owner still runs (pid and start time, Note [Segment owners]); the
// segments of owners that are gone are removed first, so a killed run is never listed as live.
std::vector<int> running_profiled_pids() {
  runtime::ProfileSegment::remove_orphans();
  std::vector<int> pids;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("lema-prof-", 0) != 0) continue;
    const int pid = std::atoi(name.c_str() + 10);
    if (pid <= 0) continue;
    try {
      auto a = runtime::ProfileAttachment::try_attach(name);
      if (a && a->owner_running()) pids.push_back(pid);
    } catch (const std::exception&) {
      // Not a segment this lema reads (another version, another user's): not listed.
    }
  }
  return pids;
}

std::string top_lines(const runtime::ProfileAttachment& a, std::uint64_t events_per_s) {
  std::string out = fmt::format("lema prof top: pid {}, up {:.1f} s, {} events ({}/s)\n", a.pid(),
                                static_cast<double>(runtime::now_ns() - a.created_ns()) / 1e9,
                                a.written(), events_per_s);
  out += fmt::format("{:>3} {:<6} {:>10} {:>10} {:>6} {:>10} {:>10} {:>9} {:>10} {:>10} {:>13}\n",
                     "#", "kind", "faults", "hits", "hit%", "read", "stall", "evicted", "resident",
                     "budget", "prefetch u/w");
  const auto sources = a.sources();
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    const auto& c = s.counters;
    const std::uint64_t acc = c.faults + c.hits;
    out += fmt::format(
        "{:>3} {:<6} {:>10} {:>10} {:>5.1f}% {:>10} {:>8.1f}ms {:>9} {:>10} {:>10} {:>13}{}\n", i,
        s.kind, c.faults, c.hits, acc ? 100.0 * c.hits / acc : 0.0, format_size(c.bytes_read),
        c.stall_ns / 1e6, c.evictions, format_size(c.resident_bytes), format_size(s.budget_bytes),
        fmt::format("{}/{}", c.prefetches_used, c.prefetches_wasted),
        s.close_ns ? " (closed)" : "");
  }
  // Over unified memory, what the driver did in each pager's range (CUPTI's counters).
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const auto& c = sources[i].counters;
    if (sources[i].uvm_counters.empty()) continue;
    if (sources[i].uvm_counters != "on") {
      out += fmt::format("{:>3} unified memory: GPU faults not counted ({})\n", i,
                         sources[i].uvm_counters);
      continue;
    }
    out += fmt::format(
        "{:>3} unified memory: {} GPU faults, {} CPU faults, migrated {} to the device, {} to "
        "the host\n",
        i, c.gpu_faults, c.cpu_faults, format_size(c.migrated_to_device_bytes),
        format_size(c.migrated_to_host_bytes));
  }
  return out;
}

int run_top(const TopArgs& a) {
  int pid = a.pid;
  if (pid == 0) {
    const auto pids = running_profiled_pids();
    if (pids.empty())
      throw Error(
          "no profiled process is running (start one with LEMA_PROFILE=out.lprof, or "
          "under `lema prof record`)");
    if (pids.size() > 1) {
      std::string list;
      for (int p : pids) list += " " + std::to_string(p);
      throw Error("several profiled processes run (" + list.substr(1) +
                  "); name one: lema prof top PID");
    }
    pid = pids.front();
  }
  const std::string name = runtime::ProfileSegment::name_for(pid);
  runtime::ProfileSegment::remove_orphans();
  auto attached = runtime::ProfileAttachment::try_attach(name);
  if (attached && !attached->owner_running())
    throw Error("process " + std::to_string(pid) + " is no longer running; /dev/shm/" + name +
                " is what it left (its recorder still reads it)");
  if (!attached)
    throw Error("process " + std::to_string(pid) + " has no profile segment (/dev/shm/" + name +
                "): it is not running, or runs without LEMA_PROFILE set");
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  std::size_t printed_lines = 0;
  std::uint64_t last_written = attached->written();
  auto last_time = std::chrono::steady_clock::now();
  std::uint64_t rate = 0;
  for (;;) {
    const std::string text = top_lines(*attached, rate);
    if (tty && printed_lines > 0) std::printf("\033[%zuA\033[J", printed_lines);
    std::fputs(text.c_str(), stdout);
    std::fflush(stdout);
    printed_lines = static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
    if (a.once) return 0;
    if (!attached->owner_running()) {
      std::printf("process %d exited\n", pid);
      return 0;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(a.interval_ms));
    const auto now = std::chrono::steady_clock::now();
    const std::uint64_t written = attached->written();
    const double dt = std::chrono::duration<double>(now - last_time).count();
    rate = dt > 0 ? static_cast<std::uint64_t>((written - last_written) / dt) : 0;
    last_written = written;
    last_time = now;
  }
}

// ---- report ----

// Several profiles, one per rank of a data-parallel run (p.rank0.lprof, p.rank1.lprof, ...):
// one line each, then the totals. Each rank pages its own copy of the weights, so the faults and
// bytes read add up, and the rank that stalls most is the one the others wait for.
void run_report_ranks(const ReportArgs& a) {
  if (!a.chrome.empty() || !a.svg.empty()) {
    throw InvalidArgument("--chrome and --svg draw one profile; give one FILE with them");
  }
  std::vector<ProfileSummary> summaries;
  std::vector<nlohmann::json> hooks;  // a file's LD_PRELOAD hook events, or null
  for (const auto& file : a.files) {
    const runtime::Recording rec = runtime::load_recording(file);
    summaries.push_back(summarize(rec, a.top));
    hooks.push_back(rec.preload
                        ? preload_json(summarize_preload(*rec.preload, rec.start_ns, a.top))
                        : nlohmann::json());
  }
  if (a.json) {
    nlohmann::json all = nlohmann::json::array();
    for (std::size_t i = 0; i < summaries.size(); ++i) {
      nlohmann::json j = summary_json(summaries[i]);
      j["file"] = a.files[i];
      if (!hooks[i].is_null()) j["preload"] = hooks[i];
      all.push_back(std::move(j));
    }
    std::cout << all.dump(2) << "\n";
    return;
  }
  std::cout << fmt::format("{:<32} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12} {:>9} {:>7}\n", "profile",
                           "pid", "wall s", "faults", "hits", "hit %", "read", "stall s",
                           "stall %");
  runtime::PagerStats total;
  double worst_stall = -1;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < summaries.size(); ++i) {
    const ProfileSummary& s = summaries[i];
    const auto& c = s.counters;
    std::cout << fmt::format("{:<32} {:>8} {:>8.3f} {:>8} {:>8} {:>7.1f} {:>12} {:>9.3f} {:>7.1f}\n",
                             a.files[i], s.pid, s.wall_s, c.faults, c.hits, 100.0 * s.hit_rate,
                             format_size(c.bytes_read), static_cast<double>(c.stall_ns) * 1e-9,
                             100.0 * s.stall_share);
    total.faults += c.faults;
    total.hits += c.hits;
    total.bytes_read += c.bytes_read;
    total.stall_ns += c.stall_ns;
    if (static_cast<double>(c.stall_ns) > worst_stall) {
      worst_stall = static_cast<double>(c.stall_ns);
      worst = i;
    }
  }
  const double accesses = static_cast<double>(total.faults + total.hits);
  std::cout << fmt::format("{:<32} {:>8} {:>8} {:>8} {:>8} {:>7.1f} {:>12} {:>9.3f}\n", "total", "",
                           "", total.faults, total.hits,
                           accesses > 0 ? 100.0 * static_cast<double>(total.hits) / accesses : 0.0,
                           format_size(total.bytes_read),
                           static_cast<double>(total.stall_ns) * 1e-9);
  std::cout << fmt::format("most stalled: {} ({:.3f} s); the other ranks wait for it at each "
                           "all-reduce\n",
                           a.files[worst], worst_stall * 1e-9);
}

void run_report(const ReportArgs& a) {
  if (a.files.size() > 1) return run_report_ranks(a);
  const runtime::Recording rec = runtime::load_recording(a.files.front());
  const ProfileSummary s = summarize(rec, a.top);
  if (a.json) {
    nlohmann::json j = summary_json(s);
    if (rec.preload)
      j["preload"] = preload_json(summarize_preload(*rec.preload, rec.start_ns, a.top));
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << format_summary(s);
    if (rec.preload)
      std::cout << format_preload(summarize_preload(*rec.preload, rec.start_ns, a.top));
  }
  auto write = [](const std::string& path, auto&& render) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) throw SystemError("cannot write " + path, errno);
    render(f);
    f.close();
    if (!f) throw SystemError("cannot write " + path, errno);
  };
  if (!a.chrome.empty()) write(a.chrome, [&](std::ostream& o) { write_chrome_trace(rec, o); });
  if (!a.svg.empty()) write(a.svg, [&](std::ostream& o) { write_svg(rec, o); });
}

}  // namespace

void register_prof(CLI::App& app) {
  CLI::App* prof = app.add_subcommand(
      "prof", "Profile paging: record a run, watch a running one, report a recording");
  prof->require_subcommand(1);

  auto rec = std::make_shared<RecordArgs>();
  CLI::App* record = prof->add_subcommand(
      "record",
      "Run COMMAND with profiling on and save what its pagers did (lema prof record -o "
      "FILE -- COMMAND ARGS...)");
  record->add_option("-o,--output", rec->output, "Profile file to write")->capture_default_str();
  record->add_option("COMMAND", rec->command, "The program and its arguments, after --")
      ->required()
      ->expected(-1);
  record->callback([rec] {
    const int code = run_record(*rec);
    if (code != 0) throw CLI::RuntimeError(code);
  });

  auto top = std::make_shared<TopArgs>();
  CLI::App* topc = prof->add_subcommand("top", "Show the live counters of a profiled process");
  topc->add_option("PID", top->pid, "Process to watch (default: the only profiled one)");
  topc->add_flag("--once", top->once, "Print one snapshot and exit");
  topc->add_option("--interval", top->interval_ms, "Refresh period in milliseconds")
      ->capture_default_str();
  topc->callback([top] { run_top(*top); });

  auto rep = std::make_shared<ReportArgs>();
  CLI::App* report = prof->add_subcommand("report", "Summarize a recorded profile");
  report->add_option("FILE", rep->files,
                     "A file written by lema prof record; several (one per rank: "
                     "LEMA_PROFILE=p.lprof gives p.rank<R>.lprof) print a line per rank")
      ->required();
  report->add_option("--chrome", rep->chrome, "Also write a Chrome trace (Perfetto) here");
  report->add_option("--svg", rep->svg, "Also write an SVG timeline here");
  report->add_flag("--json", rep->json, "Print the summary as JSON");
  report->add_option("--top", rep->top, "Rows of the per-layer and per-tensor tables")
      ->capture_default_str();
  report->callback([rep] { run_report(*rep); });
}

}  // namespace lema::tools
