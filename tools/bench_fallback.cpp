// `lema bench fallback`: what the guard fault fallback costs (Note [Guard fault fallback] in
// the runtime), each number against a baseline measured in the same process:
//  - a raw read of a cold page through the fallback (userfaultfd message, Pager::fault_in,
//    map over the placeholder, wake; the evicted page's placeholder remapped) against a
//    fault-mode fault of the same page (UffdRegion: fill into staging, UFFDIO_COPY), the two
//    interleaved page by page under the same budget, from the page cache;
//  - a guard-mode step (every tensor acquired, read whole and released, in layout order then in
//    reverse, as a forward and a backward pass) with the fallback armed against without it:
//    the fallback changes only what an eviction leaves behind, so the difference is the cost of
//    placing registered pages.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "bench_timing.hpp"
#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/runtime/pager.hpp"

namespace lema::tools {
namespace {

using runtime::MappedCheckpoint;
using runtime::PageId;

struct BenchFallbackArgs {
  std::string model;
  std::string budget;  // of the step comparison; default half the model
  std::size_t fault_pages = 4;
  unsigned runs = 5;
  unsigned faults = 256;
};

void warm_page_cache(const MappedCheckpoint& m) {
  std::vector<char> buf(8 << 20);
  for (const auto& f : m.checkpoint().files()) {
    std::ifstream in(f.path, std::ios::binary);
    while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0) {
    }
  }
}

/// The model range's first byte, from any tensor's address and placement.
const std::byte* range_base(const MappedCheckpoint& m) {
  const runtime::TensorPlacement& t = m.layout().tensors().front();
  return m.tensor(t.name).data - t.offset;
}

std::unique_ptr<MappedCheckpoint> open(const std::string& path, runtime::ResidencyMode mode,
                                       std::uint64_t budget, bool fallback) {
  runtime::MappedCheckpointOptions o;
  o.budget_bytes = budget;
  o.mode = mode;
  o.prefetch = false;
  o.fault_fallback = fallback;
  auto m = MappedCheckpoint::open(path, o);
  if (m->mode() != mode)
    throw Error("fault mode is not available here (" + m->fallback_reason() + ")");
  if (mode == runtime::ResidencyMode::guard && fallback && !m->fault_fallback_reason().empty())
    throw Error("the guard fault fallback is not available here (" +
                m->fault_fallback_reason() + ")");
  return m;
}

std::uint64_t touch(const std::byte* p) {
  return static_cast<std::uint64_t>(*reinterpret_cast<const volatile std::uint8_t*>(p));
}

// One cold page read per round on each side, order alternating.
void cold_reads(const BenchFallbackArgs& a) {
  const std::uint64_t page = std::uint64_t{2} << 20;
  auto guard = open(a.model, runtime::ResidencyMode::guard, a.fault_pages * page, true);
  auto fault = open(a.model, runtime::ResidencyMode::fault, a.fault_pages * page, true);
  warm_page_cache(*guard);
  std::vector<PageId> full;  // pages filled completely from the file: equal work per fault
  for (PageId p = 0; p < guard->layout().page_count(); ++p)
    if (guard->layout().page_fill_bytes(p) == page) full.push_back(p);
  if (full.size() <= a.fault_pages)
    throw Error("the model has " + std::to_string(full.size()) + " full pages; the cold-read "
                "comparison needs more than the " + std::to_string(a.fault_pages) +
                " the budget holds");
  const std::byte* gb = range_base(*guard);
  const std::byte* fb = range_base(*fault);
  std::uint64_t sink = 0;
  std::vector<double> ratios;
  for (unsigned run = 0; run < a.runs; ++run) {
    std::vector<double> g, f;
    for (unsigned i = 0; i < a.faults; ++i) {
      const PageId p = full[i % full.size()];  // in order: LRU never holds the next page
      const bool guard_first = i % 2 == 0;
      for (int side = 0; side < 2; ++side) {
        const bool is_guard = (side == 0) == guard_first;
        const std::byte* at = (is_guard ? gb : fb) + p * page + page / 2;
        const auto start = Clock::now();
        sink += touch(at);
        (is_guard ? g : f).push_back(micros_since(start));
      }
    }
    ratios.push_back(median(g) / median(f));
    fmt::print("cold read run {}: fallback {:.1f} µs, fault mode {:.1f} µs, ratio {:.3f} "
               "(medians of {} reads; fallback_faults {}, evictions {})\n",
               run + 1, median(g), median(f), median(g) / median(f), a.faults,
               guard->stats().fallback_faults, guard->stats().evictions);
  }
  fmt::print("cold read: median ratio fallback / fault mode over {} runs: {:.3f} (io path {})\n",
             a.runs, median(ratios), fault->stats().io_path);
  if (sink == 1) fmt::print("\n");  // keeps the reads
}

double step(MappedCheckpoint& m) {
  runtime::Pager& pager = *m.pager();
  const auto& tensors = m.layout().tensors();
  std::uint64_t sum = 0;
  const auto start = Clock::now();
  for (int pass = 0; pass < 2; ++pass) {
    for (std::size_t k = 0; k < tensors.size(); ++k) {
      const auto& t = tensors[pass == 0 ? k : tensors.size() - 1 - k];
      const runtime::TensorAddress addr = m.tensor(t.name);
      runtime::Lease lease = pager.acquire(addr.data, addr.nbytes);
      const auto* words = reinterpret_cast<const std::uint64_t*>(addr.data);
      for (std::uint64_t w = 0; w < addr.nbytes / 8; ++w) sum += words[w];
      pager.release(std::move(lease));
    }
  }
  const double took = micros_since(start) / 1000;
  if (sum == 1) fmt::print("\n");
  return took;
}

void steps(const BenchFallbackArgs& a) {
  auto probe = open(a.model, runtime::ResidencyMode::guard, std::uint64_t{2} << 20, false);
  const std::uint64_t model = probe->layout().virtual_bytes();
  probe.reset();
  const std::uint64_t budget = a.budget.empty() ? model / 2 : parse_size(a.budget);
  // Which of the two is opened first changes its step time by up to a third on some machines
  // (where its pool and reservation land), so each run opens a fresh pair, in turns.
  std::vector<double> ratios;
  for (unsigned run = 0; run < a.runs; ++run) {
    std::unique_ptr<MappedCheckpoint> armed, bare;
    if (run % 2 == 0) {
      armed = open(a.model, runtime::ResidencyMode::guard, budget, true);
      bare = open(a.model, runtime::ResidencyMode::guard, budget, false);
    } else {
      bare = open(a.model, runtime::ResidencyMode::guard, budget, false);
      armed = open(a.model, runtime::ResidencyMode::guard, budget, true);
    }
    warm_page_cache(*armed);
    step(*armed);  // first steps fill from scratch
    step(*bare);
    std::vector<double> on, off;
    for (int i = 0; i < 6; ++i) {
      if (i % 2 == 0) {
        on.push_back(step(*armed));
        off.push_back(step(*bare));
      } else {
        off.push_back(step(*bare));
        on.push_back(step(*armed));
      }
    }
    ratios.push_back(median(on) / median(off));
    fmt::print("guard step run {} ({} opened first): armed {:.2f} ms, without {:.2f} ms, ratio "
               "{:.3f} (medians of 6 steps; budget {} of a {} model, {} evictions a step)\n",
               run + 1, run % 2 == 0 ? "armed" : "without", median(on), median(off),
               ratios.back(), format_size(budget), format_size(model),
               armed->stats().evictions / 7);
  }
  fmt::print("guard step: median ratio armed / without over {} runs: {:.3f}\n", a.runs,
             median(ratios));
}

}  // namespace

void register_bench_fallback(CLI::App& bench) {
  auto args = std::make_shared<BenchFallbackArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "fallback", "The guard fault fallback: a cold raw read against a fault-mode fault, and a "
                  "guard step with the fallback armed against without");
  cmd->add_option("MODEL", args->model, "Checkpoint to use (lema gen makes one)")->required();
  cmd->add_option("--budget", args->budget, "Budget of the step comparison (default: half the "
                                            "model)");
  cmd->add_option("--fault-pages", args->fault_pages,
                  "Budget of the cold-read comparison, in 2 MiB pages")->capture_default_str();
  cmd->add_option("--faults", args->faults, "Cold reads per run and side")->capture_default_str();
  cmd->add_option("--runs", args->runs, "Repetitions")->capture_default_str();
  cmd->callback([args] {
    cold_reads(*args);
    steps(*args);
  });
}

}  // namespace lema::tools
