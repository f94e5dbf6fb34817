"""Qwen2, Qwen3, GPT-2, Mixtral and Qwen2-MoE checkpoints saved by transformers, against
transformers and peft.

For each family, a small random model written by save_pretrained:
- the logits and loss of our decoder equal transformers' (1e-4 relative), also with an adapter
  our writer saved, which peft loads and which gives peft's logits; an adapter peft wrote reads
  back the same;
- greedy `lema generate` continuations equal transformers' generate(), with and without the
  key/value cache, and with the adapter equal peft's;
- `lema train` under a quarter of the model as budget gives the losses of an unlimited budget,
  bit for bit, its adapter loads in peft on the transformers model, and `lema merge` of it gives
  peft's logits.
Mixtral also: its router's auxiliary loss is part of the loss compared, its layers' recompute
trains as keeping the activations does, and an expert no token chose is never read. Qwen2-MoE
(sparse and dense layers, a shared expert, adapted through peft's gate/up/down names) likewise;
test_qwen2_moe.py has its own cases.
Other architectures are refused in one line naming them, the supported list and the Python route.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_lema
from hf_models import route_tokens_to_pairs, step_one_bytes_read

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RTOL = 1e-4
IDS = [[5, 17, 3, 99, 42, 7, 120, 1, 64, 33, 8, 90], [2, 2, 250, 31, 77, 18, 5, 6, 140, 11, 0, 3]]
PROMPT = [1, 40, 41, 300, 7]
NEW_TOKENS = 10
# Large enough that a budget of a quarter holds the biggest op's pages (2 MiB each), small enough
# to train in seconds: about 24-28 MiB of float32 weights, no tensor above 2 MiB.
VOCAB = 2048
HIDDEN = 256
LAYERS = 6
BUDGET = "6MiB"


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True))


def qwen3():
    # head_dim is not hidden / heads, as in the published Qwen3 models.
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=VOCAB,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=8, n_head=4, n_positions=128, vocab_size=VOCAB,
        activation_function="gelu_new"))


def mixtral():
    # The router's auxiliary loss on (and weighted enough to show in the loss), 8 experts of
    # which 2 per token, each expert tensor its own checkpoint entry as save_pretrained writes.
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
        num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.05, tie_word_embeddings=False))


def qwen2_moe(norm_topk_prob=False):
    # Layers 1 and 5 sparse (decoder_sparse_step 2, layer 3 kept dense by mlp_only_layers), the
    # others a dense MLP; 8 experts of which 2 per token and a shared expert; the router's
    # auxiliary loss on. transformers' default leaves the top-k weights unnormalized.
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=256, rms_norm_eps=1e-6, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=128, shared_expert_intermediate_size=256, decoder_sparse_step=2,
        mlp_only_layers=[3], norm_topk_prob=norm_topk_prob, output_router_logits=True,
        router_aux_loss_coef=0.05, tie_word_embeddings=False))


FAMILIES = {"qwen2": qwen2, "qwen3": qwen3, "gpt2": gpt2, "mixtral": mixtral,
            "qwen2_moe": qwen2_moe}
TARGETS = {"qwen2": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
           "qwen3": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
           "gpt2": "c_attn,c_proj,c_fc",
           # transformers fuses the experts into 3-D parameters, which peft cannot target.
           "mixtral": "q_proj,k_proj,v_proj,o_proj",
           # gate/up/down: the shared expert's and the dense layers' MLP (the routed experts
           # are fused, as Mixtral's).
           "qwen2_moe": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}


def randomize(model):
    """Every parameter random (transformers starts biases at zero and norms at one, which would
    leave them unchecked), at scales that keep the logits spread so greedy choices are clear."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "wte" in name or "embed_tokens" in name or "wpe" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / HIDDEN ** 0.5)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    model = FAMILIES[name]().eval()
    randomize(model)
    out = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(out)
    return name, out


