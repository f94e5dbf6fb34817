// Eviction policies: Belady/LRU simulators on textbook cases, the lru policy, and the trace
// policy (learning, prediction, re-learning, Belady-optimal fetches in steady state).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {
namespace {

using Seq = std::vector<PageId>;

Seq repeat(const Seq& step, std::size_t times) {
  Seq out;
  for (std::size_t i = 0; i < times; ++i) out.insert(out.end(), step.begin(), step.end());
  return out;
}

/// One training step of a model: pages of layers 0..L-1 forward, then L-1..0 backward (each
/// layer's pages in reverse too), with an embedding page first and a head page in the middle.
Seq training_step(PageId layers, PageId pages_per_layer) {
  const PageId embed = 0, head = 1 + layers * pages_per_layer;
  Seq s{embed};
  for (PageId l = 0; l < layers; ++l)
    for (PageId p = 0; p < pages_per_layer; ++p) s.push_back(1 + l * pages_per_layer + p);
  s.push_back(head);
  s.push_back(head);  // loss and its gradient: a repeat in a row
  for (PageId l = layers; l-- > 0;)
    for (PageId p = pages_per_layer; p-- > 0;) s.push_back(1 + l * pages_per_layer + p);
  s.push_back(embed);
  return s;
}

Seq cyclic_scan(PageId pages) {
  Seq s;
  for (PageId p = 0; p < pages; ++p) s.push_back(p);
  return s;
}

/// A scan with a hot page between every two pages, then a short forward/backward tail.
Seq mixed_step() {
  Seq s;
  for (PageId p = 1; p <= 8; ++p) {
    s.push_back(p);
    if (p % 2 == 0) s.push_back(0);
  }
  for (PageId p : {9u, 10u, 11u, 11u, 10u, 9u}) s.push_back(p);
  return s;
}

Seq random_step(std::mt19937& rng, PageId pages, std::size_t length) {
  std::uniform_int_distribution<PageId> pick(0, pages - 1);
  Seq s(length);
  for (auto& p : s) p = pick(rng);
  return s;
}

/// The learned period of a step as the trace policy counts it: repeats in a row collapsed,
/// also across the boundary between steps.
std::size_t collapsed_period(const Seq& step) {
  Seq c;
  for (PageId p : repeat(step, 2))
    if (c.empty() || c.back() != p) c.push_back(p);
  while (c.size() > 1 && c.front() == c.back()) c.pop_back();
  // The smallest period of the collapsed cyclic sequence.
  for (std::size_t p = 1; p <= c.size(); ++p) {
    if (c.size() % p != 0) continue;
    bool ok = true;
    for (std::size_t i = p; i < c.size() && ok; ++i) ok = c[i] == c[i - p];
    if (ok) return p;
  }
  return c.size();
}

std::size_t distinct_pages(const Seq& s) {
  Seq d = s;
  std::sort(d.begin(), d.end());
  return static_cast<std::size_t>(std::unique(d.begin(), d.end()) - d.begin());
}

// Note [Steady-state optimum]
// On a periodic sequence MIN settles into a regime that repeats every m steps, and m can exceed
// one step (a cyclic scan of 10 pages in 8 frames costs 20 fetches every 9 steps, not the same
// number each step). The trace policy, once it has learned the period, applies MIN's rule to the
// periodic future, so a pager driven by it is MIN started from whatever was resident then: the
// tests check that exactly, step by step, against a reference MIN started from the same frames.
// Against belady_fetches (which starts empty) they compare sums over K steps in steady state,
// where K is a multiple of both regimes' lengths (found by watching the resident set at step
// boundaries repeat): MIN from any start has the same fetch rate, and appending K steps to a
// long run grows belady_fetches by exactly K steps of its regime, because the end of both runs
// starts from the same regime state.

/// Belady's MIN as a reference: starting with `resident`, serves `steps` repetitions of `step`
/// with one more step of lookahead (so no decision sees the end). Fetches and the sorted
/// resident set at the start of each step.
struct MinRun {
  std::vector<std::uint64_t> fetches;
  std::vector<Seq> states;
};

MinRun reference_min(const Seq& step, std::size_t capacity, Seq resident, std::size_t steps) {
  const Seq seq = repeat(step, steps + 1);
  constexpr std::size_t kNever = std::numeric_limits<std::size_t>::max();
  std::vector<std::size_t> next(seq.size(), kNever);
  std::map<PageId, std::size_t> upcoming;
  for (std::size_t i = seq.size(); i-- > 0;) {
    auto it = upcoming.find(seq[i]);
    if (it != upcoming.end()) next[i] = it->second;
    upcoming[seq[i]] = i;
  }
  std::map<PageId, std::size_t> next_of;  // resident page -> its next use
  for (PageId p : resident) next_of[p] = upcoming.count(p) ? upcoming[p] : kNever;
  MinRun run;
  for (std::size_t s = 0; s < steps; ++s) {
    Seq state;
    for (const auto& [p, n] : next_of) state.push_back(p);
    run.states.push_back(state);
    std::uint64_t fetches = 0;
    for (std::size_t i = s * step.size(); i < (s + 1) * step.size(); ++i) {
      if (!next_of.count(seq[i])) {
        ++fetches;
        if (next_of.size() == capacity) {
          auto victim = std::max_element(next_of.begin(), next_of.end(),
                                         [](auto& a, auto& b) { return a.second < b.second; });
          next_of.erase(victim);
        }
      }
      next_of[seq[i]] = next[i];
    }
    run.fetches.push_back(fetches);
  }
  return run;
}

/// First step index and length of the cycle of a deterministic state sequence; nullopt when no
/// state repeats.
std::optional<std::pair<std::size_t, std::size_t>> find_cycle(const std::vector<Seq>& states) {
  for (std::size_t j = 1; j < states.size(); ++j)
    for (std::size_t i = 0; i < j; ++i)
      if (states[i] == states[j]) return std::make_pair(i, j - i);
  return std::nullopt;
}

std::uint64_t sum(std::span<const std::uint64_t> v) {
  return std::accumulate(v.begin(), v.end(), std::uint64_t{0});
}

/// belady_fetches grows by this much when `k` steps are appended to `n` steps.
std::uint64_t belady_growth(const Seq& step, std::size_t capacity, std::size_t n, std::size_t k) {
  return belady_fetches(repeat(step, n + k), capacity) - belady_fetches(repeat(step, n), capacity);
}

std::uint64_t lru_growth(const Seq& step, std::size_t capacity, std::size_t n, std::size_t k) {
  return lru_fetches(repeat(step, n + k), capacity) - lru_fetches(repeat(step, n), capacity);
}

/// A tiny demand pager driven by a policy: on a miss with every frame full it evicts
/// choose_victim(resident). With `prefetch`, before each access it loads predicted pages into
/// free frames, or in place of the victim when the victim's next use is later than theirs.
class PagingSim {
 public:
  PagingSim(EvictionPolicy& policy, std::size_t page_count, std::size_t capacity, bool prefetch)
      : policy_(policy), capacity_(capacity), prefetch_(prefetch), is_resident_(page_count) {}

