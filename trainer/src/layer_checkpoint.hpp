// Note [Layer checkpointing]
// libtorch's C++ API has no torch.utils.checkpoint, so a decoder layer is wrapped in a custom
// autograd Function: forward runs the layer without recording a graph and keeps only its input;
// backward runs it again with gradients on, from the saved input, and backpropagates through the
// recomputed graph. Dropout must draw the same masks both times: the dropout generator's state
// at the layer's start is saved in forward, set for the recompute, and the generator's state
// is restored afterwards, so training continues as if nothing had been recomputed. The gradients
// equal those of the plain graph (the same operations run on the same values).
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace lema::trainer::detail {

using LayerFunction = std::function<at::Tensor(const at::Tensor& x)>;

/// `layer(x)`, with the activations recomputed in backward. `parameters` are the leaves the layer
/// uses that need gradients (its adapters). `generator` (may be undefined) is the one the layer's
/// dropout draws from. `layer` must stay callable until backward has run.
at::Tensor checkpointed(LayerFunction layer, const at::Tensor& x,
                        const std::vector<at::Tensor>& parameters, const at::Generator& generator);

}  // namespace lema::trainer::detail
