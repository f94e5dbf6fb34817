"""The PyTorch plugin (torch.ops.lema, python/lema) gives the same tensors as safetensors."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_lema

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
import lema  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-plugin") / "m"
    run_lema("gen", "--out", out, "--force", "--preset", "small", "--seed", "5")
    files = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(files) == 1
    return out / files[0]


def test_every_tensor_equals_the_reference_under_a_small_budget(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    reference = load_file(model)
    total = sum(t.nbytes for t in reference.values())
    largest = max(t.nbytes for t in reference.values())
    budget = max(total // 4, 2 * largest + (4 << 20))
    with lema.open(model, budget=budget, mode="guard") as ckpt:
        tensors = ckpt.named_tensors()
        assert sorted(tensors) == sorted(reference)
        for name, want in reference.items():
            got = tensors[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
        stats = ckpt.stats()
        assert stats["peak_resident_bytes"] <= budget
        assert stats["bytes_read"] >= total


def test_a_matmul_with_a_weight_equals_the_reference(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    reference = load_file(model)
    name = next(n for n in reference if n.endswith("mlp.up_proj.weight"))
    x = torch.randn(3, reference[name].shape[1], generator=torch.Generator().manual_seed(0),
                    dtype=reference[name].dtype)
    with lema.open(model, budget="16MiB") as ckpt:
        w = ckpt.tensor(name)
    # The checkpoint object is closed; the tensor keeps it open.
    assert torch.equal(x @ w.T, x @ reference[name].T)


def test_writing_into_a_read_only_weight_raises_naming_it(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    with lema.open(model, budget="16MiB", read_only=True) as ckpt:
        name = ckpt.names()[0]
        w = ckpt.tensor(name)
        with pytest.raises(RuntimeError, match=name.replace(".", r"\.")):
            w.add_(1)


def test_bad_settings_are_refused():
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    with pytest.raises(ValueError):
        lema.parse_size("lots")
    with pytest.raises(RuntimeError, match="mode"):
        lema.open("/nonexistent.safetensors", mode="sometimes")
    with pytest.raises(RuntimeError, match="unknown device 'tpu'"):
        lema.open("/nonexistent.safetensors", device="tpu")
    with pytest.raises(RuntimeError, match="unknown gpu_memory 'uvm'"):
        lema.open("/nonexistent.safetensors", device="cuda", gpu_memory="uvm")


def test_gpu_settings_are_checked(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    with pytest.raises(RuntimeError, match="needs weights on a GPU"):
        lema.open(model, gpu_memory="managed")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            lema.open(model, device="cuda")
