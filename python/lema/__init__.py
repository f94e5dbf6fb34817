"""LEMA for PyTorch: open a safetensors checkpoint as ordinary tensors whose pages are made
resident on demand under a memory budget.

    import lema
    lema.load_library()            # or lema.load_library("/path/to/liblema_torch_ops.so")
                                   # (else $LEMA_TORCH_OPS, beside the package, the build tree)
    ckpt = lema.open("model.safetensors", budget="64MiB")
    w = ckpt.tensor("model.layers.0.mlp.up_proj.weight")
    y = x @ w.T                    # the guard makes w's pages resident for the op

Weights may be written (w.mul_(2), peft's merge_and_unload()): a written page is kept for the life
of the checkpoint, in a private spill store when it is evicted, never in the checkpoint's files.
Opened with read_only=True (and always for weights on a GPU), an op writing into a weight raises
RuntimeError naming it before it runs.
"""
import builtins
import json
import os
import re

import torch

from . import _native

__all__ = ["load_library", "preload_library", "open", "parse_size", "parse_budget", "Checkpoint",
           "causal_lm", "use_allocator", "AllocatorScope", "from_pretrained", "stats",
           "TorchVersionError", "cuda_allocator"]


def from_pretrained(path, budget, **kwargs):
    """lema.hf.from_pretrained: a transformers model whose weights are paged under `budget`."""
    from .hf import from_pretrained as load
    return load(path, budget, **kwargs)


def stats(model):
    """The paging figures of a model from from_pretrained (or peft's wrapper of one)."""
    from .hf import stats as model_stats
    return model_stats(model)


def cuda_allocator(path=None):
    """torch's CUDAPluggableAllocator over LEMA's device allocator (lema.cuda_alloc)."""
    from .cuda_alloc import cuda_allocator as make
    return make(path)


def __getattr__(name):
    # `lema.hf` and `lema.errors` without importing transformers at `import lema`.
    if name in ("hf", "errors"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lema' has no attribute {name!r}")

_loaded = False
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30}


_LIBRARY = "liblema_torch_ops.so"


def _library_places(path):
    """(where, path) pairs load_library tries, in order (the record: torch_plugin/CMakeLists.txt)."""
    return _native.library_places(path, "LEMA_TORCH_OPS", _LIBRARY, "_build_tree")


class TorchVersionError(ImportError):
    """The ops library was built against another torch than the one imported."""


_REBUILD = ("rebuild lema against the torch installed here (pip install --force-reinstall "
            "--no-deps <lema source>), or install the torch it was built against")


def _check_torch_version(library):
    """Note [Torch version record]: the version of the torch the library was built against is
    written beside it; loading it into another fails with an undefined symbol at best."""
    record = os.path.join(os.path.dirname(library), "lema_torch_ops.torch_version")
    if not os.path.exists(record):
        return
    with builtins.open(record) as f:
        built = f.read().strip()
    if built and built != torch.__version__:
        raise TorchVersionError(
            f"lema: {library} was built against torch {built} but torch {torch.__version__} "
            f"is installed; {_REBUILD}")


# An installed package (pip install) checks its library's torch at import, before anything
# loads it (a source tree's build library is checked when load_library finds it).
if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY)):
    _check_torch_version(os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY))


def load_library(path=None):
    """Loads liblema_torch_ops.so from `path`; without one, from the first that exists of
    $LEMA_TORCH_OPS, this package's directory and the build tree configured last from this
    source tree. Raises FileNotFoundError listing every place tried."""
    global _loaded
    if _loaded:
        return
    places = _library_places(path)
    for _, candidate in places:
        if os.path.isfile(candidate):
            _check_torch_version(candidate)
            try:
                torch.ops.load_library(candidate)
            except OSError as e:
                raise TorchVersionError(f"lema: {candidate} does not load into torch "
                                        f"{torch.__version__} ({e}); {_REBUILD}") from None
            _loaded = True
            return
    tried = "; ".join(f"{where}: {candidate}" for where, candidate in places)
    raise FileNotFoundError(
        f"{_LIBRARY} not found (tried {tried}); build the lema_torch_ops target, or pass its "
        "path to lema.load_library() or set LEMA_TORCH_OPS")


_PRELOAD = "liblema_preload.so"


def preload_library():
    """The path of liblema_preload.so, the LD_PRELOAD hook that puts a CUDA program's large
    allocations in managed memory under $LEMA_BUDGET (docs/USER_GUIDE.md, "LD_PRELOAD hook"):

        LD_PRELOAD=$(python -c 'import lema; print(lema.preload_library())') python train.py

    The first that exists of $LEMA_PRELOAD_LIBRARY, this package's directory (an installed
    wheel) and the build tree configured last from this source tree. Raises FileNotFoundError
    listing every place tried."""
    # The record: allocator/preload/CMakeLists.txt.
    places = _native.library_places(None, "LEMA_PRELOAD_LIBRARY", _PRELOAD, "_preload_build_tree")
    for _, candidate in places:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    tried = "; ".join(f"{where}: {candidate}" for where, candidate in places)
    raise FileNotFoundError(f"{_PRELOAD} not found (tried {tried}); build the lema_preload "
                            "target, or set LEMA_PRELOAD_LIBRARY")


