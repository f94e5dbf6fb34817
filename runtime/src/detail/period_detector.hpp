// Finds the period of a repeating access sequence online (Note [Period detection]).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "lema/runtime/policy.hpp"

namespace lema::runtime::detail {

// Note [Period detection]
// ~~~~~~~~~~~~~~~~~~~~~~~
// A training step walks the same pages in the same order every step (forward through the layers,
// backward in reverse), so a page occurs several times per step and "the first recurrence of a
// page" is not the step. The detector records the accesses since it started, h[0..n), and keeps
// KMP's prefix function of that recording; the smallest period of the whole recording is then
// p = n - border(n), updated in O(1) amortised per access. The recording is confirmed periodic
// once it holds two full periods (n >= 2p) and at least `min_length_` accesses. By Fine and
// Wilf's theorem a recording of a P-periodic sequence that is >= 2P long has smallest period
// exactly P, so a confirmation can only be wrong while the recording is short and repeats by
// chance (a layer spanning two pages read by several micro-batches: A B A B A B). When a learned
// period breaks, the policy makes the detector stricter (min_length_ doubles), so chance
// repetitions cannot make it oscillate: after a few breaks only a whole step confirms.
// A recording that started in an irregular stretch (a one-off access) never becomes periodic as
// a whole; when it reaches `window_` accesses unconfirmed, its older half is dropped (the prefix
// function is rebuilt in O(n), amortised O(1)) and the window doubles, up to `max_length_`.
// Periods longer than max_length_ / 2 are not learned.
class PeriodDetector {
 public:
  explicit PeriodDetector(std::size_t max_length)
      : max_length_(std::max<std::size_t>(max_length, 4 * kInitialMinLength)) {}

  /// Appends one access. Returns true when the recording has just been confirmed periodic;
  /// cycle() then holds one period.
  bool push(PageId page) {
    rec_.push_back(page);
    const std::size_t n = rec_.size();
    std::uint32_t k = 0;
    if (n > 1) {
      k = border_.back();
      while (k > 0 && rec_[k] != page) k = border_[k - 1];
      if (rec_[k] == page) ++k;
    }
    border_.push_back(k);
    const std::size_t p = n - k;
    if (2 * p <= n && n >= min_length_) {
      period_ = p;
      return true;
    }
    if (n >= window_) {
      drop_older_half();
      window_ = std::min(2 * window_, max_length_);
    }
    return false;
  }

  /// The last period of a confirmed recording, starting with the access expected next.
  std::span<const PageId> cycle() const {
    return std::span<const PageId>(rec_).subspan(rec_.size() - period_);
  }

  /// Forgets the recording (after a confirmation was taken, or when a learned period broke).
  void restart(std::size_t expected_period = 0) {
    rec_.clear();
    border_.clear();
    period_ = 0;
    window_ = std::clamp<std::size_t>(4 * expected_period, kInitialWindow, max_length_);
    window_ = std::max(window_, std::min(2 * min_length_, max_length_));
  }

  /// A learned period broke: demand longer recordings before confirming again.
  void make_stricter() {
    min_length_ = std::min(2 * min_length_, max_length_ / 2);
    restart();
  }

 private:
  static constexpr std::size_t kInitialMinLength = 8;
  static constexpr std::size_t kInitialWindow = 256;

  void drop_older_half() {
    rec_.erase(rec_.begin(), rec_.begin() + static_cast<std::ptrdiff_t>(rec_.size() / 2));
    border_.assign(rec_.size(), 0);
    for (std::size_t i = 1; i < rec_.size(); ++i) {
      std::uint32_t k = border_[i - 1];
      while (k > 0 && rec_[k] != rec_[i]) k = border_[k - 1];
      if (rec_[k] == rec_[i]) ++k;
      border_[i] = k;
    }
  }

  std::vector<PageId> rec_;
  std::vector<std::uint32_t> border_;  // border_[i]: longest proper border of rec_[0..i]
  std::size_t period_ = 0;
  std::size_t max_length_;
  std::size_t min_length_ = kInitialMinLength;
  std::size_t window_ = kInitialWindow;
};

}  // namespace lema::runtime::detail
