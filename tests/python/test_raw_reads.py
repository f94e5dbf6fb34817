"""Reads of lema weights outside any op (numpy, torch.save, save_pretrained, torch.compile on
CPU) get the file's bytes under a budget smaller than the model, in guard mode: the guard's
fault fallback serves them instead of SIGSEGV."""
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_lema

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
import lema  # noqa: E402

BUDGET = 8 << 20  # the small preset is about 20 MB


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw-reads") / "m"
    run_lema("gen", "--out", out, "--force", "--preset", "small", "--seed", "7")
    return out


@pytest.fixture(scope="module")
def reference(model):
    files = sorted(p for p in os.listdir(model) if p.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(model / f))
    assert sum(t.nbytes for t in out.values()) > 2 * BUDGET
    return out


def open_guarded(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    ckpt = lema.open(model, budget=BUDGET, mode="guard")
    stats = ckpt.stats()
    assert stats["mode"] == "guard"
    assert stats["fault_fallback_reason"] == ""
    return ckpt


def check_stats(ckpt):
    stats = ckpt.stats()
    assert stats["fallback_faults"] > 0
    assert stats["peak_resident_bytes"] <= BUDGET
    assert stats["evictions"] > 0


def test_numpy_reads_every_weight(model, reference):
    with open_guarded(model) as ckpt:
        for _ in range(2):  # the second pass finds the first pages evicted
            for name, want in reference.items():
                got = ckpt.tensor(name).detach().numpy()
                assert np.array_equal(got, want.numpy()), name
                assert got.sum() == want.numpy().sum(), name
        check_stats(ckpt)


def test_torch_save_then_load_is_equal(model, reference, tmp_path):
    with open_guarded(model) as ckpt:
        torch.save(ckpt.named_tensors(), tmp_path / "state.pt")
        check_stats(ckpt)
    loaded = torch.load(tmp_path / "state.pt")
    assert sorted(loaded) == sorted(reference)
    for name, want in reference.items():
        assert torch.equal(loaded[name], want), name


def llama_over(ckpt, model):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.from_pretrained(model)
    net = LlamaForCausalLM(config).eval()
    missing, unexpected = net.load_state_dict(ckpt.named_tensors(), strict=False, assign=True)
    assert not unexpected
    assert all(n == "lm_head.weight" and config.tie_word_embeddings for n in missing), missing
    return net


def test_save_pretrained_writes_the_weights(model, reference, tmp_path):
    with open_guarded(model) as ckpt:
        net = llama_over(ckpt, model)
        net.save_pretrained(tmp_path / "saved")  # safetensors: write(2) from the weights
        check_stats(ckpt)
    saved = {}
    for f in os.listdir(tmp_path / "saved"):
        if f.endswith(".safetensors"):
            saved.update(load_file(tmp_path / "saved" / f))
    for name, want in reference.items():
        if name in saved:
            assert torch.equal(saved[name], want), name
    assert "model.layers.0.mlp.up_proj.weight" in saved


def test_torch_compile_on_cpu_equals_eager(model, reference):
    with open_guarded(model) as ckpt:
        w = {n: ckpt.tensor(n) for n in ckpt.names() if n.startswith("model.layers.0.")}
        norm = w["model.layers.0.post_attention_layernorm.weight"]
        gate = w["model.layers.0.mlp.gate_proj.weight"]
        up = w["model.layers.0.mlp.up_proj.weight"]
        down = w["model.layers.0.mlp.down_proj.weight"]

        def mlp(x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm
            return torch.nn.functional.linear(
                torch.nn.functional.silu(h @ gate.T) * (h @ up.T), down)

        x = torch.randn(4, norm.shape[0], generator=torch.Generator().manual_seed(0))
        eager = mlp(x)
        compiled = torch.compile(mlp, backend="inductor")
        for _ in range(2):
            # Every page evicted: the compiled kernels' own reads must fault them back in.
            for name in reference:
                ckpt.tensor(name).detach().numpy().sum()
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        check_stats(ckpt)
