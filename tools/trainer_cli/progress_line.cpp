#include "progress_line.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "lema/base/units.hpp"

namespace lema::tools {

void ProgressLine::update(const trainer::StepResult& r, const runtime::PagerStats& s) {
  const double tokens_per_s = r.step_time_s > 0 ? static_cast<double>(r.tokens) / r.step_time_s : 0;
  const std::string stats = fmt::format(
      "loss {:.4f} | {:.0f} tok/s | {:.2f} s/step | faults {} | resident {} / {}", r.loss,
      tokens_per_s, r.step_time_s, s.faults, format_size(s.resident_bytes),
      format_size(s.budget_bytes));
  if (terminal_) {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(kWidth * std::min<double>(1.0, static_cast<double>(r.step) /
                                                                      static_cast<double>(total_)));
    std::fprintf(stderr, "\r\033[Kstep %ld/%ld [%s%s] %s", static_cast<long>(r.step),
                 static_cast<long>(total_), std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), stats.c_str());
    drawn_ = true;
  } else if (r.step % every_ == 0 || r.step == total_ || r.step == 1) {
    std::fprintf(stderr, "step %ld/%ld %s\n", static_cast<long>(r.step), static_cast<long>(total_),
                 stats.c_str());
  }
  std::fflush(stderr);
}

void ProgressLine::finish() {
  if (drawn_) std::fprintf(stderr, "\n");
  drawn_ = false;
}

}  // namespace lema::tools
