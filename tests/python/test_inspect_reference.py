"""`lema inspect --json` reads files written by the reference packages exactly as they are."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from conftest import file_bytes, inspect_json, read_header, run_lema

# Every element type torch can hand to safetensors, where this torch has it.
DTYPES = [
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64",
    "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float4_e2m1fn_x2",
]


def reference_tensors() -> dict:
    g = torch.Generator().manual_seed(1234)
    out = {}
    for i, name in enumerate(DTYPES):
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        raw = torch.randint(0, 256, (3, 5), dtype=torch.uint8, generator=g)
        if dtype == torch.bool:
            t = raw % 2 == 1
        elif dtype.itemsize == 1:
            t = raw.view(dtype)
        else:
            t = torch.randint(0, 256, (3, 5 * dtype.itemsize), dtype=torch.uint8,
                              generator=g).view(dtype)
        out[f"t{i:02d}.{name}"] = t
    out["empty"] = torch.zeros((0, 3), dtype=torch.float32)
    out["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    out["scalar_i8"] = torch.tensor(-7, dtype=torch.int8)
    return out


def tensor_bytes(name, t) -> bytes:
    """The tensor's bytes as the reference writer stores them."""
    blob = save({name: t})
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n:]


def check_against_file(doc: dict, path: str, tensors: dict):
    n, header = read_header(path)
    meta = header.pop("__metadata__", {})
    [f] = [f for f in doc["files"] if os.path.samefile(f["path"], path)]
    assert f["header_bytes"] == 8 + n
    assert f["metadata"] == meta
    mine = {t["name"]: t for t in doc["tensors"] if os.path.samefile(t["file"], path)}
    assert set(mine) == set(header)
    with safe_open(path, framework="pt") as st:
        for name, info in header.items():
            t = mine[name]
            assert t["dtype"] == info["dtype"], name
            assert t["shape"] == info["shape"], name
            begin, end = info["data_offsets"]
            assert t["offset"] == 8 + n + begin, name
            assert t["nbytes"] == end - begin, name
            expected = tensor_bytes(name, tensors[name] if tensors else st.get_tensor(name))
            assert file_bytes(path, t["offset"], t["nbytes"]) == expected, name


def test_every_dtype_written_by_the_reference(tmp):
    tensors = reference_tensors()
    path = str(tmp / "all.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "ünïcode ok", "empty": ""})
    doc = inspect_json(path)
    assert len(doc["files"]) == 1
    assert len(doc["tensors"]) == len(tensors)
    check_against_file(doc, path, tensors)
    assert doc["total_bytes"] == sum(t["nbytes"] for t in doc["tensors"])
    # Ordered by offset, as the contract says.
    offsets = [t["offset"] for t in doc["tensors"]]
    assert offsets == sorted(offsets)


def test_directory_with_one_file_and_no_metadata(tmp):
    tensors = {"a": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    save_file(tensors, str(tmp / "model.safetensors"))
    doc = inspect_json(tmp)
    check_against_file(doc, str(tmp / "model.safetensors"), tensors)
    assert doc["files"][0]["metadata"] == {}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def test_sharded_checkpoint_saved_by_transformers(tmp):
    model = tiny_llama()
    model.save_pretrained(tmp, max_shard_size="100KB")
    index = json.loads((tmp / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    doc = inspect_json(tmp)
    assert sorted(os.path.basename(f["path"]) for f in doc["files"]) == shards
    names = {t["name"]: t for t in doc["tensors"]}
    assert set(names) == set(index["weight_map"])
    for name, t in names.items():
        assert os.path.basename(t["file"]) == index["weight_map"][name]
    assert doc["total_bytes"] == index["metadata"]["total_size"]
    state = model.state_dict()
    for name, t in names.items():
        assert t["shape"] == list(state[name].shape)
    for shard in shards:
        check_against_file(doc, str(tmp / shard), None)


@pytest.mark.parametrize("case", ["truncated", "bad_json", "huge_header", "short"])
def test_broken_file_is_one_error_line(tmp, case):
    path = tmp / f"{case}.safetensors"
    good = save({"w": torch.ones(4, 4)})
    if case == "truncated":
        data = good[:-5]
    elif case == "bad_json":
        n = int.from_bytes(good[:8], "little")
        data = good[:8] + b"{" * n + good[8 + n:]
    elif case == "huge_header":
        data = (200_000_000).to_bytes(8, "little") + good[8:]
    else:
        data = b"\x01\x02"
    path.write_bytes(data)
    proc = run_lema("inspect", path, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path}"), lines[0]
