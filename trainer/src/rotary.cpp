#include "rotary.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <numbers>

namespace lema::trainer::detail {

// Python's `scalar / tensor` is tensor.reciprocal() * scalar, and `1 - t` is rsub; the same
// operations are used here so the float32 results match transformers exactly.
at::Tensor rope_inv_freq(const ModelConfig& config) {
  const std::int64_t dim = config.head_dim;
  const at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / dim;
  const at::Tensor inv_freq = at::reciprocal(at::pow(config.rope_theta, exponent)) * 1.0;
  if (!config.rope_scaling) return inv_freq;

  const Llama3RopeScaling& s = *config.rope_scaling;
  const auto old_context_len = s.original_max_position_embeddings;
  const double low_freq_wavelen = static_cast<double>(old_context_len) / s.low_freq_factor;
  const double high_freq_wavelen = static_cast<double>(old_context_len) / s.high_freq_factor;
  const at::Tensor wavelen = at::reciprocal(inv_freq) * (2 * std::numbers::pi);
  at::Tensor inv_freq_llama = at::where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq);
  const at::Tensor smooth_factor = (at::reciprocal(wavelen) * old_context_len - s.low_freq_factor) /
                                   (s.high_freq_factor - s.low_freq_factor);
  const at::Tensor smoothed_inv_freq =
      at::rsub(smooth_factor, 1) * inv_freq_llama / s.factor + smooth_factor * inv_freq_llama;
  const at::Tensor is_medium_freq =
      at::logical_not(wavelen < high_freq_wavelen) * at::logical_not(wavelen > low_freq_wavelen);
  return at::where(is_medium_freq, smoothed_inv_freq, inv_freq_llama);
}

RopeTables rope_tables(const at::Tensor& inv_freq, std::int64_t seq, c10::ScalarType dtype,
                       std::int64_t first) {
  const at::Tensor positions =
      at::arange(first, first + seq,
                 at::TensorOptions().dtype(at::kLong).device(inv_freq.device()))
          .to(at::kFloat);
  const at::Tensor freqs = positions.unsqueeze(-1) * inv_freq;
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

RopeTables rope_tables_at(const at::Tensor& inv_freq, const at::Tensor& position_ids,
                          c10::ScalarType dtype) {
  const at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq;
  const at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor apply_rope(const at::Tensor& x, const RopeTables& tables) {
  const std::int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * tables.cos + rotated * tables.sin;
}

}  // namespace lema::trainer::detail
