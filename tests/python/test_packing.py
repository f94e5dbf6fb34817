"""`lema train --pack` against transformers on the same packed batch.

Prepared examples of different lengths (written directly: ids and labels, no tokenizer needed)
are packed by lema into --seq-len rows, best-fit in file order (Note [Packing] in
token_batches.cpp, rebuilt here). The reference is transformers' loss on those rows given each
example's position ids (restarting at 0) and the block-diagonal causal 4-D attention mask (a
boolean [rows, 1, seq, seq]: a token sees the earlier tokens of its own example), with each
example's first label -100. One step over one batch holding every row: the step's logged loss is
that batch's mean loss over its learned tokens. Checked for Llama (rotary positions) and GPT-2
(learned positions). Without --pack the same data trains padded, one example a row, and the loss
is transformers' on the padded batch, as before.
"""
import json

import pytest
import torch

from conftest import run_lema

transformers = pytest.importorskip("transformers")

SEQ = 16
LENGTHS = [5, 9, 3, 12, 7, 4, 6, 2, 10]
VOCAB = 256


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rope_theta=500.0,
        initializer_range=0.2))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0, initializer_range=0.2))


FAMILIES = {"llama": llama, "gpt2": gpt2}


def examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = max(1, n // 3)  # the first third is the prompt: not learned
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def best_fit(rows_of, seq):
    """Lema's packing: each example into the open row with the least room that holds it."""
    rows, room = [], []
    for e in rows_of:
        n = len(e["input_ids"])
        fits = [(room[r], r) for r in range(len(rows)) if room[r] >= n]
        if fits:
            r = min(fits)[1]
        else:
            rows.append([])
            room.append(seq)
            r = len(rows) - 1
        rows[r].append(e)
        room[r] -= n
        if room[r] < 2:
            room[r] = -1
    return rows


def packed_batch(rows):
    n = len(rows)
    ids = torch.zeros(n, SEQ, dtype=torch.long)
    labels = torch.full((n, SEQ), -100, dtype=torch.long)
    positions = torch.zeros(n, SEQ, dtype=torch.long)
    segment = torch.zeros(n, SEQ, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            k = len(e["input_ids"])
            ids[r, at:at + k] = torch.tensor(e["input_ids"])
            labels[r, at + 1:at + k] = torch.tensor(e["labels"][1:])
            positions[r, at:at + k] = torch.arange(k)
            segment[r, at:at + k] = s
            at += k
        positions[r, at:] = torch.arange(SEQ - at)  # the padding: a segment of its own
        segment[r, at:] = len(row)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    return ids, labels, positions, mask[:, None]


def padded_batch(rows_of):
    n = len(rows_of)
    ids = torch.zeros(n, SEQ, dtype=torch.long)
    labels = torch.full((n, SEQ), -100, dtype=torch.long)
    mask = torch.zeros(n, SEQ, dtype=torch.long)
    for r, e in enumerate(rows_of):
        k = len(e["input_ids"])
        ids[r, :k] = torch.tensor(e["input_ids"])
        labels[r, :k] = torch.tensor(e["labels"])
        mask[r, :k] = 1
    return ids, labels, mask


def first_step(model_dir, data, out, batch, *extra):
    """The first step's record and the run's log. The learning rate is tiny so that the eval
    loss after the step is the base model's loss to within float noise."""
    log = out.with_suffix(".log.jsonl")
    proc = run_lema("train", "--model", model_dir, "--data", data, "--out", out, "--steps", 1,
                    "--seq-len", SEQ, "--batch", batch, "--budget", "unlimited", "--log-json",
                    log, "--threads", 1, "--lr", "1e-12", "--eval-data", data, *extra)
    return json.loads(log.read_text().splitlines()[0]), proc.stderr


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_loss_is_transformers_loss_with_the_block_mask(family, tmp_path):
    torch.manual_seed(0)
    reference = FAMILIES[family]().eval()
    model_dir = tmp_path / "model"
    reference.save_pretrained(model_dir)
    rows_of = examples()
    data = tmp_path / "prepared.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in rows_of))
    rows = best_fit(rows_of, SEQ)
    assert len(rows) < len(rows_of)

    ours, log = first_step(model_dir, data, tmp_path / "packed", len(rows), "--pack")
    assert f"{len(rows)} packed sequences of {SEQ} tokens" in log, log
    ids, labels, positions, mask = packed_batch(rows)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions,
                         labels=labels).loss.item()
        # Without the block mask the rows would attend across examples: another loss.
        leaky = reference(input_ids=ids, labels=labels).loss.item()
    # The step's loss, and --eval-data packed the same way (one row at a time, weighted by its
    # learned tokens), are transformers' on the packed batch.
    for got in (ours["loss"], ours["eval_loss"]):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    assert abs(leaky - want) > 1e-3 * abs(want), (leaky, want)

    # Padding (no --pack) is unchanged: one example a row, transformers' padded-batch loss.
    ours, log = first_step(model_dir, data, tmp_path / "padded", len(rows_of))
    assert f"{len(rows_of)} sequences of {SEQ} tokens" in log, log
    ids, labels, mask = padded_batch(rows_of)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    for got in (ours["loss"], ours["eval_loss"]):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_pack_is_refused_for_token_streams(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    llama().save_pretrained(model_dir)
    tokens = tmp_path / "tokens.bin"
    tokens.write_bytes(b"".join(i.to_bytes(2, "little") for i in range(64)) * 4)
    proc = run_lema("train", "--model", model_dir, "--data", tokens, "--data-format", "bin",
                    "--out", tmp_path / "out", "--steps", 1, "--seq-len", SEQ, "--pack",
                    check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--pack" in lines[0] and str(tokens) in lines[0], lines[0]