  void access(PageId page) {
    policy_.on_access(page);
    if (!is_resident_[page]) {
      ++misses_;
      if (resident_.size() == capacity_) evict(policy_.choose_victim(resident_));
      load(page);
    }
    if (prefetch_) prefetch_ahead();
  }
  std::uint64_t run(const Seq& seq) {
    const std::uint64_t before = fetches_;
    for (PageId p : seq) access(p);
    return fetches_ - before;
  }
  std::uint64_t fetches() const { return fetches_; }
  std::uint64_t prefetches() const { return prefetches_; }
  std::uint64_t misses() const { return misses_; }
  const std::vector<PageId>& victims() const { return victims_; }
  Seq resident_sorted() const {
    Seq r = resident_;
    std::sort(r.begin(), r.end());
    return r;
  }

 private:
  static std::uint64_t far(std::optional<std::uint64_t> use) {
    return use.value_or(std::numeric_limits<std::uint64_t>::max());
  }
  void prefetch_ahead() {
    for (PageId q : policy_.predict_next(capacity_)) {
      if (is_resident_[q]) continue;
      if (resident_.size() == capacity_) {
        const std::optional<PageId> v = policy_.prefetch_victim(q, resident_);
        if (!v) break;
        EXPECT_LT(policy_.next_use(q), far(policy_.next_use(*v)));
        evict(*v);
      }
      load(q);
      ++prefetches_;
    }
  }
  void load(PageId page) {
    ++fetches_;
    is_resident_[page] = true;
    resident_.push_back(page);
    policy_.on_resident(page);
  }
  void evict(PageId page) {
    auto it = std::find(resident_.begin(), resident_.end(), page);
    ASSERT_NE(it, resident_.end()) << "victim " << page << " is not resident";
    resident_.erase(it);
    is_resident_[page] = false;
    victims_.push_back(page);
    policy_.on_evicted(page);
  }

