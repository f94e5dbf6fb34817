#include "layer_checkpoint.hpp"

#include <ATen/core/ivalue.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <mutex>
#include <optional>
#include <utility>

namespace lema::trainer::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What backward needs besides the saved input; held by the autograd node.
struct Recompute : ::torch::CustomClassHolder {
  LayerFunction layer;
  std::vector<at::Tensor> parameters;
  std::optional<at::Generator> generator;
  at::Tensor generator_state;  // at the layer's start
};

at::Tensor get_state(at::Generator& g) {
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void set_state(at::Generator& g, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}

class LayerCheckpoint : public torch::autograd::Function<LayerCheckpoint> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList parameters,
                            c10::intrusive_ptr<Recompute> recompute) {
    (void)parameters;  // inputs only so that autograd routes their gradients
    if (recompute->generator) recompute->generator_state = get_state(*recompute->generator);
    ctx->save_for_backward({x});
    at::Tensor out = recompute->layer(x);
    ctx->saved_data["recompute"] = c10::IValue::make_capsule(std::move(recompute));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor x = ctx->get_saved_variables().at(0);
    auto recompute =
        c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data.at("recompute").toCapsule());

    const at::Tensor input = x.detach().requires_grad_(true);
    at::Tensor out;
    {
      at::AutoGradMode grad_on(true);
      std::optional<at::Tensor> state_now;
      if (recompute->generator) {
        state_now = get_state(*recompute->generator);
        set_state(*recompute->generator, recompute->generator_state);
      }
      out = recompute->layer(input);
      if (state_now) set_state(*recompute->generator, *state_now);
    }
    variable_list inputs{input};
    inputs.insert(inputs.end(), recompute->parameters.begin(), recompute->parameters.end());
    variable_list grads = torch::autograd::grad({out}, inputs, {grad_outputs.at(0)},
                                                /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
    grads.emplace_back();  // for the Recompute argument, which is no tensor
    return grads;
  }
};

}  // namespace

at::Tensor checkpointed(LayerFunction layer, const at::Tensor& x,
                        const std::vector<at::Tensor>& parameters, const at::Generator& generator) {
  auto recompute = c10::make_intrusive<Recompute>();
  recompute->layer = std::move(layer);
  recompute->parameters = parameters;
  if (generator.defined()) recompute->generator = generator;
  return LayerCheckpoint::apply(x, at::TensorList(parameters), std::move(recompute));
}

}  // namespace lema::trainer::detail
