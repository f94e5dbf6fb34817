#include "shared_expert.hpp"

#include <ATen/ATen.h>

namespace lema::trainer::detail {

at::Tensor SharedExpert::forward(const at::Tensor& x, const ForwardContext& ctx) const {
  const at::Tensor hidden = at::silu(gate_proj.forward(x, ctx)) * up_proj.forward(x, ctx);
  const at::Tensor out = down_proj.forward(hidden, ctx);
  return at::sigmoid(at::linear(x, gate.to(ctx.dtype))) * out;
}

}  // namespace lema::trainer::detail