def parse_size(size) -> int:
    """64 * 2**20, "64MiB", "1.5GiB", "100MB" -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. 64MiB, 2GiB or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_budget(budget) -> int:
    """A budget as the command line takes it: a size (64 * 2**20, "64MiB") or "unlimited"
    (every page resident), which the plugin receives as -1."""
    if isinstance(budget, str) and budget.strip().lower() == "unlimited":
        return -1
    if isinstance(budget, bool):
        raise ValueError(f"cannot read {budget!r} as a budget; write e.g. 64MiB or 'unlimited'")
    return parse_size(budget)


class Checkpoint:
    """An open checkpoint. Tensors keep it open after close() or garbage collection."""

    def __init__(self, handle: int):
        self._handle = handle

    def tensor(self, name: str) -> torch.Tensor:
        return torch.ops.lema.tensor(self._handle, name)

    def names(self) -> list:
        return list(torch.ops.lema.names(self._handle))

    def named_tensors(self) -> dict:
        return {name: self.tensor(name) for name in self.names()}

    def stats(self) -> dict:
        return json.loads(torch.ops.lema.stats(self._handle))

    def prefetch(self, names) -> None:
        torch.ops.lema.prefetch(self._handle, list(names))

    def mark_step(self) -> None:
        torch.ops.lema.mark_step(self._handle)

    def pause(self) -> None:
        """Gives the memory of every weight page back, keeping the tensors valid; an op on a
        weight raises until resume(). Raises while an op uses the weights."""
        torch.ops.lema.pause(self._handle)

    def resume(self) -> None:
        """Makes the weights' memory again; pages refill from the checkpoint on next use."""
        torch.ops.lema.resume(self._handle)

    def close(self) -> None:
        if self._handle is not None:
            torch.ops.lema.close(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the op table may be gone
            pass


def open(path, budget="64MiB", policy="lru", mode="guard", page_size=0, device="cpu",
         gpu_memory="vmm", host_cache=0, read_only=False) -> Checkpoint:
    """Opens a .safetensors file, a sharded index or a checkpoint directory.

    budget: memory for resident weights, a size (an int of bytes, or "64MiB", "1.5GiB") or
    "unlimited" (every page of the model resident, as `lema train --budget unlimited`).

    device: "cpu", or "cuda"/"cuda:N" for weights on a GPU (guard mode), kept as gpu_memory
    says: "vmm" (device memory paged by LEMA; host_cache keeps pages read from disk in pinned
    host memory), "managed" (unified memory prefetched by LEMA) or "unified" (plain unified
    memory paged by the driver; the budget must hold the whole model).

    read_only: refuse writes into the weights (RuntimeError naming the weight) instead of
    keeping them.
    """
    load_library()
    handle = torch.ops.lema.open(os.fspath(path), parse_budget(budget), policy, mode,
                                 parse_size(page_size), str(device), gpu_memory,
                                 parse_size(host_cache), bool(read_only))
    return Checkpoint(handle)


class AllocatorScope:
    """torch's CPU allocator over memory paged under a budget (lema.use_allocator). Ends with
    restore() or at the end of a `with` block; tensors allocated meanwhile keep their memory."""

    def __init__(self, handle: int):
        self._handle = handle

    def stats(self) -> dict:
        """Budget, resident and peak resident bytes, bytes allocated, pages spilled, ..."""
        if self._handle is None:
            raise RuntimeError("lema: this allocator was restored already")
        return json.loads(torch.ops.lema.allocator_stats(self._handle))

    def restore(self) -> None:
        """Puts back the CPU allocator that was installed before; idempotent."""
        if self._handle is not None:
            torch.ops.lema.restore_allocator(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def use_allocator(budget, capacity=0, mode="fault", page_size=0) -> AllocatorScope:
    """Makes every CPU tensor allocated from now on live in memory paged under `budget` (a size:
    an int of bytes, or "64MiB", "1.5GiB"), so tensors together may exceed it: cold pages go to
    a spill file and come back on their next use. Works for numpy views and any code reading
    the tensors. `capacity`: the virtual bytes to hand out (0: 64 times the budget). `mode`:
    "fault" (userfaultfd) or "guard". Returns an AllocatorScope; use it in a `with` block or
    call restore() to put torch's own allocator back.
    """
    load_library()
    if isinstance(budget, str) and budget.strip().lower() == "unlimited":
        raise ValueError("use_allocator(budget='unlimited') pages nothing; give a size such as "
                         "'1GiB', or do not install the allocator")
    handle = torch.ops.lema.use_allocator(parse_budget(budget), parse_size(capacity), str(mode),
                                          parse_size(page_size))
    return AllocatorScope(handle)


def causal_lm(path, budget="64MiB", model_class=None, **open_kwargs):
    """A transformers causal LM over this checkpoint's tensors, frozen and paged under `budget`.

    `path` is a Hugging Face model directory (config.json + safetensors). The model is built
    without allocating weights (accelerate's init_empty_weights), then takes lema's tensors as
    its parameters; buffers (rotary frequencies) are computed as usual. Its name_or_path (and
    config._name_or_path) is `path`, so an adapter peft saves over it records its base model;
    a model built by hand over lema.open tensors should set both the same way.
    `model_class` defaults to AutoModelForCausalLM; open_kwargs go to lema.open.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    name = os.fspath(path)
    config = AutoConfig.from_pretrained(name)
    with init_empty_weights(include_buffers=False):
        model = (model_class or AutoModelForCausalLM).from_config(config)
    checkpoint = open(name, budget=budget, **open_kwargs)
    _, unexpected = model.load_state_dict(checkpoint.named_tensors(), strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or empty:
        raise ValueError(f"{name}: the checkpoint does not fit {type(model).__name__}: "
                         f"tensors it lacks {empty}, tensors it does not use {unexpected}")
    model.requires_grad_(False)
    model.eval()
    model.config._name_or_path = name
    model.name_or_path = name
    model.lema_checkpoint = checkpoint  # stats(), mark_step(); the tensors keep it open anyway
    return model