  EvictionPolicy& policy_;
  std::size_t capacity_;
  bool prefetch_;
  std::vector<bool> is_resident_;
  std::vector<PageId> resident_;
  std::vector<PageId> victims_;
  std::uint64_t fetches_ = 0;
  std::uint64_t prefetches_ = 0;
  std::uint64_t misses_ = 0;
};

// ---- simulators ----

TEST(Belady, TextbookReferenceStrings) {
  const Seq silberschatz{7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1};
  EXPECT_EQ(belady_fetches(silberschatz, 3), 9u);
  EXPECT_EQ(lru_fetches(silberschatz, 3), 12u);

  const Seq belady_anomaly{1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5};
  EXPECT_EQ(belady_fetches(belady_anomaly, 3), 7u);
  EXPECT_EQ(belady_fetches(belady_anomaly, 4), 6u);
  EXPECT_EQ(lru_fetches(belady_anomaly, 3), 10u);
  EXPECT_EQ(lru_fetches(belady_anomaly, 4), 8u);
}

TEST(Belady, EdgeCases) {
  EXPECT_EQ(belady_fetches(Seq{}, 1), 0u);
  EXPECT_EQ(belady_fetches(Seq{5, 5, 5}, 1), 1u);
  EXPECT_EQ(belady_fetches(Seq{1, 2, 1, 2}, 1), 4u);
  EXPECT_EQ(belady_fetches(Seq{1, 2, 3, 1, 2, 3}, 3), 3u);  // everything fits: cold misses only
  EXPECT_EQ(lru_fetches(Seq{1, 2, 3, 1, 2, 3}, 3), 3u);
  EXPECT_THROW(belady_fetches(Seq{1}, 0), InvalidArgument);
  EXPECT_THROW(lru_fetches(Seq{1}, 0), InvalidArgument);
  // Page ids need not be dense.
  EXPECT_EQ(belady_fetches(Seq{4000000000u, 7, 4000000000u, 7}, 2), 2u);
}

TEST(Belady, CyclicScanLargerThanCapacity) {
  // LRU misses on every access. MIN evicts the page used just before (furthest next use) and
  // settles into 20 fetches every 9 steps, n (n - c) per n - 1 steps.
  const Seq step = cyclic_scan(10);
  EXPECT_EQ(lru_fetches(repeat(step, 5), 8), 50u);
  EXPECT_EQ(belady_fetches(repeat(step, 2), 8), 12u);
  EXPECT_EQ(belady_growth(step, 8, 2, 9), 20u);
  EXPECT_EQ(belady_growth(step, 8, 4, 18), 40u);
}

TEST(Belady, NeverWorseThanLru) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const Seq s = random_step(rng, 20, 300);
    for (std::size_t c : {1u, 3u, 8u, 19u}) {
      EXPECT_LE(belady_fetches(s, c), lru_fetches(s, c));
    }
  }
}

// ---- the lru policy ----

TEST(Policy, ParseAndMake) {
  EXPECT_EQ(parse_policy("lru"), PolicyKind::lru);
  EXPECT_EQ(parse_policy("trace"), PolicyKind::trace);
  EXPECT_EQ(parse_policy("LRU"), std::nullopt);
  EXPECT_EQ(parse_policy(""), std::nullopt);
  EXPECT_EQ(make_policy(PolicyKind::lru, 4)->name(), "lru");
  EXPECT_EQ(make_policy(PolicyKind::trace, 4)->name(), "trace");
}

TEST(LruPolicy, EvictsLeastRecentlyAccessed) {
  auto lru = make_lru_policy(8);
  for (PageId p : {1u, 2u, 3u, 1u, 4u}) lru->on_access(p);
  EXPECT_EQ(lru->choose_victim(Seq{1, 2, 3, 4}), 2u);
  EXPECT_EQ(lru->choose_victim(Seq{4, 3, 1}), 3u);
  EXPECT_EQ(lru->choose_victim(Seq{4, 6, 5}), 5u);  // never accessed first, then the lower id
  EXPECT_EQ(lru->next_use(1), std::nullopt);
  EXPECT_TRUE(lru->predict_next(4).empty());
  EXPECT_FALSE(lru->has_prediction());
  EXPECT_THROW(lru->on_access(8), InvalidArgument);
}

