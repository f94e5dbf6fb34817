// The trace policy's promise, checked on the real Pager (its threads, Reader, pool and backend),
// not on a simulator: on a repeating access sequence, a pager driven by the trace policy fetches
// per step exactly what Belady's MIN fetches for the same budget, and resident bytes never
// exceed the budget.
//
// Note [Comparing against MIN in steady state]: on a periodic sequence MIN settles into a regime
// that repeats every m steps, and m can exceed one step (a cyclic scan of n pages in c < n - 1
// frames does not cost the same every step). The pager, once the policy has learned the period,
// is MIN started from whatever was resident then; its state at step boundaries (the resident
// set: every page of these sequences is used every step, so next uses never tie) also cycles.
// So fetches are compared summed over a window that is a multiple of both cycles, against how
// much belady_fetches (which starts empty) grows when that many steps are appended to a run
// already in its regime.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/policy.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {
namespace {

using runtime::Lease;
using runtime::PageId;
using runtime::Pager;
using runtime::PagerOptions;
using runtime::PolicyKind;
using Seq = std::vector<PageId>;

// Small pages keep the files and the run small; every tensor is a whole number of pages, so each
// fetch reads exactly one page of file bytes.
constexpr std::uint64_t kPage = 4_KiB;
constexpr int kLayers = 4;

/// A Llama-named checkpoint of U8 tensors: embedding 2 pages; per layer q 1, k 1, v 1, o 1,
/// gate 2 pages (so layers are 6 pages); norm 1 and lm_head 2 pages.
struct Model {
  Model()
      : dir("pager-belady"),
        ckpt(io::Checkpoint::open(write(dir.path()))),
        backend(runtime::make_host_backend(kPage)),
        space(*backend, runtime::Layout::plan(ckpt, kPage)) {
    for (const auto& t : ckpt.tensors()) expected.emplace(t.name, file_bytes(ckpt, t));
    // The pages of each layout group, in layout order.
    const runtime::Layout& layout = space.layout();
    for (const auto& t : layout.tensors()) {
      if (groups.size() <= t.group) groups.resize(t.group + 1, {kNone, 0});
      auto& [first, end] = groups[t.group];
      first = std::min<PageId>(first, static_cast<PageId>(t.offset / kPage));
      end =
          std::max<PageId>(end, static_cast<PageId>(align_up(t.offset + t.nbytes, kPage) / kPage));
    }
    // Page contents as the file holds them, for checking what the pager maps.
    page_bytes.assign(space.page_count(), std::vector<std::byte>(kPage, std::byte{0}));
    for (const auto& t : layout.tensors()) {
      const auto& src = expected.at(t.name);
      for (std::uint64_t i = 0; i < t.nbytes; ++i)
        page_bytes[(t.offset + i) / kPage][(t.offset + i) % kPage] = src[i];
    }
  }

