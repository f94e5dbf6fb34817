"""Qwen2-MoE specifics beyond test_model_families.py (which checks its logits, loss with the
router's term, generation, budgeted training, peft adapters and merging):
- a config whose features cannot run together is refused by train and generate in one line
  naming the setting;
- a step reads the shared expert and the chosen experts, never an expert no token chose.
"""
import json

import pytest

from conftest import run_lema
from hf_models import route_tokens_to_pairs, step_one_bytes_read

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides):
    config = transformers.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    config.architectures = ["Qwen2MoeForCausalLM"]
    values = config.to_dict()
    values.update(overrides)
    return values


@pytest.mark.parametrize("overrides,needles", [
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok 9 exceeds num_experts 8"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu", "silu"]),
    ({"attention_bias": True}, ["attention_bias", "Qwen2MoeForCausalLM"]),
])
def test_unsupported_settings_are_refused_in_one_line(tmp_path, overrides, needles):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(tiny_config(**overrides)))
    for command in (["train", "--out", tmp_path / "out"], ["generate", "--prompt-ids", "1"]):
        proc = run_lema(command[0], "--model", model_dir, *command[1:], check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert all(n in lines[0] for n in ["config.json", *needles]), lines[0]
    assert not (tmp_path / "out").exists()


def skewed_qwen2_moe(out):
    """Top-2 of 8 experts whose router sends every token to experts 0 and 1 (one dominant
    hidden dimension that only their router rows weigh); each routed expert tensor is one 2 MiB
    page, so the bytes read show which experts ran. The shared expert is small and always runs."""
    hidden, experts = 128, 8
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=hidden, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, num_experts=experts,
        num_experts_per_tok=2, moe_intermediate_size=4096, shared_expert_intermediate_size=256,
        tie_word_embeddings=True))
    route_tokens_to_pairs(model, hidden, experts, [(slice(None), (0, 1))])
    model.save_pretrained(out)
    return out


def test_a_step_reads_the_shared_and_chosen_experts_only(tmp_path):
    # LoRA on the shared expert: its projections must be read (and trained) every step.
    read, weights = step_one_bytes_read(skewed_qwen2_moe(tmp_path / "model"), tmp_path,
                                        "--target-modules", "gate_proj,up_proj,down_proj")
    # The chosen pair of 8 experts per layer: their 6 tensors of 2 MiB lie on 9 pages (the
    # layout groups every expert's gate_proj, then up_proj, then down_proj), under 0.4 of the file.
    assert 0 < read <= 0.4 * weights, (read, weights)
    adapter = (tmp_path / "out" / "adapter_config.json").read_text()
    assert sorted(json.loads(adapter)["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