TEST(LruPolicy, DemandPagingMatchesLruSimulator) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    const Seq s = random_step(rng, 16, 400);
    for (std::size_t c : {1u, 4u, 9u}) {
      auto lru = make_lru_policy(16);
      PagingSim sim(*lru, 16, c, /*prefetch=*/false);
      EXPECT_EQ(sim.run(s), lru_fetches(s, c));
    }
  }
}

// ---- the trace policy ----

TEST(TracePolicy, LearnsTrainingStepAndPredicts) {
  const Seq step = training_step(3, 2);  // pages 0..7
  auto trace = make_trace_policy(8);
  EXPECT_EQ(trace->name(), "trace");
  for (PageId p : step) trace->on_access(p);
  EXPECT_FALSE(trace->has_prediction());  // one step is not yet a repetition
  for (PageId p : repeat(step, 2)) trace->on_access(p);
  ASSERT_TRUE(trace->has_prediction());
  EXPECT_EQ(trace->period_length(), collapsed_period(step));
  EXPECT_EQ(trace->relearns(), 0u);

  // Three whole steps seen: the next accesses are the next step's forward pass.
  EXPECT_EQ(trace->predict_next(4), (Seq{1, 2, 3, 4}));
  EXPECT_EQ(trace->next_use(1), 0u);
  EXPECT_EQ(trace->next_use(4), 3u);
  EXPECT_EQ(trace->next_use(7), 6u);               // the head page, after layers 0..2
  EXPECT_EQ(trace->next_use(0), 13u);              // the embedding: end of the backward pass
  EXPECT_EQ(trace->predict_next(100).size(), 8u);  // distinct pages only

  // Among candidates the furthest next use goes first.
  EXPECT_EQ(trace->choose_victim(Seq{1, 4, 0, 7}), 0u);
  EXPECT_EQ(trace->choose_victim(Seq{1, 4}), 4u);
}

TEST(TracePolicy, PredictsFromAnyPhase) {
  const Seq step = training_step(2, 3);
  auto trace = make_trace_policy(8);
  for (PageId p : repeat(step, 3)) trace->on_access(p);
  ASSERT_TRUE(trace->has_prediction());
  // Half a step further, the prediction is the rest of the current step.
  const std::size_t half = 5;  // embed, 1, 2, 3, 4
  for (std::size_t i = 0; i < half; ++i) trace->on_access(step[i]);
  EXPECT_EQ(trace->predict_next(3), (Seq{5, 6, 7}));
  EXPECT_EQ(trace->next_use(5), 0u);
}

TEST(TracePolicy, WithoutPeriodBehavesAsLru) {
  auto trace = make_trace_policy(8);
  auto lru = make_lru_policy(8);
  for (PageId p : {3u, 1u, 2u, 5u}) {
    trace->on_access(p);
    lru->on_access(p);
  }
  EXPECT_FALSE(trace->has_prediction());
  EXPECT_EQ(trace->choose_victim(Seq{1, 2, 3, 5}), lru->choose_victim(Seq{1, 2, 3, 5}));
  EXPECT_EQ(trace->next_use(1), std::nullopt);
  EXPECT_TRUE(trace->predict_next(4).empty());
}

TEST(TracePolicy, RelearnsWhenTheSequenceChanges) {
  const Seq a = training_step(3, 2);  // pages 0..7
  Seq b = training_step(4, 3);        // pages 0..13, a different step
  auto trace = make_trace_policy(16);
  PagingSim sim(*trace, 16, 5, /*prefetch=*/false);
  for (int i = 0; i < 6; ++i) sim.run(a);
  ASSERT_TRUE(trace->has_prediction());
  EXPECT_EQ(trace->period_length(), collapsed_period(a));

  // The first access that differs from the learned period forgets it.
  std::size_t i = 0;
  while (trace->has_prediction() && i < b.size()) sim.access(b[i++]);
  EXPECT_FALSE(trace->has_prediction());
  EXPECT_EQ(trace->relearns(), 1u);
  for (; i < b.size(); ++i) sim.access(b[i]);

  int learned_after = -1;
  for (int s = 0; s < 12; ++s) {
    sim.run(b);
    if (learned_after < 0 && trace->has_prediction()) learned_after = s;
  }
  ASSERT_GE(learned_after, 0) << "the new sequence was never learned";
  EXPECT_LE(learned_after, 4);
  EXPECT_EQ(trace->period_length(), collapsed_period(b));
  EXPECT_EQ(trace->relearns(), 1u);  // once learned, a steady sequence never breaks it
  // From here on the policy is MIN started from the frames it holds now.
  const MinRun ref = reference_min(b, 5, sim.resident_sorted(), 6);
  for (int s = 0; s < 6; ++s) EXPECT_EQ(sim.run(b), ref.fetches[s]) << "step " << s;
}