  static std::filesystem::path write(const std::filesystem::path& dir) {
    std::vector<std::pair<std::string, std::uint64_t>> specs{{"model.embed_tokens.weight", 2}};
    for (int l = 0; l < kLayers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      for (const char* name :
           {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
        specs.emplace_back(p + name + ".weight", 1);
      specs.emplace_back(p + "mlp.gate_proj.weight", 2);
    }
    specs.emplace_back("model.norm.weight", 1);
    specs.emplace_back("lm_head.weight", 2);
    std::vector<io::TensorToWrite> tensors;
    for (const auto& [name, pages] : specs) {
      io::TensorToWrite t;
      t.name = name;
      t.dtype = io::Dtype::U8;
      t.shape = {static_cast<std::int64_t>(pages * kPage)};
      t.fill = [name = name](std::span<std::byte> out, std::uint64_t offset) {
        for (std::size_t k = 0; k < out.size(); ++k) out[k] = pattern_byte(name, offset + k);
      };
      tensors.push_back(std::move(t));
    }
    const auto path = dir / "model.safetensors";
    io::write_safetensors(path, std::move(tensors));
    return path;
  }

  static constexpr PageId kNone = std::numeric_limits<PageId>::max();
  TempDir dir;
  io::Checkpoint ckpt;
  std::unique_ptr<runtime::Backend> backend;
  runtime::AddressSpace space;
  std::map<std::string, std::vector<std::byte>> expected;
  std::vector<std::pair<PageId, PageId>> groups;  // [first, end) pages per layout group
  std::vector<std::vector<std::byte>> page_bytes;
};

const Model& model() {
  static const Model m;
  return m;
}

/// A training step: every group forward (embedding, layers, tail), then backward in reverse,
/// each group's pages in ascending order.
Seq forward_backward(const Model& m) {
  Seq step;
  for (const auto& [first, end] : m.groups)
    for (PageId p = first; p < end; ++p) step.push_back(p);
  for (auto g = m.groups.rbegin(); g != m.groups.rend(); ++g)
    for (PageId p = g->first; p < g->second; ++p) step.push_back(p);
  return step;
}

/// Every page once, in address order (a cyclic scan: LRU's worst case).
Seq cyclic_scan(const Model& m) {
  Seq step(m.space.page_count());
  std::iota(step.begin(), step.end(), PageId{0});
  return step;
}

Seq repeat(const Seq& step, std::size_t times) {
  Seq out;
  for (std::size_t i = 0; i < times; ++i) out.insert(out.end(), step.begin(), step.end());
  return out;
}

/// Reference MIN from empty with one step of lookahead beyond `steps`: the sorted resident set
/// at the start of each step.
std::vector<Seq> min_states(const Seq& step, std::size_t capacity, std::size_t steps) {
  const Seq seq = repeat(step, steps + 1);
  constexpr std::size_t kNever = std::numeric_limits<std::size_t>::max();
  std::vector<std::size_t> next(seq.size(), kNever);
  std::map<PageId, std::size_t> upcoming;
  for (std::size_t i = seq.size(); i-- > 0;) {
    if (auto it = upcoming.find(seq[i]); it != upcoming.end()) next[i] = it->second;
    upcoming[seq[i]] = i;
  }
  std::map<PageId, std::size_t> next_of;  // resident page -> its next use
  std::vector<Seq> states;
  for (std::size_t s = 0; s < steps; ++s) {
    Seq state;
    for (const auto& entry : next_of) state.push_back(entry.first);
    states.push_back(std::move(state));
    for (std::size_t i = s * step.size(); i < (s + 1) * step.size(); ++i) {
      if (!next_of.count(seq[i]) && next_of.size() == capacity) {
        next_of.erase(std::max_element(next_of.begin(), next_of.end(),
                                       [](auto& a, auto& b) { return a.second < b.second; }));
      }
      next_of[seq[i]] = next[i];
    }
  }
  return states;
}

/// The first repetition in a state sequence: a cycle of `length` steps from step `first`.
struct Cycle {
  std::size_t first = 0;
  std::size_t length = 0;  // 0: no state repeats
  explicit operator bool() const { return length > 0; }
};

Cycle find_cycle(const std::vector<Seq>& states, std::size_t from = 0) {
  for (std::size_t j = from + 1; j < states.size(); ++j)
    for (std::size_t i = from; i < j; ++i)
      if (states[i] == states[j]) return {i, j - i};
  return {};
}

enum class Prefetch { off, quiesced, free_running };

struct Mode {
  Prefetch prefetch = Prefetch::off;
  std::size_t depth = PagerOptions{}.prefetch_depth;
};

std::string describe(const Mode& mode);
void PrintTo(const Mode& mode, std::ostream* os) {
  *os << describe(mode);
}

std::string describe(const Mode& mode) {
  switch (mode.prefetch) {
    case Prefetch::off:
      return "prefetch off";
    case Prefetch::quiesced:
      return "prefetch depth " + std::to_string(mode.depth) + ", quiesced after each access";
    case Prefetch::free_running:
      return "prefetch depth " + std::to_string(mode.depth) + ", free running";
  }
  return "";
}

/// What a real Pager did, step by step.
struct PagerRun {
  std::vector<std::uint64_t> fetches;  // faults + prefetches issued during each step
  std::vector<std::uint64_t> bytes;    // bytes read during each step
  std::vector<Seq> states;             // resident pages at the start of each step
  runtime::PagerStats last;
  bool bytes_ok = true;
};

PagerRun run_pager(const Model& m, const Seq& step, std::size_t capacity, PolicyKind policy,
                   const Mode& mode, std::size_t steps) {
  PagerOptions opt;
  opt.budget_bytes = capacity * kPage;
  opt.policy = policy;
  opt.prefetch = mode.prefetch != Prefetch::off;
  opt.prefetch_depth = mode.depth;
  opt.reader.direct = false;  // the files are tiny and warm; O_DIRECT adds nothing here
  Pager pager(const_cast<runtime::AddressSpace&>(m.space), opt);
  PagerRun run;
  std::uint64_t fetches_before = 0, bytes_before = 0;
  for (std::size_t s = 0; s < steps; ++s) {
    Seq state;
    for (PageId p = 0; p < m.space.page_count(); ++p)
      if (pager.is_resident(p)) state.push_back(p);
    run.states.push_back(std::move(state));
    for (PageId p : step) {
      Lease lease = pager.acquire_pages({p, 1});
      if (std::memcmp(m.space.page_address(p), m.page_bytes[p].data(), kPage) != 0)
        run.bytes_ok = false;
      pager.release(std::move(lease));
      if (mode.prefetch == Prefetch::quiesced) pager.quiesce();
    }
    // Counters are read with the prefetcher idle, so a step's count is complete.
    pager.quiesce();
    const runtime::PagerStats st = pager.stats();
    run.fetches.push_back(st.faults + st.prefetches_issued - fetches_before);
    run.bytes.push_back(st.bytes_read - bytes_before);
    fetches_before = st.faults + st.prefetches_issued;
    bytes_before = st.bytes_read;
    EXPECT_LE(st.peak_resident_bytes, st.budget_bytes) << "after step " << s;
    EXPECT_LE(st.resident_bytes, st.budget_bytes) << "after step " << s;
    run.last = st;
  }
  EXPECT_EQ(run.last.budget_bytes, capacity * kPage);
  return run;
}

// The policy has learned the period after two steps (Note [Period detection]); one more step
// lets the resident set settle.
constexpr std::size_t kLearnSteps = 3;
constexpr std::size_t kMinSteps = 16;
constexpr std::size_t kMaxSteps = 128;

std::uint64_t belady_growth(const Seq& step, std::size_t capacity, std::size_t warm,
                            std::size_t steps) {
  return runtime::belady_fetches(repeat(step, warm + steps), capacity) -
         runtime::belady_fetches(repeat(step, warm), capacity);
}

std::uint64_t lru_growth(const Seq& step, std::size_t capacity, std::size_t warm,
                         std::size_t steps) {
  return runtime::lru_fetches(repeat(step, warm + steps), capacity) -
         runtime::lru_fetches(repeat(step, warm), capacity);
}

struct Comparison {
  std::size_t window = 0;  // steps compared
  std::uint64_t pager = 0, belady = 0, lru = 0;
  std::uint64_t pager_bytes = 0;
};

/// Sums over a window that is a multiple of both steady-state cycles (Note [Comparing against
/// MIN in steady state]).
Comparison compare(const Model& m, const Seq& step, std::size_t capacity, const Mode& mode) {
  Comparison cmp;
  // Long cycles (a cyclic scan in few frames) need longer runs to show.
  Cycle min_cycle, pager_cycle;
  PagerRun run;
  for (std::size_t steps = kMinSteps; steps <= kMaxSteps && !(min_cycle && pager_cycle);
       steps *= 2) {
    min_cycle = find_cycle(min_states(step, capacity, steps));
    run = run_pager(m, step, capacity, PolicyKind::trace, mode, steps);
    EXPECT_TRUE(run.bytes_ok) << "a page's bytes differ from the file";
    pager_cycle = find_cycle(run.states, kLearnSteps);
  }
  EXPECT_TRUE(min_cycle);
  EXPECT_TRUE(pager_cycle) << "the pager's resident set never repeats";
  if (!min_cycle || !pager_cycle) return cmp;
  cmp.window = std::lcm(min_cycle.length, pager_cycle.length);
  const std::size_t first = pager_cycle.first;
  if (first + cmp.window > run.fetches.size())
    run = run_pager(m, step, capacity, PolicyKind::trace, mode, first + cmp.window);
  for (std::size_t s = first; s < first + cmp.window; ++s) {
    cmp.pager += run.fetches[s];
    cmp.pager_bytes += run.bytes[s];
  }
  cmp.belady = belady_growth(step, capacity, min_cycle.first + 1, cmp.window);
  cmp.lru = lru_growth(step, capacity, 4, cmp.window);
  return cmp;
}

std::vector<std::size_t> capacities(const Model& m) {
  const std::size_t n = m.space.page_count();
  return {1, 2, 3, 5, n / 4, n / 2, n - 1, n};
}

struct Sequence {
  const char* name;
  Seq step;
};

std::vector<Sequence> sequences(const Model& m) {
  return {{"forward/backward", forward_backward(m)}, {"cyclic scan", cyclic_scan(m)}};
}

void print_row(const char* sequence, std::size_t capacity, const Mode& mode, std::size_t window,
               std::uint64_t pager, std::uint64_t belady, std::uint64_t lru) {
  std::printf(
      "%-17s %2zu frames, %-42s over %3zu step(s): pager %4llu, Belady %4llu, LRU %4llu "
      "fetches\n",
      sequence, capacity, describe(mode).c_str(), window, static_cast<unsigned long long>(pager),
      static_cast<unsigned long long>(belady), static_cast<unsigned long long>(lru));
}

class TraceEqualsBelady : public ::testing::TestWithParam<Mode> {};

// With prefetch off the pager is single-threaded and deterministic; with the prefetcher
// quiesced after every access it is deterministic with prefetch on too. Either way its fetches
// (demand faults plus prefetches) equal MIN's exactly, and so do its bytes (every page is full).
TEST_P(TraceEqualsBelady, InSteadyState) {
  const Model& m = model();
  ASSERT_EQ(m.space.page_count(), 2u + kLayers * 6u + 3u);
  for (const Sequence& seq : sequences(m)) {
    for (std::size_t c : capacities(m)) {
      SCOPED_TRACE(std::string(seq.name) + ", " + std::to_string(c) + " of " +
                   std::to_string(m.space.page_count()) + " pages, " + describe(GetParam()));
      const Comparison cmp = compare(m, seq.step, c, GetParam());
      ASSERT_GT(cmp.window, 0u);
      EXPECT_EQ(cmp.pager, cmp.belady) << "over " << cmp.window << " steps; LRU: " << cmp.lru;
      EXPECT_EQ(cmp.pager_bytes, cmp.pager * kPage);
      if (c == m.space.page_count() / 4)
        print_row(seq.name, c, GetParam(), cmp.window, cmp.pager, cmp.belady, cmp.lru);
    }
  }
}

std::string mode_name(const ::testing::TestParamInfo<Mode>& info) {
  if (info.param.prefetch == Prefetch::off) return "PrefetchOff";
  return "QuiescedPrefetchDepth" + std::to_string(info.param.depth);
}

INSTANTIATE_TEST_SUITE_P(Pager, TraceEqualsBelady,
                         ::testing::Values(Mode{Prefetch::off}, Mode{Prefetch::quiesced, 1}),
                         mode_name);
// The default depth (8): several pages claimed in one prefetch round, each in place of the
// victim MIN names with the earlier claims counted as resident.
INSTANTIATE_TEST_SUITE_P(DeepPrefetch, TraceEqualsBelady,
                         ::testing::Values(Mode{Prefetch::quiesced}), mode_name);

// A free-running prefetcher races the next acquire: while the caller pins the page it just
// asked for, that page cannot be the prefetcher's victim even when MIN would evict it, so the
// prefetcher may take another page and cost a fetch MIN does not make. What stays exact is the
// accounting (every fetch reads one full page, counted once) and the bounds: never fewer
// fetches than MIN, never more resident bytes than the budget, always the file's bytes.
TEST(TraceWithFreeRunningPrefetch, NeverBeatsBeladyAndStaysWithinBudget) {
  const Model& m = model();
  constexpr std::size_t kSteps = 10;
  for (const Sequence& seq : sequences(m)) {
    for (std::size_t c : capacities(m)) {
      const Mode mode{Prefetch::free_running};
      SCOPED_TRACE(std::string(seq.name) + ", " + std::to_string(c) + " pages, " + describe(mode));
      const PagerRun run = run_pager(m, seq.step, c, PolicyKind::trace, mode, kSteps);
      EXPECT_TRUE(run.bytes_ok) << "a page's bytes differ from the file";
      std::uint64_t fetched = 0, bytes = 0;
      for (std::size_t s = kLearnSteps; s < kSteps; ++s) {
        fetched += run.fetches[s];
        bytes += run.bytes[s];
      }
      const std::uint64_t belady = belady_growth(seq.step, c, kLearnSteps, kSteps - kLearnSteps);
      // MIN is optimal from any start, up to what the start holds.
      EXPECT_GE(fetched + c, belady);
      EXPECT_EQ(bytes, fetched * kPage);
      const runtime::PagerStats& st = run.last;
      EXPECT_EQ(st.bytes_read, (st.faults + st.prefetches_issued) * kPage);
      EXPECT_LE(st.prefetches_used + st.prefetches_wasted, st.prefetches_issued);
      if (c == m.space.page_count() / 4)
        print_row(seq.name, c, mode, kSteps - kLearnSteps, fetched, belady,
                  lru_growth(seq.step, c, kLearnSteps, kSteps - kLearnSteps));
    }
  }
}

// LRU through the real pager fetches what the LRU simulator predicts (the comparison the
// benchmark prints beside the trace policy's).
TEST(LruPager, FetchesWhatTheLruSimulatorPredicts) {
  const Model& m = model();
  constexpr std::size_t kSteps = 4;
  for (const Sequence& seq : sequences(m)) {
    for (std::size_t c : capacities(m)) {
      SCOPED_TRACE(std::string(seq.name) + ", " + std::to_string(c) + " pages");
      const PagerRun run = run_pager(m, seq.step, c, PolicyKind::lru, Mode{}, kSteps);
      EXPECT_TRUE(run.bytes_ok);
      const std::uint64_t fetched =
          std::accumulate(run.fetches.begin(), run.fetches.end(), std::uint64_t{0});
      EXPECT_EQ(fetched, runtime::lru_fetches(repeat(seq.step, kSteps), c));
    }
  }
}

}  // namespace
}  // namespace lema::test
