"""The PyTorch plugin (torch.ops.lema, python/lema) gives the same tensors as safetensors."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_lema

PACKAGE_PARENT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "python"))
sys.path.insert(0, PACKAGE_PARENT)
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


def test_shared_host_cache_from_the_environment(model, monkeypatch):
    """LEMA_SHARED_HOST_CACHE reaches the runtime from Python (lema.open, and so
    lema.from_pretrained): a second open of the checkpoint copies the pages the first read from
    shared memory instead of reading the file."""
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    monkeypatch.setenv("LEMA_SHARED_HOST_CACHE", "64MiB")
    reference = load_file(model)
    with lema.open(model, budget="64MiB", mode="guard") as first:
        for name, t in first.named_tensors().items():
            assert torch.equal(t, reference[name]), name
        assert first.stats()["shared_host_cache_bytes"] > 0
        with lema.open(model, budget="64MiB", mode="guard") as second:
            for name, t in second.named_tensors().items():
                assert torch.equal(t, reference[name]), name
            stats = second.stats()
            assert stats["bytes_read"] == 0 and stats["shared_cache_hits"] > 0, stats


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


def test_pause_gives_the_weights_memory_back_and_resume_refills_them(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    reference = load_file(model)
    with lema.open(model, budget="16MiB", mode="guard") as ckpt:
        tensors = ckpt.named_tensors()
        name = next(iter(reference))
        assert torch.equal(tensors[name], reference[name])
        ckpt.pause()
        assert ckpt.stats()["resident_bytes"] == 0
        with pytest.raises(RuntimeError, match=r"paused.*resume\(\)"):
            tensors[name].sum()
        with pytest.raises(RuntimeError, match="not paused"):
            ckpt.resume()
            ckpt.resume()
        for n, want in reference.items():
            assert torch.equal(tensors[n], want), n


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


def test_budgets_are_read_as_the_command_line_reads_them(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    reference = load_file(model)
    total = sum(t.nbytes for t in reference.values())
    with lema.open(model, budget="unlimited") as ckpt:
        for name, want in reference.items():
            assert torch.equal(ckpt.tensor(name), want), name
        stats = ckpt.stats()
        # Every page resident: nothing read twice, the budget holds the whole model.
        assert stats["budget_bytes"] >= total and stats["evictions"] == 0
    for budget in ("16MiB", "16 MiB", 16 << 20):
        with lema.open(model, budget=budget) as ckpt:
            assert ckpt.stats()["budget_bytes"] == 16 << 20, budget
    with pytest.raises(ValueError, match="lots"):
        lema.open(model, budget="lots")


def test_a_budget_too_small_for_an_op_names_the_budget_argument(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    reference = load_file(model)
    name = "lm_head.weight"  # 4 MiB: more than one 2 MiB page
    x = torch.ones(1, reference[name].shape[1])
    with lema.open(model, budget="2MiB") as ckpt:
        w = ckpt.tensor(name)
        with pytest.raises(RuntimeError) as error:
            x @ w.T
    message = str(error.value)
    assert "\n" not in message.strip(), message  # no C++ stack frames
    m = re.search(r"they span (\d+) pages of 2 MiB .* the smallest budget that works is \d+ MiB "
                  r"\((\d+) bytes\): raise the budget \(budget=\) to at least that", message)
    assert m and name in message, message
    assert "--budget" not in message and "page size" not in message, message
    smallest = int(m.group(2))
    assert smallest == int(m.group(1)) << 21
    # That budget is enough for this op, one page less is not.
    with lema.open(model, budget=smallest) as ckpt:
        assert torch.equal(x @ ckpt.tensor(name).T, x @ reference[name].T)
    with lema.open(model, budget=smallest - (2 << 20)) as ckpt:
        with pytest.raises(RuntimeError, match="budget="):
            x @ ckpt.tensor(name).T


def run_python(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_load_library_finds_the_build_without_a_path():
    env = {k: v for k, v in os.environ.items() if k != "LEMA_TORCH_OPS"}
    env["PYTHONPATH"] = PACKAGE_PARENT
    proc = run_python("import lema, torch; lema.load_library(); print(torch.ops.lema.open)", env)
    assert proc.returncode == 0, proc.stderr


def test_load_library_lists_every_place_it_looked(tmp_path):
    # A copy of the package with no library beside it and no build recorded.
    (tmp_path / "lema").mkdir()
    for module in ("__init__.py", "_native.py"):
        shutil.copy(os.path.join(PACKAGE_PARENT, "lema", module), tmp_path / "lema")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), LEMA_TORCH_OPS="/nonexistent/ops.so")
    proc = run_python("import lema; lema.load_library()", env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError"), proc.stderr
    assert "$LEMA_TORCH_OPS: /nonexistent/ops.so" in last, last
    assert str(tmp_path / "lema" / "liblema_torch_ops.so") in last, last


def test_causal_lm_gives_the_reference_logits_and_peft_records_its_base(model, tmp_path):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    model_dir = model.parent
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    ours = lema.causal_lm(model_dir, budget="8MiB")
    assert ours.name_or_path == str(model_dir) and ours.config._name_or_path == str(model_dir)
    reference = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
    assert 0 < ours.lema_checkpoint.stats()["peak_resident_bytes"] <= 8 << 20
    adapter = get_peft_model(ours, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    import json
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(model_dir)
