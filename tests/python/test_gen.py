"""Checkpoints written by `lema gen` load with the reference packages and are deterministic."""
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import inspect_json, run_lema

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def gen(out, *args):
    run_lema("gen", "--out", out, "--force", *args)
    return out


def load_all(path) -> dict:
    """Every tensor of a gen output directory, read with safetensors.safe_open."""
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    tensors = {}
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
            for name in st.keys():
                assert name not in tensors
                tensors[name] = st.get_tensor(name)
    return tensors


def expected_shapes(cfg) -> dict:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [v, h]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": [cfg["num_attention_heads"] * cfg["head_dim"], h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, cfg["num_attention_heads"] * cfg["head_dim"]],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        })
    return shapes


CASES = [
    ("tiny", "f32", None, False),
    ("tiny", "bf16", "64KiB", False),
    ("tiny", "f16", "100KiB", True),
    ("small", "f32", "4MiB", False),
    ("small", "bf16", None, True),
]


@pytest.mark.parametrize("preset,dtype,shard,tie", CASES)
def test_gen_loads_with_the_reference(tmp, preset, dtype, shard, tie):
    from transformers import LlamaForCausalLM
    args = ["--preset", preset, "--dtype", dtype, "--seed", "7"]
    if shard:
        args += ["--shard-size", shard]
    if tie:
        args += ["--tie-embeddings"]
    out = gen(tmp / "m", *args)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] == tie

    tensors = load_all(out)
    shapes = expected_shapes(cfg)
    assert set(tensors) == set(shapes)
    for name, t in tensors.items():
        assert list(t.shape) == shapes[name], name
        assert t.dtype == TORCH_DTYPES[dtype], name
        if name.endswith("norm.weight"):
            assert torch.all(t == 1), name
        else:
            std = t.float().std().item()
            assert abs(t.float().mean().item()) < 0.002, name
            assert 0.018 < std < 0.022, (name, std)

    # Written byte for byte as the reference writer writes the same tensors.
    for f in sorted(p for p in os.listdir(out) if p.endswith(".safetensors")):
        with safe_open(str(out / f), framework="pt") as st:
            ref = {k: st.get_tensor(k) for k in st.keys()}
        save_file(ref, str(tmp / "ref.safetensors"), metadata={"format": "pt"})
        assert (out / f).read_bytes() == (tmp / "ref.safetensors").read_bytes(), f

    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(shapes)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values())
        doc = inspect_json(out)
        assert len(doc["files"]) == len(set(index["weight_map"].values())) > 1
    else:
        assert not (out / "model.safetensors.index.json").exists()

    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                   dtype=TORCH_DTYPES[dtype])
    for key, value in info.items():
        assert not value, (key, value)
    for name, t in model.state_dict().items():
        if name in tensors:
            assert torch.equal(t, tensors[name]), name
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, cfg["vocab_size"])
    assert torch.isfinite(logits.float()).all()


def test_sharding_matches_save_pretrained(tmp):
    """Same shard files and index as transformers writes for the same model and limit."""
    from transformers import LlamaConfig, LlamaForCausalLM
    limit = 150_000
    out = gen(tmp / "m", "--preset", "tiny", "--shard-size", str(limit))
    # A model built from the config walks its state dict in module order, as gen does (a model
    # re-saved after from_pretrained may be re-sorted by newer transformers releases).
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(out))
    model.load_state_dict(load_all(out))
    model.save_pretrained(tmp / "ref", max_shard_size=limit)
    ours = json.loads((out / "model.safetensors.index.json").read_text())
    ref = json.loads((tmp / "ref" / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == ref["weight_map"]
    assert ours["metadata"]["total_size"] == ref["metadata"]["total_size"]
    for f in set(ref["weight_map"].values()):
        assert (out / f).read_bytes() == (tmp / "ref" / f).read_bytes(), f


def test_half_precision_is_the_f32_values_rounded_to_nearest_even(tmp):
    full = load_all(gen(tmp / "f32", "--preset", "tiny", "--seed", "3"))
    for dtype in ("f16", "bf16"):
        half = load_all(gen(tmp / dtype, "--preset", "tiny", "--seed", "3", "--dtype", dtype))
        for name, t in full.items():
            assert torch.equal(t.to(TORCH_DTYPES[dtype]), half[name]), (dtype, name)


def test_deterministic_for_a_seed_and_independent_of_sharding(tmp):
    a = gen(tmp / "a", "--preset", "small", "--seed", "11")
    b = gen(tmp / "b", "--preset", "small", "--seed", "11")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    sharded = load_all(gen(tmp / "s", "--preset", "small", "--seed", "11", "--shard-size", "3MiB"))
    single = load_all(a)
    assert sharded.keys() == single.keys()
    for name in single:
        assert torch.equal(sharded[name], single[name]), name
    other = load_all(gen(tmp / "c", "--preset", "small", "--seed", "12"))
    for name, t in single.items():
        if not name.endswith("norm.weight"):
            assert not torch.equal(t, other[name]), name


def test_force_replaces_an_earlier_checkpoint(tmp):
    out = gen(tmp / "m", "--preset", "tiny", "--shard-size", "64KiB")
    assert (out / "model.safetensors.index.json").exists()
    gen(out, "--preset", "tiny")
    names = sorted(p for p in os.listdir(out) if "safetensors" in p)
    assert names == ["model.safetensors"]


def test_refuses_a_non_empty_directory_without_force(tmp):
    (tmp / "m").mkdir()
    (tmp / "m" / "keep.txt").write_text("mine")
    proc = run_lema("gen", "--out", tmp / "m", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "--force" in proc.stderr
    assert os.listdir(tmp / "m") == ["keep.txt"]


@pytest.mark.parametrize("args,setting", [
    (["--hidden", "100", "--heads", "3"], "--heads"),
    (["--heads", "4", "--kv-heads", "3"], "--kv-heads"),
    (["--layers", "0"], "--layers"),
    (["--vocab", "0"], "--vocab"),
    (["--hidden", "0"], "--hidden"),
    (["--shard-size", "lots"], "--shard-size"),
])
def test_bad_settings_name_the_setting(tmp, args, setting):
    proc = run_lema("gen", "--out", tmp / "m", *args, check=False)
    assert proc.returncode != 0
    assert setting in proc.stderr, proc.stderr
    assert not (tmp / "m" / "config.json").exists()
