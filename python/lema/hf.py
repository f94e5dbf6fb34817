"""Hugging Face transformers over LEMA: `from_pretrained` and the Trainer callback.

    model = lema.from_pretrained("my-model", budget="2GiB")   # AutoModelForCausalLM
    model = peft.get_peft_model(model, LoraConfig(...))
    Trainer(model=model, ..., callbacks=[lema.hf.LemaCallback()]).train()
"""
import json
import os

import torch

from . import _moe
from .errors import (BudgetTooSmallError, DtypeError, NotACheckpointError, RemoteCodeError,
                     UnknownArchitectureError)

__all__ = ["from_pretrained", "LemaCallback", "checkpoints", "stats"]


def _read_config_json(path):
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise NotACheckpointError(
            f"lema: {path} is not a checkpoint directory; lema.from_pretrained takes a local "
            "directory with config.json and .safetensors files (model.save_pretrained writes one)")
    if not os.path.isfile(config_file):
        raise NotACheckpointError(
            f"lema: {path} has no config.json, so it is not a Hugging Face checkpoint; "
            "model.save_pretrained(dir) writes one")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise NotACheckpointError(
            f"lema: {path} has no .safetensors file (LEMA pages safetensors only); convert it "
            "with model.save_pretrained(dir, safe_serialization=True)")
    try:
        with open(config_file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NotACheckpointError(f"lema: {config_file} cannot be read as JSON: {e}") from None


def _model_class(path, raw, trust_remote_code):
    """The AutoModelForCausalLM class for this checkpoint's config, or one clear error."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    remote = "AutoModelForCausalLM" in raw.get("auto_map", {})
    known = model_type in CONFIG_MAPPING
    if remote and not known and not trust_remote_code:
        raise RemoteCodeError(
            f"lema: {path}/config.json runs its own model code "
            f"(auto_map: {raw['auto_map']['AutoModelForCausalLM']}); read it, then pass "
            "trust_remote_code=True to run it")
    if not known and not remote:
        raise UnknownArchitectureError(
            f"lema: {path}/config.json: model_type {model_type!r} is not an architecture "
            f"transformers {transformers.__version__} knows; upgrade transformers, or check "
            "the model_type in config.json")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if remote and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        return config, get_class_from_dynamic_module(
            raw["auto_map"]["AutoModelForCausalLM"], path)
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise UnknownArchitectureError(
            f"lema: {path}/config.json: {model_type!r} has no causal language model class in "
            f"transformers {transformers.__version__} (AutoModelForCausalLM does not map it)")
    return config, mapping[type(config)]


def _resolve_dtype(path, tensors, kwargs):
    """Note [Dtypes]: the model takes the checkpoint's dtype. A dtype asked for that differs
    from it is refused: transformers would convert every weight at load, reading the whole
    checkpoint into ordinary memory, which is what LEMA is for not doing. Compute in another
    dtype with torch.autocast instead."""
    asked = None
    for key in ("dtype", "torch_dtype"):
        if key in kwargs:
            asked = kwargs.pop(key)
    floats = {}
    for t in tensors.values():
        if t.is_floating_point():
            floats[t.dtype] = floats.get(t.dtype, 0) + t.numel()
    if not floats:
        return None
    stored = max(floats, key=floats.get)
    if isinstance(asked, str) and asked != "auto":
        asked = getattr(torch, asked, asked)
    if asked not in (None, "auto") and asked != stored:
        raise DtypeError(
            f"lema: {path} stores its weights as {str(stored).replace('torch.', '')}; "
            f"dtype={str(asked).replace('torch.', '')} would convert (read) every weight at "
            "load. Leave dtype out (or 'auto'), and compute in another dtype with "
            "torch.autocast")
    return stored


def _pages(t, page):
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return set(range(lo // page, (hi - 1) // page + 1)) if hi > lo else set()


def _check_budget(checkpoint, tensors, budget_arg):
    """Note [Budget at load]: the guard makes an op's weight inputs resident at once, so the
    budget must hold the pages of the largest such group: one module's parameters (a linear's
    weight and bias; the checkpoint's names group them), a paged expert's tensors one by one.
    Checked here, in the names the user wrote, not at the first forward deep in transformers."""
    stats = checkpoint.stats()
    page, budget = stats["page_size"], stats["budget_bytes"]
    groups = {}
    for name, t in tensors.items():
        groups.setdefault(name.rsplit(".", 1)[0], []).append((name, t))
    worst_pages, worst_names = 0, []
    for members in groups.values():
        pages = set()
        for _, t in members:
            pages |= _pages(t, page)
        if len(pages) > worst_pages:
            worst_pages, worst_names = len(pages), [n for n, _ in members]
    needed = worst_pages * page
    if needed > budget:
        raise BudgetTooSmallError(
            f"lema: budget={budget_arg!r} ({budget} bytes) cannot hold one op's weights: "
            f"{' and '.join(worst_names)} span{'s' if len(worst_names) == 1 else ''} {worst_pages} pages of {_size(page)}; the "
            f"smallest budget that works is budget='{-(-needed // (1 << 20))}MiB' "
            f"({needed} bytes)")


def _size(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def _open(path, budget, **settings):
    """lema.open, with a budget below one page refused as below one op (the smallest budget
    that works is worked out over the model's pages, opened without a budget to count them)."""
    from . import open as lema_open
    try:
        return lema_open(path, budget=budget, **settings)
    except RuntimeError as e:
        if "smallest budget that works" not in str(e):
            raise
    whole = lema_open(path, budget="unlimited", **settings)
    tensors = whole.named_tensors()
    try:
        _check_budget(_Fixed(whole.stats(), budget), tensors, budget)
    finally:
        del tensors
        whole.close()
    raise AssertionError("unreachable: lema.open refused a budget that holds every op")


class _Fixed:
    """The stats of a checkpoint, with the budget asked for in place of the one it opened with."""

    def __init__(self, stats, budget):
        from . import parse_budget
        self._stats = dict(stats, budget_bytes=parse_budget(budget))

    def stats(self):
        return self._stats


def from_pretrained(path, budget, device="cpu", mode="guard", policy="trace", read_only=False,
                    page_size=0, gpu_memory="vmm", host_cache=0, trust_remote_code=False,
                    **kwargs):
    """A transformers causal LM (the AutoModelForCausalLM class of `path`'s config.json) whose
    weights are the checkpoint's pages under `budget`: nothing of them is read at load.

    path: a local directory with config.json and .safetensors files. budget, device, mode,
    policy, read_only, page_size, gpu_memory, host_cache: as lema.open. The rest goes to
    transformers' from_pretrained (attn_implementation=..., ...). dtype/torch_dtype may only
    name the checkpoint's own dtype (Note [Dtypes]).

    Buffers that are not in the checkpoint (rotary inv_freq) are made by transformers as usual;
    tied embeddings are tied; model.name_or_path is `path`. model.stats() gives the paging
    figures; each forward of the model marks a step for the trace policy.
    """
    path = os.fspath(path)
    raw = _read_config_json(path)
    config, cls = _model_class(path, raw, trust_remote_code)
    checkpoint = _open(path, budget, policy=policy, mode=mode, page_size=page_size,
                       device=device, gpu_memory=gpu_memory, host_cache=host_cache,
                       read_only=read_only)
    tensors = checkpoint.named_tensors()
    _check_budget(checkpoint, tensors, budget)
    dtype = _resolve_dtype(path, tensors, kwargs)
    state, experts = _moe.split(config, tensors)
    if str(device) != "cpu":
        # The weights are on `device` already; placed anywhere else, transformers would copy them.
        kwargs.setdefault("device_map", {"": str(device)})
    with _quiet_progress():
        model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                    output_loading_info=True, **kwargs)
    model, info = model
    _moe.attach(model, experts)
    missing = list(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise NotACheckpointError(
            f"lema: {path} does not fit {cls.__name__}: weights it lacks {sorted(missing)}"
            f"{'; shapes that differ ' + str(mismatched) if mismatched else ''}")
    model.name_or_path = path
    model.config._name_or_path = path
    if device != "cpu":
        _move_buffers(model, device)
    _attach_checkpoint(model, checkpoint)
    return model


def _move_buffers(model, device):
    """Weights already live on `device` (lema.open put them there); buffers follow them."""
    for module in model.modules():
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.device != torch.device(device):
                module._buffers[name] = b.to(device)


class _quiet_progress:
    """transformers draws a progress bar while it 'loads' (assigns) the weights."""

    def __enter__(self):
        try:
            from transformers.utils import logging
            self._was = logging.is_progress_bar_enabled()
            logging.disable_progress_bar()
        except Exception:  # an older transformers
            self._was = None

    def __exit__(self, *exc):
        if self._was:
            from transformers.utils import logging
            logging.enable_progress_bar()


def _attach_checkpoint(model, checkpoint):
    # Not a submodule or parameter: a plain attribute, found through peft's wrappers too.
    object.__setattr__(model, "lema_checkpoint", checkpoint)
    object.__setattr__(model, "stats", checkpoint.stats)

    # Note [Steps for the trace policy]: the trace policy learns the order of one step's
    # accesses and prefetches along it. A step starts with the model's forward (training:
    # forward then backward; generate: one forward per token), so each top-level forward marks
    # one; gradient checkpointing's recomputation calls the layers, not the model.
    @torch.compiler.disable
    def mark(module, args):
        checkpoint.mark_step()

    model.register_forward_pre_hook(mark)


def checkpoints(model):
    """The LEMA checkpoints behind `model` (a model from from_pretrained, or peft's wrapper)."""
    found, seen = [], set()
    for module in model.modules():
        ckpt = module.__dict__.get("lema_checkpoint")
        if ckpt is not None and id(ckpt) not in seen:
            seen.add(id(ckpt))
            found.append(ckpt)
    return found


def stats(model):
    """The paging figures of `model`'s checkpoint (summed over several), with the hit rates."""
    total = {}
    for ckpt in checkpoints(model):
        for k, v in ckpt.stats().items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    accesses = total.get("hits", 0) + total.get("faults", 0)
    total["hit_rate"] = total.get("hits", 0) / accesses if accesses else 0.0
    demand = total.get("prefetches_used", 0) + total.get("faults", 0)
    total["prefetch_hit_rate"] = total.get("prefetches_used", 0) / demand if demand else 0.0
    return total


_LOGGED = ("faults", "bytes_read", "stall_ns", "resident_bytes", "budget_bytes",
           "prefetches_issued", "prefetches_used", "evictions")


def _trainer_callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class LemaCallback(_trainer_callback_base()):
    """Adds LEMA's paging figures to the Trainer's logs at each logging step, as `lema/...`:
    faults, bytes read, stall seconds and evictions since the previous log; resident bytes
    against the budget; prefetches issued and used, and the prefetch hit rate (prefetched pages
    among those that had to come from disk)."""

    def __init__(self):
        self._last = {}

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or logs is None:
            return
        now = stats(model)
        if not now:
            return
        delta = {k: now.get(k, 0) - self._last.get(k, 0) for k in _LOGGED}
        self._last = now
        demand = delta["prefetches_used"] + delta["faults"]
        figures = {
            "lema/faults": delta["faults"],
            "lema/bytes_read": delta["bytes_read"],
            "lema/stall_s": round(delta["stall_ns"] / 1e9, 6),
            "lema/evictions": delta["evictions"],
            "lema/resident_bytes": now.get("resident_bytes", 0),
            "lema/budget_bytes": now.get("budget_bytes", 0),
            "lema/prefetches_issued": delta["prefetches_issued"],
            "lema/prefetches_used": delta["prefetches_used"],
            "lema/prefetch_hit_rate": round(delta["prefetches_used"] / demand, 4) if demand else 0.0,
        }
        # The callbacks after this one see them in `logs`; the Trainer has recorded this log in
        # state.log_history before calling any callback, so the record gets them too.
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
