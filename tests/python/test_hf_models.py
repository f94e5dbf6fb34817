"""lema.from_pretrained against plain transformers, architecture by architecture: LoRA steps
under a quarter budget give the same losses and adapter bytes, greedy generate the same tokens.
Equality is bitwise: the weights are the same bytes, read by the same kernels in the same order
(the guard only makes pages resident before an op runs)."""
import pytest
import torch

from hf_models import ARCHITECTURES, VOCAB, import_installed_lema, make_model, quarter_budget

lema = import_installed_lema()
STEPS = 3


# Every linear layer; for Mixtral not the experts' fused tensors, which peft's "all-linear" also
# targets (as parameters) on a plain model: over paged experts they are assembled per forward,
# not parameters (Note [Paged experts]), so LoRA there is not offered.
TARGETS = {"mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate"]}


def lora_run(model, out, arch):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(arch, "all-linear"))
    model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        tokens = model.generate(input_ids=ids[:1, :4], max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    model.save_pretrained(out)
    return losses, tokens, model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_steps_and_generate_equal_plain_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    path = str(make_model(arch, tmp_path / arch))
    budget = quarter_budget(path)

    ours = lema.from_pretrained(path, budget=budget)
    assert type(ours).__name__ == type(AutoModelForCausalLM.from_pretrained(path)).__name__
    assert ours.stats()["bytes_read"] == 0, "a weight byte was read at load"
    assert ours.name_or_path == path

    want_losses, want_tokens, _ = lora_run(AutoModelForCausalLM.from_pretrained(path),
                                           tmp_path / "plain", arch)
    got_losses, got_tokens, peft_model = lora_run(ours, tmp_path / "lema", arch)

    assert got_losses == want_losses
    assert torch.equal(got_tokens, want_tokens)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "lema" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    stats = lema.stats(peft_model)
    assert stats["bytes_read"] > 0
    assert 0 < stats["peak_resident_bytes"] <= budget
    assert stats["evictions"] > 0, "a quarter budget should page"