def reference(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def dump(model_dir, tmp, *extra, ids=IDS):
    tool = os.environ.get("LEMA_LOGITS_DUMP")
    if not tool:
        pytest.fail("LEMA_LOGITS_DUMP must name trainer_logits_dump (ctest sets it)")
    out = tmp / "ours.safetensors"
    text = ";".join(",".join(map(str, row)) for row in ids)
    proc = subprocess.run([tool, str(model_dir), text, str(out), *map(str, extra)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = load_file(out)
    return got["logits"], got["loss"]


def assert_close(got, want, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= RTOL * max(scale, 1e-6), f"{what}: max abs error {err} against scale {scale}"


def hf_greedy(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS)
    return out[0, len(PROMPT):].tolist()


def lema_greedy(model_dir, *extra):
    proc = run_lema("generate", "--model", model_dir, "--prompt-ids",
                    ",".join(map(str, PROMPT)), "--max-new-tokens", NEW_TOKENS, "--greedy",
                    "--json", "--ignore-eos", *extra)
    return json.loads(proc.stdout)["output_ids"]


def test_logits_loss_and_adapters_match_transformers_and_peft(family, tmp_path):
    name, model_dir = family
    base = reference(model_dir)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        out = base(input_ids=ids, labels=ids)
    logits, loss = dump(model_dir, tmp_path)
    assert logits.shape == out.logits.shape
    assert_close(logits, out.logits, "logits")
    assert abs(loss.item() - out.loss.item()) <= RTOL * abs(out.loss.item())

    adapter_dir = tmp_path / "adapter"
    with_adapter, _ = dump(model_dir, tmp_path, "--random-adapter", 7, "--rank", 4, "--alpha", 8,
                           "--targets", TARGETS[name], "--save-adapter", adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS[name].split(","))
    assert config["fan_in_fan_out"] == (name == "gpt2")
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    assert (want - out.logits).abs().max().item() > 1e-2  # the adapter matters
    assert_close(with_adapter, want, "logits with the adapter")
    peft_dir = tmp_path / "peft-written"
    peft_model.save_pretrained(peft_dir)
    from_peft, _ = dump(model_dir, tmp_path, "--adapter", peft_dir)
    assert_close(from_peft, want, "logits with the adapter peft wrote")

    # Greedy continuations: transformers' (with its own cache) = ours with and without a cache.
    want_tokens = hf_greedy(reference(model_dir))
    assert lema_greedy(model_dir) == want_tokens
    assert lema_greedy(model_dir, "--no-cache") == want_tokens
    adapted = hf_greedy(peft.PeftModel.from_pretrained(reference(model_dir), adapter_dir).eval())
    assert lema_greedy(model_dir, "--adapter", adapter_dir, "--budget", BUDGET) == adapted


def train(model_dir, data, out, budget):
    log = out.with_suffix(".jsonl")
    run_lema("train", "--model", model_dir, "--data", data, "--out", out, "--steps", 3,
             "--seq-len", 32, "--batch", 2, "--lr", "3e-3", "--seed", 5, "--budget", budget,
             "--log-json", log, "--threads", 1)
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_training_under_a_quarter_budget_matches_and_loads_in_peft(family, tmp_path):
    name, model_dir = family
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert 4 * (6 << 20) <= weights  # the budget is at most a quarter of the model
    data = tmp_path / "tokens.bin"
    np.random.default_rng(1).integers(0, VOCAB, 4096, dtype=np.uint16).tofile(data)
    resident = train(model_dir, data, tmp_path / "unlimited", "unlimited")
    paged = train(model_dir, data, tmp_path / "paged", BUDGET)
    assert [r["loss"] for r in paged] == [r["loss"] for r in resident]
    assert all(0 < r["peak_resident_bytes"] <= 6 << 20 for r in paged)
    adapter = tmp_path / "paged"
    assert (adapter / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "unlimited" / "adapter_model.safetensors").read_bytes()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS[name].split(","))

    ids = torch.tensor(IDS)
    peft_model = peft.PeftModel.from_pretrained(reference(model_dir), adapter).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    got, _ = dump(model_dir, tmp_path, "--adapter", adapter)
    assert_close(got, want, "logits with the trained adapter")
    # Merged into the weights (GPT-2's Conv1D ones transposed), transformers gives peft's logits.
    run_lema("merge", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "merged",
             "--budget", BUDGET)
    with torch.no_grad():
        merged = reference(tmp_path / "merged")(input_ids=ids).logits
    assert_close(merged, want, "logits of the merged model")


@pytest.mark.parametrize("arch,model_type", [("Phi3ForCausalLM", "phi3"),
                                             ("Gemma2ForCausalLM", "gemma2")])
def test_other_architectures_are_refused_in_one_line(tmp_path, arch, model_type):
    model_dir = tmp_path / model_type
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": model_type, "hidden_size": 64}))
    for command in (["train", "--out", tmp_path / "out"], ["generate", "--prompt-ids", "1"]):
        proc = run_lema(command[0], "--model", model_dir, *command[1:], check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        for needle in (arch, "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
                       "LlamaForCausalLM", "lema.from_pretrained"):
            assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_gpt2_weights_without_the_transformer_prefix(family, tmp_path):
    """The original GPT-2 uploads name their weights "h.0.attn.c_attn.weight", not
    "transformer.h.0..."; both are found (and the adapter keeps peft's module paths)."""
    name, model_dir = family
    if name != "gpt2":
        pytest.skip("GPT-2 only")
    from safetensors.torch import save_file
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              bare / "model.safetensors", metadata={"format": "pt"})
    assert not any(k.startswith("transformer.") for k in load_file(bare / "model.safetensors"))
    want, _ = dump(model_dir, tmp_path)
    got, _ = dump(bare, tmp_path)
    assert torch.equal(got, want)
    assert lema_greedy(bare) == lema_greedy(model_dir)


def test_gpt2_refuses_text_without_a_tokenizer_and_sequences_past_its_positions(family, tmp_path):
    name, model_dir = family
    if name != "gpt2":
        pytest.skip("GPT-2 only")
    text = tmp_path / "corpus.txt"
    text.write_text("some text " * 100)
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(1).integers(0, VOCAB, 4096, dtype=np.uint16).tofile(tokens)
    for data, seq, needles in ((text, 32, ["no tokenizer file", "python -m lema.data"]),
                               (tokens, 129, ["--seq-len 129", "128 learned positions"])):
        proc = run_lema("train", "--model", model_dir, "--data", data, "--out", tmp_path / "out",
                        "--steps", 1, "--seq-len", seq, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert all(n in lines[0] for n in needles), lines[0]
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def skewed_mixtral(out):
    """Top-2 of 8 experts whose router sends every token to experts 0 and 1: one hidden dimension
    of every embedding dominates, and only those two experts' router rows weigh it. Each expert
    tensor is one 2 MiB page, so the bytes read show which experts ran."""
    hidden, experts = 128, 8
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=hidden, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
        num_local_experts=experts, num_experts_per_tok=2, tie_word_embeddings=True))
    route_tokens_to_pairs(model, hidden, experts, [(slice(None), (0, 1))])
    model.save_pretrained(out)
    return out


def test_unchosen_experts_are_never_read(tmp_path):
    read, weights = step_one_bytes_read(skewed_mixtral(tmp_path / "model"), tmp_path)
    # Every weight but six of the 16 expert tensors per layer stays unread: under 0.3 of the file.
    assert 0 < read <= 0.3 * weights, (read, weights)


def test_mixtral_router_loss_trains_the_same_with_layer_checkpointing(tmp_path):
    """The router statistics leave a recomputed layer packed behind its output: the losses and
    the adapter equal those of a run that keeps every activation."""
    model = mixtral().eval()
    randomize(model)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    data = tmp_path / "tokens.bin"
    np.random.default_rng(2).integers(0, VOCAB, 4096, dtype=np.uint16).tofile(data)
    runs = {}
    for name, extra in (("recomputed", []), ("kept", ["--no-activation-checkpointing"])):
        log = tmp_path / f"{name}.jsonl"
        run_lema("train", "--model", model_dir, "--data", data, "--out", tmp_path / name,
                 "--steps", 3, "--seq-len", 16, "--batch", 2, "--lr", "3e-3", "--seed", 5,
                 "--budget", "unlimited", "--log-json", log, "--threads", 1, *extra)
        runs[name] = [(r["loss"], r["grad_norm"])
                      for r in map(json.loads, log.read_text().splitlines())]
    assert runs["recomputed"] == runs["kept"]


def padded_mixtral_batch():
    """Two rows, the second right-padded with id 0: labels -100 and attention mask 0 there."""
    ids = torch.tensor(IDS)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt, not learned
    return ids, labels, mask


ROUTED = {"mixtral": mixtral, "qwen2_moe": lambda: qwen2_moe(norm_topk_prob=False),
          "qwen2_moe_normalized": lambda: qwen2_moe(norm_topk_prob=True)}


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_router_loss_leaves_padding_out_and_lora_grads_match_peft(tmp_path, name):
    """On a padded batch, the loss (cross entropy plus the router's load-balancing term) equals
    transformers' given the attention mask, from `lema train` on prepared examples and from the
    model directly; the gradients of every LoRA matrix equal peft's. Qwen2-MoE's term counts its
    sparse layers only, with and without renormalized top-k weights."""
    model = ROUTED[name]().eval()
    randomize(model)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    ids, labels, mask = padded_mixtral_batch()
    base = reference(model_dir)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        unmasked = base(input_ids=ids, labels=labels).loss.item()
    assert abs(unmasked - want) > 3 * RTOL * abs(want)  # the padding would change the router term

    # `lema train`'s first step, on the two rows as prepared examples (its adapter starts as 0).
    data = tmp_path / "prepared.jsonl"
    data.write_text("".join(
        json.dumps({"input_ids": i[m == 1].tolist(), "labels": l[m == 1].tolist()}) + "\n"
        for i, l, m in zip(ids, labels, mask)))
    log = tmp_path / "log.jsonl"
    run_lema("train", "--model", model_dir, "--data", data, "--out", tmp_path / "out", "--steps",
             1, "--seq-len", ids.shape[1], "--batch", 2, "--budget", "unlimited", "--log-json",
             log, "--threads", 1)
    ours = json.loads(log.read_text().splitlines()[0])["loss"]
    assert abs(ours - want) <= RTOL * abs(want), (ours, want)

    # The model with a random adapter: loss and gradients against peft's.
    tool = os.environ.get("LEMA_LOGITS_DUMP")
    if not tool:
        pytest.fail("LEMA_LOGITS_DUMP must name trainer_logits_dump (ctest sets it)")
    text = lambda t: ";".join(",".join(map(str, row)) for row in t.tolist())  # noqa: E731
    adapter_dir, out = tmp_path / "adapter", tmp_path / "grads.safetensors"
    proc = subprocess.run([tool, str(model_dir), text(ids), str(out), "--random-adapter", "7",
                           "--rank", "4", "--alpha", "8", "--targets", TARGETS[name.removesuffix("_normalized")],
                           "--save-adapter", str(adapter_dir), "--labels", text(labels),
                           "--mask", text(mask)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = load_file(out)
    adapted = peft.PeftModel.from_pretrained(reference(model_dir), adapter_dir, is_trainable=True)
    adapted.eval()
    loss = adapted(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert abs(got["loss"].item() - loss.item()) <= RTOL * abs(loss.item())
    grads = {n.replace(".default", ""): p.grad for n, p in adapted.named_parameters()
             if p.requires_grad}
    assert sorted(grads) == sorted(k[len("grad:"):] for k in got if k.startswith("grad:"))
    for name, want_grad in grads.items():
        assert want_grad.abs().max().item() > 0, name
        assert_close(got["grad:" + name], want_grad, f"gradient of {name}")


def shifting_mixtral(out, tokens):
    """skewed_mixtral's model, but tokens below 256 go to experts 0 and 1 and the others to
    experts 2 and 3; `tokens` gets rows of 32 tokens from one half or the other, so the chosen
    pair changes from step to step and the previous pair is resident but unchosen."""
    hidden, experts = 128, 8
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=hidden, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
        num_local_experts=experts, num_experts_per_tok=2, tie_word_embeddings=True))
    route_tokens_to_pairs(model, hidden, experts,
                          [(slice(None, 256), (0, 1)), (slice(256, None), (2, 3))])
    model.save_pretrained(out)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 256, 32) + 256 * (i % 2) for i in range(128)]
    np.concatenate(rows).astype(np.uint16).tofile(tokens)
    return out


def test_demoting_unchosen_experts_changes_no_number_and_reads_less_when_tight(tmp_path):
    model_dir = shifting_mixtral(tmp_path / "model", tmp_path / "tokens.bin")
    runs = {}
    for name, extra in (("demote", []), ("plain", ["--no-expert-demote"])):
        log = tmp_path / f"{name}.jsonl"
        run_lema("train", "--model", model_dir, "--data", tmp_path / "tokens.bin", "--out",
                 tmp_path / name, "--steps", 16, "--seq-len", 32, "--batch", 1, "--budget",
                 "32MiB", "--policy", "lru", "--log-json", log, "--threads", 1, *extra)
        runs[name] = list(map(json.loads, log.read_text().splitlines()))
    losses = {k: [(r["loss"], r["grad_norm"]) for r in v] for k, v in runs.items()}
    assert losses["demote"] == losses["plain"]
    read = {k: sum(r["step_bytes_read"] for r in v) for k, v in runs.items()}
    # Deterministic (one thread, fixed data order): the hint keeps pages the next layers need
    # and gives up the other pair's experts instead (docs/PERFORMANCE.md).
    assert read["demote"] < read["plain"], read
