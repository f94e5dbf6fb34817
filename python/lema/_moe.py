"""Note [Paged experts]: transformers keeps a mixture of experts' weights fused, one 3D tensor
per projection over all experts (Mixtral's gate_up_proj is the w1 and w3 of every expert,
stacked), and builds those tensors at load by concatenating the checkpoint's per-expert tensors:
that would read every expert into ordinary memory. Instead the experts module keeps the
checkpoint's per-expert tensors (paged), and the fused tensors are assembled for each forward
from them, one expert at a time (so an op needs one expert's pages), then dropped. Every
experts implementation transformers has (eager, grouped_mm, ...) runs unchanged on them, so the
numbers are the plain model's bit for bit. The assembled tensors are ordinary memory for the
length of a forward, and longer where autograd keeps them for backward (inputs that need
gradients): gradient checkpointing bounds that to one layer.
"""
import re

import torch

# model_type: (checkpoint name -> (prefix, expert, projection), experts module, (gate, up, down))
_LAYOUTS = {
    "mixtral": (re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$"),
                "{}.mlp.experts", ("w1", "w3", "w2")),
}


def split(config, tensors):
    """(state dict for transformers, {experts module: ((gate, up, down) names, [(gate, up, down)
    tensors per expert])}). The
    fused names get placeholders, so transformers neither converts nor initialises them."""
    layout = _LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None:
        return tensors, {}
    regex, module_format, (gate, up, down) = layout
    state, found = {}, {}
    for name, t in tensors.items():
        m = regex.match(name)
        if m is None:
            state[name] = t
            continue
        module = module_format.format(m.group(1))
        found.setdefault(module, {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    experts = {}
    for module, by_expert in found.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        experts[module] = ((gate, up, down), [(x[gate], x[up], x[down]) for x in ordered])
        g, d = ordered[0][gate], ordered[0][down]
        state[module + ".gate_up_proj"] = _placeholder(
            (len(ordered), 2 * g.shape[0], g.shape[1]), g)
        state[module + ".down_proj"] = _placeholder((len(ordered), *d.shape), d)
    return state, experts


def _placeholder(shape, like):
    """One element seen through a stride-0 view of `shape`: nothing to read or allocate, and
    transformers' loading moves it as it is (same device and dtype)."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)


class PagedExperts:
    """Mixed into the experts module's own class: the fused tensors as properties."""

    def _assemble(self):
        n = self.lema_experts
        g0, d0 = getattr(self, "lema_gate_0"), getattr(self, "lema_down_0")
        rows = g0.shape[0]
        gate_up = torch.empty((n, 2 * rows, g0.shape[1]), dtype=g0.dtype, device=g0.device)
        down = torch.empty((n, *d0.shape), dtype=d0.dtype, device=d0.device)
        with torch.no_grad():
            for e in range(n):
                gate_up[e, :rows].copy_(getattr(self, f"lema_gate_{e}"))
                gate_up[e, rows:].copy_(getattr(self, f"lema_up_{e}"))
                down[e].copy_(getattr(self, f"lema_down_{e}"))
        return gate_up, down

    @property
    def gate_up_proj(self):
        return (self._lema_fused or self._assemble())[0]

    @property
    def down_proj(self):
        return (self._lema_fused or self._assemble())[1]

    def forward(self, *args, **kwargs):
        object.__setattr__(self, "_lema_fused", self._assemble())
        try:
            return super().forward(*args, **kwargs)
        finally:
            object.__setattr__(self, "_lema_fused", None)


_classes = {}


def _paged_class(cls):
    if cls not in _classes:
        _classes[cls] = type("Paged" + cls.__name__, (PagedExperts, cls), {})
    return _classes[cls]


def attach(model, experts):
    """Swaps the placeholders of each experts module for the per-expert tensors."""
    for module_name, (names, per_expert) in experts.items():
        module = model.get_submodule(module_name)
        for fused in ("gate_up_proj", "down_proj"):
            module._parameters.pop(fused, None)
        for e, (g, u, d) in enumerate(per_expert):
            for kind, t in (("gate", g), ("up", u), ("down", d)):
                module.register_parameter(f"lema_{kind}_{e}",
                                          torch.nn.Parameter(t, requires_grad=False))
        object.__setattr__(module, "lema_experts", len(per_expert))
        object.__setattr__(module, "lema_names", names)
        object.__setattr__(module, "_lema_fused", None)
        module.__class__ = _paged_class(type(module))
        module._register_state_dict_hook(_checkpoint_state)


def _checkpoint_state(module, state, prefix, local_metadata):
    """The module's state under the checkpoint's per-expert names (experts.0.w1.weight, ...),
    which save_pretrained writes as a plain model does: transformers reverts at save only the
    conversions it applied at load, and the fusing was not one of them (its renames, such as
    .mlp. back to .block_sparse_moe., still apply)."""
    for key in [k for k in state if k.startswith(prefix + "lema_")]:
        del state[key]
    for e in range(module.lema_experts):
        for kind, name in zip(("gate", "up", "down"), module.lema_names):
            state[f"{prefix}{e}.{name}.weight"] = getattr(module, f"lema_{kind}_{e}")
    return state
