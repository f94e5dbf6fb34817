"""Writes to LEMA weights are kept, never lost and never written to the checkpoint.

An in-place op on a weight survives the eviction of its pages (they go to the spill store and
come back from there), in guard and fault mode; peft's merge_and_unload() over LEMA weights gives
the logits it gives over plain tensors; the checkpoint file's sha256 never changes; a checkpoint
opened read_only refuses the write before it happens, naming the weight.
"""
import hashlib
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_lema

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
import lema  # noqa: E402

transformers = pytest.importorskip("transformers")


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("weight-writes") / "m"
    run_lema("gen", "--out", out, "--force", "--preset", "small", "--seed", "11")
    files = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert len(files) == 1
    return out, out / files[0]


def quarter_budget(reference) -> int:
    """A quarter of the model, or what the largest op needs at once when that is more."""
    total = sum(t.nbytes for t in reference.values())
    largest = max(t.nbytes for t in reference.values())
    return max(total // 4, 2 * largest + (4 << 20))


@pytest.mark.parametrize("mode", ["guard", "fault"])
def test_an_in_place_op_survives_eviction(model, mode):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    _, path = model
    before = sha256(path)
    reference = load_file(path)
    name = next(n for n in reference if n.endswith("layers.0.self_attn.q_proj.weight"))
    with lema.open(path, budget=quarter_budget(reference), mode=mode) as ckpt:
        w = ckpt.tensor(name)
        w.mul_(2)
        assert torch.equal(w, reference[name] * 2)
        # Every other tensor read: the doubled pages are evicted, the budget being a quarter.
        for other, want in reference.items():
            if other != name:
                assert torch.equal(ckpt.tensor(other), want), other
        stats = ckpt.stats()
        assert stats["writable"]
        assert stats["dirty_evictions"] >= 1 and stats["spilled_pages"] >= 1, stats
        assert torch.equal(w, reference[name] * 2), "the write was lost at eviction"
        assert ckpt.stats()["spill_fills"] >= 1
    assert sha256(path) == before


def test_read_only_refuses_the_write_naming_the_weight(model):
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    _, path = model
    for mode in ("guard", "fault"):
        with lema.open(path, budget="16MiB", mode=mode, read_only=True) as ckpt:
            name = ckpt.names()[0]
            w = ckpt.tensor(name)
            want = w.clone()
            with pytest.raises(RuntimeError, match=name.replace(".", r"\.") + ".*read-only"):
                w.add_(1)
            assert torch.equal(w, want)
            assert not ckpt.stats()["writable"]


def llama_over(model_dir, tensors):
    """A transformers Llama whose parameters are `tensors` themselves (not copies)."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(config)
    m.load_state_dict(tensors, assign=True, strict=False)
    if config.tie_word_embeddings:
        m.tie_weights()
    # Buffers (rotary frequencies) were made on the meta device: make them again on the CPU.
    rotary = type(m.model.rotary_emb)(config=config)
    m.model.rotary_emb = rotary
    return m.eval()


@pytest.mark.parametrize("mode", ["guard", "fault"])
def test_peft_merge_and_unload_on_lema_weights_gives_the_plain_logits(model, mode):
    peft = pytest.importorskip("peft")
    lema.load_library(os.environ["LEMA_TORCH_OPS"])
    model_dir, path = model
    before = sha256(path)
    reference = load_file(path)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 120, 1, 64, 33, 8, 90]])
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                  init_lora_weights=False)  # random adapters: the merge changes the weights

    torch.manual_seed(0)
    plain = peft.get_peft_model(llama_over(model_dir, dict(reference)),
                                peft.LoraConfig(**config))
    adapters = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    with torch.no_grad(), plain.disable_adapter():
        base_logits = plain(input_ids=ids).logits
    merged_plain = plain.merge_and_unload()
    with torch.no_grad():
        want = merged_plain(input_ids=ids).logits

    with lema.open(path, budget=quarter_budget(reference), mode=mode) as ckpt:
        lema_model = peft.get_peft_model(llama_over(model_dir, ckpt.named_tensors()),
                                         peft.LoraConfig(**config))
        missing = lema_model.load_state_dict(adapters, strict=False)
        assert not missing.unexpected_keys
        merged = lema_model.merge_and_unload()
        with torch.no_grad():
            got = merged(input_ids=ids).logits
            # A second forward: every layer was evicted (a quarter budget) since the merge.
            again = merged(input_ids=ids).logits
        stats = ckpt.stats()
        assert stats["dirty_evictions"] >= 1, stats
    assert (want - base_logits).abs().max().item() > 1e-3, "the adapters changed nothing"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    assert sha256(path) == before
