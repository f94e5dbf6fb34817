#include "lora_linear.hpp"

#include <ATen/ATen.h>

namespace lema::trainer::detail {

at::Tensor dropout(const at::Tensor& x, double p, const at::Generator& generator) {
  const double keep = 1.0 - p;
  // The mask is drawn in float32 whatever the compute dtype, so a mask does not depend on it.
  const at::Tensor mask =
      at::bernoulli(at::empty(x.sizes(), x.options().dtype(at::kFloat)), keep, generator);
  return x * (mask / keep).to(x.scalar_type());
}

at::Tensor LoraLinear::forward(const at::Tensor& x, const ForwardContext& ctx) const {
  at::Tensor y = at::linear(x, weight.to(ctx.dtype));
  if (!adapted()) return y;
  const at::Tensor input = ctx.training && dropout > 0 && ctx.dropout_generator.defined()
                               ? detail::dropout(x, dropout, ctx.dropout_generator)
                               : x;
  const at::Tensor low_rank = at::linear(input, lora_a.to(ctx.dtype));
  return y + at::linear(low_rank, lora_b.to(ctx.dtype)) * scaling;
}

}  // namespace lema::trainer::detail
