#include "lema/trainer/train_options.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include <spdlog/fmt/fmt.h>

#include "lema/base/error.hpp"

namespace lema::trainer {

namespace {

template <typename T>
void require(bool ok, const char* flag, T value, std::string_view rule) {
  if (!ok) {
    throw InvalidArgument(fmt::format("{} {} is out of range: {}", flag, value, rule));
  }
}

}  // namespace

void validate(const TrainOptions& o) {
  require(o.steps >= 1, "--steps", o.steps, "it must be at least 1");
  require(o.batch >= 1, "--batch", o.batch, "it must be at least 1");
  require(o.seq_len >= 2, "--seq-len", o.seq_len, "a sequence needs at least 2 tokens");
  require(o.grad_accum >= 1, "--grad-accum", o.grad_accum, "it must be at least 1");
  require(o.lr > 0 && std::isfinite(o.lr), "--lr", o.lr, "it must be positive");
  require(o.weight_decay >= 0 && std::isfinite(o.weight_decay), "--weight-decay", o.weight_decay,
          "it must be ≥ 0 and finite");
  require(o.beta1 >= 0 && o.beta1 < 1, "--beta1", o.beta1, "it must be in [0, 1)");
  require(o.beta2 >= 0 && o.beta2 < 1, "--beta2", o.beta2, "it must be in [0, 1)");
  require(o.eps > 0, "--eps", o.eps, "it must be positive");
  require(o.warmup_steps >= 0, "--warmup-steps", o.warmup_steps, "it must be ≥ 0");
  require(o.min_lr_ratio >= 0 && o.min_lr_ratio <= 1, "--min-lr-ratio", o.min_lr_ratio,
          "it must be in [0, 1]");
  require(o.schedule_steps >= 0, "--schedule-steps", o.schedule_steps, "it must be ≥ 0");
  require(o.max_grad_norm >= 0 && std::isfinite(o.max_grad_norm), "--max-grad-norm",
          o.max_grad_norm, "it must be ≥ 0 and finite (0: off)");
  require(o.save_every >= 0, "--save-every", o.save_every, "it must be ≥ 0 (0: only at the end)");
  const auto horizon = o.schedule_steps > 0 ? o.schedule_steps : o.steps;
  require(o.warmup_steps <= horizon, "--warmup-steps", o.warmup_steps,
          fmt::format("the warm-up must end by the end of the schedule, step {}", horizon));
  // Every token of the run must be countable: steps × grad-accum × batch × seq-len in int64.
  std::int64_t tokens = 0;
  if (__builtin_mul_overflow(o.steps, o.grad_accum, &tokens) ||
      __builtin_mul_overflow(tokens, o.batch, &tokens) ||
      __builtin_mul_overflow(tokens, o.seq_len, &tokens)) {
    throw InvalidArgument(fmt::format(
        "--steps {} × --grad-accum {} × --batch {} × --seq-len {} tokens is beyond counting; "
        "lower them",
        o.steps, o.grad_accum, o.batch, o.seq_len));
  }
  if (o.out_dir.empty()) throw InvalidArgument("--out is empty; name an output directory");
}

double scheduled_lr(const TrainOptions& o, std::int64_t step) {
  const auto warmup = o.warmup_steps;
  if (warmup > 0 && step <= warmup) {
    return o.lr * static_cast<double>(step) / static_cast<double>(warmup);
  }
  const auto horizon = o.schedule_steps > 0 ? o.schedule_steps : o.steps;
  const double lr_min = o.lr * o.min_lr_ratio;
  const double span = static_cast<double>(std::max<std::int64_t>(1, horizon - warmup));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  return lr_min + (o.lr - lr_min) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace lema::trainer