TEST(TracePolicy, ChanceRepetitionDoesNotPreventLearning) {
  // A step that opens with a page pair alternating several times (a layer spanning two pages,
  // read by several micro-batches) repeats by chance before the step does.
  Seq step;
  for (int mb = 0; mb < 6; ++mb) {
    step.push_back(0);
    step.push_back(1);
  }
  for (PageId p = 2; p < 10; ++p) step.push_back(p);
  for (PageId p = 10; p-- > 2;) step.push_back(p);
  auto trace = make_trace_policy(10);
  for (PageId p : repeat(step, 12)) trace->on_access(p);
  ASSERT_TRUE(trace->has_prediction());
  EXPECT_EQ(trace->period_length(), collapsed_period(step));
  const std::uint64_t relearns = trace->relearns();
  for (PageId p : repeat(step, 4)) trace->on_access(p);
  EXPECT_EQ(trace->relearns(), relearns);
}

TEST(TracePolicy, IrregularStartDoesNotPreventLearning) {
  // A long non-repeating prelude, then a periodic sequence.
  std::mt19937 rng(3);
  Seq prelude = random_step(rng, 64, 700);
  const Seq step = training_step(5, 2);  // pages 0..11
  auto trace = make_trace_policy(64);
  for (PageId p : prelude) trace->on_access(p);
  for (PageId p : repeat(step, 200)) trace->on_access(p);
  ASSERT_TRUE(trace->has_prediction());
  EXPECT_EQ(trace->period_length(), collapsed_period(step));
}

struct Shape {
  std::string name;
  Seq step;
};

std::vector<Shape> shapes() {
  std::vector<Shape> out{
      {"two_layers", training_step(2, 1)},
      {"three_layers_x2_pages", training_step(3, 2)},
      {"six_layers_x3_pages", training_step(6, 3)},
      {"cyclic_scan_10", cyclic_scan(10)},
      {"mixed", mixed_step()},
  };
  std::mt19937 rng(2024);
  for (int i = 0; i < 8; ++i) {
    out.push_back({"random_" + std::to_string(i), random_step(rng, 12, 15 + 5 * i)});
  }
  return out;
}

/// A pager driven by the trace policy over `steps` steps: fetches per step, the resident set at
/// the start of each step, the first step that starts with a learned period, and the victims.
struct TraceRun {
  std::vector<std::uint64_t> fetches;
  std::vector<Seq> states;
  std::size_t learned = 0;
  std::vector<PageId> victims;
};

TraceRun run_trace(const Seq& step, std::size_t capacity, bool prefetch, std::size_t steps) {
  const std::size_t pages = *std::max_element(step.begin(), step.end()) + 1;
  auto trace = make_trace_policy(pages);
  PagingSim sim(*trace, pages, capacity, prefetch);
  TraceRun run;
  run.learned = steps;
  for (std::size_t s = 0; s < steps; ++s) {
    if (run.learned == steps && trace->has_prediction()) run.learned = s;
    run.states.push_back(sim.resident_sorted());
    run.fetches.push_back(sim.run(step));
  }
  EXPECT_EQ(trace->relearns(), 0u);
  run.victims = sim.victims();
  return run;
}

TEST(TracePolicy, OnceLearnedFetchesExactlyWhatMinFetches) {
  for (const Shape& shape : shapes()) {
    for (std::size_t c = 1; c <= distinct_pages(shape.step); ++c) {
      const std::size_t steps = 30;
      const TraceRun run = run_trace(shape.step, c, /*prefetch=*/false, steps);
      ASSERT_LE(run.learned, 4u) << shape.name;
      const MinRun ref = reference_min(shape.step, c, run.states[run.learned], steps - run.learned);
      for (std::size_t s = run.learned; s < steps; ++s) {
        EXPECT_EQ(run.fetches[s], ref.fetches[s - run.learned])
            << shape.name << " capacity " << c << " step " << s;
      }
    }
  }
}

