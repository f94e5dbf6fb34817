// The training progress on the terminal: one line redrawn in place when stderr is a terminal,
// a plain line every few steps otherwise (logs, CI).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "lema/runtime/stats.hpp"
#include "lema/trainer/trainer.hpp"

namespace lema::tools {

class ProgressLine {
 public:
  ProgressLine(std::int64_t total_steps, bool terminal)
      : total_(total_steps),
        terminal_(terminal),
        every_(total_steps <= 50 ? 1 : total_steps / 50) {}

  void update(const trainer::StepResult& r, const runtime::PagerStats& s);
  /// Ends the redrawn line.
  void finish();

 private:
  std::int64_t total_;
  bool terminal_;
  std::int64_t every_;
  bool drawn_ = false;
};

}  // namespace lema::tools
