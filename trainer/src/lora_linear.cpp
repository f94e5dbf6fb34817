#include "lora_linear.hpp"

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace lema::trainer::detail {

at::Tensor dropout(const at::Tensor& x, double p, const at::Generator& generator) {
  const double keep = 1.0 - p;
  // The mask is drawn in float32 whatever the compute dtype, so a mask does not depend on it.
  const at::Tensor mask =
      at::bernoulli(at::empty(x.sizes(), x.options().dtype(at::kFloat)), keep, generator);
  return x * (mask / keep).to(x.scalar_type());
}

at::Tensor LoraLinear::forward(const at::Tensor& x, const ForwardContext& ctx) const {
  const at::Tensor b = bias.defined() ? bias.to(ctx.dtype) : at::Tensor();
  at::Tensor y;
  if (transposed) {
    // As transformers' Conv1D computes it: addmm over the flattened positions.
    std::vector<std::int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(1);
    const at::Tensor flat = x.reshape({-1, x.size(-1)});
    y = (b.defined() ? at::addmm(b, flat, weight.to(ctx.dtype))
                     : at::mm(flat, weight.to(ctx.dtype)))
            .view(shape);
  } else {
    y = at::linear(x, weight.to(ctx.dtype), b.defined() ? std::optional<at::Tensor>(b)
                                                        : std::nullopt);
  }
  if (!adapted()) return y;
  const at::Tensor input = ctx.training && dropout > 0 && ctx.dropout_generator.defined()
                               ? detail::dropout(x, dropout, ctx.dropout_generator)
                               : x;
  const at::Tensor low_rank = at::linear(input, lora_a.to(ctx.dtype));
  return y + at::linear(low_rank, lora_b.to(ctx.dtype)) * scaling;
}

}  // namespace lema::trainer::detail
