"""lema.cuda_alloc: finds liblema_cuda_alloc.so and drives tags, pause and resume through ctypes
over the fake CUDA driver ($LEMA_CUDA_DRIVER, set by ctest); the PyTorch part needs a GPU."""
import ctypes
import os
import sys

import pytest

PACKAGE_PARENT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "python"))
sys.path.insert(0, PACKAGE_PARENT)
from lema import cuda_alloc  # noqa: E402

MiB = 1 << 20


def test_the_library_is_found_and_exports_the_pluggable_entry_points():
    path = cuda_alloc.library_path()
    assert os.path.basename(path) == "liblema_cuda_alloc.so"
    lib = ctypes.CDLL(path)
    for name in ("lema_alloc", "lema_free", "lema_pause", "lema_resume", "lema_set_tag"):
        assert getattr(lib, name) is not None


def test_the_package_offers_the_allocator():
    import lema
    assert lema.cuda_allocator.__module__ == "lema"
    for name in ("cuda_allocator", "install", "mem_pool", "tag", "pause", "resume", "usage"):
        assert callable(getattr(cuda_alloc, name))


def test_a_missing_library_names_every_place_tried():
    with pytest.raises(FileNotFoundError, match=r"the path given: /nonexistent/x\.so"):
        cuda_alloc.library_path("/nonexistent/x.so")


@pytest.fixture
def fake_driver():
    if "fake" not in os.environ.get("LEMA_CUDA_DRIVER", ""):
        pytest.skip("needs the fake CUDA driver in LEMA_CUDA_DRIVER (ctest sets it)")
    os.environ["LEMA_ALLOC_BUDGET"] = "64MiB"  # read at the device's first allocation
    lib = ctypes.CDLL(cuda_alloc.library_path())
    lib.lema_alloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.lema_alloc.restype = ctypes.c_void_p
    lib.lema_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    return lib


def test_pause_releases_a_tags_memory_and_resume_brings_it_back(fake_driver):
    lib = fake_driver
    with cuda_alloc.tag("weights"):
        w = lib.lema_alloc(4 * MiB, 0, None)
    other = lib.lema_alloc(MiB, 0, None)
    assert w and other
    ctypes.memset(w, 7, 4 * MiB)  # the fake's device memory is host memory
    held = cuda_alloc.usage(0)["mapped"]

    cuda_alloc.pause("weights", keep_contents=True)
    assert cuda_alloc.usage(0)["mapped"] == held - 4 * MiB
    assert cuda_alloc.usage(0)["paused"] == 4 * MiB
    cuda_alloc.resume("weights")
    assert cuda_alloc.usage(0)["mapped"] == held
    assert ctypes.string_at(w + 4 * MiB - 3, 3) == b"\x07\x07\x07"  # same address, same bytes

    with pytest.raises(cuda_alloc.AllocatorError, match="'nope'"):
        cuda_alloc.pause("nope")
    with pytest.raises(cuda_alloc.AllocatorError, match="not paused"):
        cuda_alloc.resume("weights")
    lib.lema_free(w, 4 * MiB, 0, None)
    lib.lema_free(other, MiB, 0, None)


def test_torch_tensors_keep_their_address_across_pause_and_resume():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pool = cuda_alloc.mem_pool()
    with torch.cuda.use_mem_pool(pool), cuda_alloc.tag("weights"):
        x = torch.ones(8 * MiB, device="cuda")
    address = x.data_ptr()
    torch.cuda.synchronize()
    cuda_alloc.pause("weights", keep_contents=True)
    cuda_alloc.resume("weights")
    assert x.data_ptr() == address
    assert float(x.sum()) == 8 * MiB
