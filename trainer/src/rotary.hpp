// Rotary position embeddings, computed step by step the way transformers computes them, so the
// tables agree bit for bit in float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "lema/trainer/model_config.hpp"

namespace lema::trainer::detail {

/// Inverse frequencies, float32 [head_dim / 2]: the default schedule, or llama3's
/// (transformers' _compute_llama3_parameters).
at::Tensor rope_inv_freq(const ModelConfig& config);

struct RopeTables {
  at::Tensor cos;  // [seq, head_dim] or, per row, [batch, 1, seq, head_dim]; compute dtype
  at::Tensor sin;
};

/// Tables for positions first .. first+seq-1 (computed in float32, then cast).
RopeTables rope_tables(const at::Tensor& inv_freq, std::int64_t seq, c10::ScalarType dtype,
                       std::int64_t first = 0);

/// Tables for each row's own positions ([batch, seq] integer: packed examples).
RopeTables rope_tables_at(const at::Tensor& inv_freq, const at::Tensor& position_ids,
                          c10::ScalarType dtype);

/// x * cos + rotate_half(x) * sin over [batch, heads, seq, head_dim].
at::Tensor apply_rope(const at::Tensor& x, const RopeTables& tables);

}  // namespace lema::trainer::detail
