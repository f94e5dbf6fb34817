"""The trainer's Llama decoder against transformers and peft (CPU, float32).

For each checkpoint shape the logits and loss of `trainer_logits_dump` (our model) must match
LlamaForCausalLM / MistralForCausalLM to 1e-4 relative; an adapter written by our adapter writer
must load with peft.PeftModel.from_pretrained and give the logits our model gives with it.
"""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_lema

transformers = pytest.importorskip("transformers")

IDS = [[5, 17, 3, 99, 42, 7, 120, 1, 64, 33, 8, 90], [2, 2, 250, 31, 77, 18, 5, 6, 140, 11, 0, 3]]
RTOL = 1e-4


def dump_tool() -> str:
    path = os.environ.get("LEMA_LOGITS_DUMP")
    if not path:
        pytest.fail("LEMA_LOGITS_DUMP must name trainer_logits_dump (ctest sets it)")
    return path


def ours(model_dir, tmp, *extra, ids=IDS):
    out = tmp / "ours.safetensors"
    text = ";".join(",".join(map(str, row)) for row in ids)
    proc = subprocess.run([dump_tool(), str(model_dir), text, str(out), *map(str, extra)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = load_file(out)
    return got["logits"], got["loss"]


def reference(model_dir, ids=IDS):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = (transformers.MistralForCausalLM if config.model_type == "mistral"
           else transformers.LlamaForCausalLM)
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model


def assert_close(got, want, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= RTOL * max(scale, 1e-6), f"{what}: max abs error {err} against scale {scale}"


def check_parity(model_dir, tmp, ids=IDS):
    model = reference(model_dir)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), labels=torch.tensor(ids))
    logits, loss = ours(model_dir, tmp, ids=ids)
    assert logits.shape == out.logits.shape
    assert_close(logits, out.logits.float(), "logits")
    assert abs(loss.item() - out.loss.item()) <= RTOL * abs(out.loss.item()), \
        f"loss {loss.item()} vs {out.loss.item()}"
    return logits


def gen(tmp, name, *args):
    out = tmp / name
    run_lema("gen", "--out", out, "--preset", "tiny", "--vocab", 256, "--seed", 3, *args)
    return out


def edit_config(model_dir, **fields):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config, indent=2))


def test_plain_llama(tmp):
    check_parity(gen(tmp, "plain", "--kv-heads", 4), tmp)


def test_grouped_query_attention(tmp):
    check_parity(gen(tmp, "gqa", "--heads", 4, "--kv-heads", 1, "--rope-theta", 500000), tmp)


def test_tied_embeddings(tmp):
    check_parity(gen(tmp, "tied", "--tie-embeddings"), tmp)


def test_llama3_rope_scaling(tmp):
    model_dir = gen(tmp, "llama3", "--rope-theta", 500000)
    # Positions far enough apart for the scaled frequencies to matter.
    ids = [[(7 * i + 3) % 256 for i in range(96)]]
    unscaled, _ = ours(model_dir, tmp, ids=ids)
    # Long-wavelength frequencies are divided by the factor, the middle band is interpolated.
    edit_config(model_dir, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64})
    scaled = check_parity(model_dir, tmp, ids=ids)
    assert (scaled - unscaled).abs().max().item() > 10 * RTOL * scaled.abs().max().item()


def test_mistral_saved_by_transformers(tmp):
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, sliding_window=4096,
        rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config)
    # Random norms, so the norm weights are checked too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model_dir = tmp / "mistral"
    model.save_pretrained(model_dir)
    check_parity(model_dir, tmp)


def test_llama3_saved_by_transformers(tmp):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 2.0, "original_max_position_embeddings": 32},
        rope_theta=50000.0)
    torch.manual_seed(1)
    model_dir = tmp / "llama3-hf"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    check_parity(model_dir, tmp)


def test_adapter_loads_in_peft_with_the_same_logits(tmp):
    peft = pytest.importorskip("peft")
    model_dir = gen(tmp, "adapted")
    adapter_dir = tmp / "adapter"
    with_adapter, _ = ours(model_dir, tmp, "--random-adapter", 7, "--rank", 4, "--alpha", 8,
                           "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "--save-adapter", adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = load_file(adapter_dir / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys

    base = reference(model_dir)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    # The adapter must matter, or the comparison would prove little.
    assert (want - base_logits).abs().max().item() > 1e-2
    assert_close(with_adapter, want, "logits with the adapter (as written)")
    # And our reader gives the same model back.
    reread, _ = ours(model_dir, tmp, "--adapter", adapter_dir)
    assert_close(reread, want, "logits with the adapter (read back)")

    # An adapter written by peft itself reads back the same.
    peft_dir = tmp / "peft-written"
    peft_model.save_pretrained(peft_dir)
    from_peft, _ = ours(model_dir, tmp, "--adapter", peft_dir)
    assert_close(from_peft, want, "logits with the adapter peft wrote")


def test_llama_with_attention_and_mlp_biases(tmp):
    # attention_bias puts a bias on q, k, v and o; mlp_bias on gate, up and down.
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
        attention_bias=True, mlp_bias=True)
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model_dir = tmp / "llama-bias"
    model.save_pretrained(model_dir)
    check_parity(model_dir, tmp)