/// Fetches over K steady-state steps of the trace-driven pager and of belady_fetches, K a
/// multiple of both regimes (Note [Steady-state optimum]).
struct WindowComparison {
  std::size_t window = 0;
  std::uint64_t trace = 0, belady = 0, lru = 0;
};

WindowComparison compare_window(const Seq& step, std::size_t capacity, bool prefetch) {
  const MinRun from_empty = reference_min(step, capacity, {}, 60);
  const auto min_cycle = find_cycle(from_empty.states);
  EXPECT_TRUE(min_cycle.has_value());
  TraceRun run = run_trace(step, capacity, prefetch, 60);
  const auto learned_states = std::vector<Seq>(run.states.begin() + run.learned, run.states.end());
  const auto trace_cycle = find_cycle(learned_states);
  EXPECT_TRUE(trace_cycle.has_value());
  if (!min_cycle || !trace_cycle) return {};
  WindowComparison cmp;
  cmp.window = std::lcm(min_cycle->second, trace_cycle->second);
  const std::size_t first = run.learned + trace_cycle->first;
  run = run_trace(step, capacity, prefetch, first + cmp.window);
  cmp.trace = sum(std::span(run.fetches).subspan(first));
  cmp.belady = belady_growth(step, capacity, min_cycle->first + 1, cmp.window);
  cmp.lru = lru_growth(step, capacity, 4, cmp.window);
  return cmp;
}

TEST(TracePolicy, SteadyStateFetchesEqualBelady) {
  for (const Shape& shape : shapes()) {
    const std::size_t distinct = distinct_pages(shape.step);
    for (std::size_t c = 1; c <= distinct; ++c) {
      for (bool prefetch : {false, true}) {
        const WindowComparison cmp = compare_window(shape.step, c, prefetch);
        EXPECT_EQ(cmp.trace, cmp.belady)
            << shape.name << " capacity " << c << (prefetch ? " with prefetch" : "") << " over "
            << cmp.window << " steps";
        if (c == distinct / 2 && !prefetch) {
          std::printf(
              "%-22s %2zu pages, %2zu frames, over %2zu steps: trace %4llu, Belady %4llu, "
              "LRU %4llu fetches\n",
              shape.name.c_str(), distinct, c, cmp.window,
              static_cast<unsigned long long>(cmp.trace),
              static_cast<unsigned long long>(cmp.belady),
              static_cast<unsigned long long>(cmp.lru));
          ::testing::Test::RecordProperty(shape.name + "_belady", std::to_string(cmp.belady));
          ::testing::Test::RecordProperty(shape.name + "_lru", std::to_string(cmp.lru));
        }
      }
    }
  }
}

TEST(TracePolicy, CyclicScanBeatsLru) {
  const WindowComparison cmp = compare_window(cyclic_scan(12), 8, /*prefetch=*/false);
  EXPECT_EQ(cmp.window, 11u);
  EXPECT_EQ(cmp.trace, cmp.belady);
  EXPECT_EQ(cmp.belady, 12u * 4u);       // n (n - c) per n - 1 steps
  EXPECT_EQ(cmp.lru, 12u * cmp.window);  // LRU misses every access
}

TEST(TracePolicy, PrefetchTurnsMissesIntoHits) {
  const Seq step = cyclic_scan(10);
  auto trace = make_trace_policy(10);
  PagingSim sim(*trace, 10, 5, /*prefetch=*/true);
  for (int s = 0; s < 10; ++s) sim.run(step);
  ASSERT_TRUE(trace->has_prediction());
  const std::uint64_t misses = sim.misses(), prefetches = sim.prefetches();
  const std::uint64_t fetches = sim.run(repeat(step, 9));
  EXPECT_EQ(fetches, belady_growth(step, 5, 4, 9));
  EXPECT_EQ(sim.prefetches() - prefetches, fetches);  // every fetch ahead of its access
  EXPECT_EQ(sim.misses(), misses);
}

TEST(TracePolicy, Deterministic) {
  const TraceRun a = run_trace(mixed_step(), 5, /*prefetch=*/true, 10);
  const TraceRun b = run_trace(mixed_step(), 5, /*prefetch=*/true, 10);
  EXPECT_EQ(a.victims, b.victims);
  EXPECT_FALSE(a.victims.empty());
}

}  // namespace
}  // namespace lema::runtime
