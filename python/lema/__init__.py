"""LEMA for PyTorch: open a safetensors checkpoint as ordinary tensors whose pages are made
resident on demand under a memory budget.

    import lema
    lema.load_library()            # or lema.load_library("/path/to/liblema_torch_ops.so")
    ckpt = lema.open("model.safetensors", budget="64MiB")
    w = ckpt.tensor("model.layers.0.mlp.up_proj.weight")
    y = x @ w.T                    # the guard makes w's pages resident for the op

Weights may be written (w.mul_(2), peft's merge_and_unload()): a written page is kept for the life
of the checkpoint, in a private spill store when it is evicted, never in the checkpoint's files.
Opened with read_only=True (and always for weights on a GPU), an op writing into a weight raises
RuntimeError naming it before it runs.
"""
import json
import os
import re

import torch

__all__ = ["load_library", "open", "parse_size", "Checkpoint"]

_loaded = False
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30}


def load_library(path=None):
    """Loads liblema_torch_ops.so: `path`, else $LEMA_TORCH_OPS, else beside this package."""
    global _loaded
    if _loaded:
        return
    if path is None:
        path = os.environ.get("LEMA_TORCH_OPS")
    if path is None:
        path = os.path.join(os.path.dirname(__file__), "liblema_torch_ops.so")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"liblema_torch_ops.so not found at {path}: pass its path to lema.load_library() "
            "or set LEMA_TORCH_OPS (it is built as torch_plugin/liblema_torch_ops.so)")
    torch.ops.load_library(path)
    _loaded = True


def parse_size(size) -> int:
    """64 * 2**20, "64MiB", "1.5GiB", "100MB" -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. 64MiB, 2GiB or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


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

    device: "cpu", or "cuda"/"cuda:N" for weights on a GPU (guard mode), kept as gpu_memory
    says: "vmm" (device memory paged by LEMA; host_cache keeps pages read from disk in pinned
    host memory), "managed" (unified memory prefetched by LEMA) or "unified" (plain unified
    memory paged by the driver; the budget must hold the whole model).

    read_only: refuse writes into the weights (RuntimeError naming the weight) instead of
    keeping them.
    """
    load_library()
    handle = torch.ops.lema.open(os.fspath(path), parse_size(budget), policy, mode,
                                 parse_size(page_size), str(device), gpu_memory,
                                 parse_size(host_cache), bool(read_only))
    return Checkpoint(handle)
