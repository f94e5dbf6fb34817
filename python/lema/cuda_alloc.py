"""LEMA's device memory allocator for PyTorch: liblema_cuda_alloc.so behind torch's pluggable
allocator, with pause/resume of tagged memory (what RL trainers use to hand the GPU between
rollout and training while every tensor keeps its address).

    import torch, lema.cuda_alloc as lca
    pool = lca.mem_pool()                     # torch.cuda.MemPool over LEMA's allocator
    with torch.cuda.use_mem_pool(pool), lca.tag("weights"):
        w = torch.empty(1 << 28, device="cuda")
    torch.cuda.synchronize()
    lca.pause("weights")                      # device memory released, w's address kept
    lca.resume("weights")                     # fresh memory at the same address (contents lost
                                              # unless pause(..., keep_contents=True))

Settings (read when a device's first allocation is made): LEMA_ALLOC_BUDGET, LEMA_ALLOC_RESERVE,
LEMA_CUDA_DRIVER; the library itself: LEMA_ALLOC_LIBRARY (docs/USER_GUIDE.md).
"""
import builtins
import contextlib
import ctypes
import os
import threading

from . import _native

__all__ = ["library_path", "cuda_allocator", "install", "mem_pool", "tag", "set_tag", "pause",
           "resume", "usage", "AllocatorError"]

_LIBRARY = "liblema_cuda_alloc.so"


class AllocatorError(RuntimeError):
    """A pause, resume or tag call the library refused; the message is its one line."""


def _places(path):
    # The record: allocator/pluggable/CMakeLists.txt.
    return _native.library_places(path, "LEMA_ALLOC_LIBRARY", _LIBRARY, "_cuda_alloc_build_tree")


def library_path(path=None):
    """The liblema_cuda_alloc.so to load: `path`, else $LEMA_ALLOC_LIBRARY, else the one beside
    the package, else the build tree's. FileNotFoundError naming every place tried."""
    places = _places(path)
    for _, p in places:
        if os.path.isfile(p):
            return p
    tried = "; ".join(f"{where}: {p}" for where, p in places)
    raise FileNotFoundError(f"{_LIBRARY} not found (tried {tried}); build the lema_cuda_alloc "
                            "target, or set LEMA_ALLOC_LIBRARY to its path")


_lib = None
_lib_lock = threading.Lock()


def _library(path=None):
    """The library through ctypes: the same instance torch loads from the same path."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(library_path(path))
            for name in ("lema_set_tag", "lema_pause", "lema_pause_keeping_contents",
                         "lema_resume"):
                getattr(lib, name).argtypes = [ctypes.c_char_p]
                getattr(lib, name).restype = ctypes.c_int
            lib.lema_usage.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)]
            lib.lema_usage.restype = ctypes.c_int
            lib.lema_last_error.argtypes = []
            lib.lema_last_error.restype = ctypes.c_char_p
            _lib = lib
        return _lib


def _check(lib, rc):
    if rc != 0:
        raise AllocatorError(lib.lema_last_error().decode(errors="replace"))


def cuda_allocator(path=None):
    """torch.cuda.memory.CUDAPluggableAllocator over liblema_cuda_alloc.so."""
    import torch
    return torch.cuda.memory.CUDAPluggableAllocator(library_path(path), "lema_alloc", "lema_free")


def install(path=None):
    """Makes LEMA's allocator torch's CUDA allocator for the process; call it before the first
    CUDA allocation (torch refuses once its own allocator was used). Every tensor then takes at
    least one granule (2 MiB); mem_pool() avoids that."""
    import torch
    torch.cuda.memory.change_current_allocator(cuda_allocator(path))


def mem_pool(path=None, **kwargs):
    """A torch.cuda.MemPool whose segments come from LEMA's allocator: torch's caching allocator
    splits them into tensors, so small tensors share granules. Use it with
    torch.cuda.use_mem_pool(pool)."""
    import torch
    return torch.cuda.MemPool(cuda_allocator(path).allocator(), **kwargs)


_local = threading.local()


def set_tag(name):
    """The calling thread's tag for the allocations it makes from now on (None: none)."""
    lib = _library()
    _check(lib, lib.lema_set_tag(None if name is None else name.encode()))
    _local.tag = name


@contextlib.contextmanager
def tag(name):
    """Allocations made by this thread inside the block carry `name` (pause/resume act on it)."""
    previous = getattr(_local, "tag", None)
    set_tag(name)
    try:
        yield
    finally:
        set_tag(previous)


def pause(name, keep_contents=False):
    """Releases the device memory of every allocation tagged `name`, keeping its addresses.
    Synchronize first: no queued kernel may still use that memory. keep_contents copies the bytes
    to pinned host memory, which resume puts back. AllocatorError for an unknown or paused tag."""
    lib = _library()
    fn = lib.lema_pause_keeping_contents if keep_contents else lib.lema_pause
    _check(lib, fn(name.encode()))


def resume(name):
    """Maps fresh device memory at every address pause(name) released. AllocatorError when the
    tag is not paused or the budget cannot hold it again."""
    lib = _library()
    _check(lib, lib.lema_resume(name.encode()))


def usage(device=0):
    """{'mapped', 'pending', 'paused', 'budget'} bytes of the allocator on `device`; None before
    its first allocation."""
    lib = _library()
    out = (ctypes.c_ulonglong * 4)()
    if lib.lema_usage(int(device), out) != 0:
        return None
    return dict(zip(("mapped", "pending", "paused", "budget"), out))
