"""Chat and instruction data through `python -m lema.data` and `lema train`, against transformers.

A byte-level BPE tokenizer is trained in the test with the tokenizers package and given a
ChatML template that refuses unknown roles; a small Qwen2 model is saved beside it.
- chat lines render exactly as apply_chat_template renders them, and only the assistant turns
  (and their end tokens) are learned; instruction lines learn only the completion and EOS;
- the first step's loss of `lema train` on the prepared examples (right-padded, one batch) equals
  transformers' loss on the same padded batch with the same labels, and --eval-data's loss
  after the last step equals transformers + peft's with the trained adapter;
- bad lines are refused with the data file's line number, nothing written; a prepared example
  longer than --seq-len is refused naming its line.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_lema

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATS = [
    [{"role": "user", "content": "What colour is the sky?"},
     {"role": "assistant", "content": "Blue, mostly."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "1 2 3"},
     {"role": "user", "content": "And back?"},
     {"role": "assistant", "content": "3 2 1 ✓"}],
]
INSTRUCTIONS = [{"prompt": "Translate 'chat': ", "completion": "cat"},
                {"prompt": "2 + 2 = ", "completion": "4"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "model"
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for chat in CHATS for m in chat] + ["user assistant system"] * 5
    bpe.train_from_iterator(corpus, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def prepare(model_dir, data, out, check=True):
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
    proc = subprocess.run([sys.executable, "-m", "lema.data", "--model", model_dir, "--data",
                           data, "--out", out], capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def write_lines(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


def test_chat_and_instruction_examples_and_the_masked_loss(model, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(model)
    data = write_lines(tmp_path / "data.jsonl",
                       [{"messages": c} for c in CHATS] + INSTRUCTIONS)
    prepared = tmp_path / "prepared.jsonl"
    prepare(model, data, prepared)
    rows = [json.loads(line) for line in prepared.read_text().splitlines()]
    assert len(rows) == 4

    for chat, row in zip(CHATS, rows):
        assert tok.decode(row["input_ids"]) == tok.apply_chat_template(chat, tokenize=False)
        learned = tok.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l != -100])
        want = "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
        assert learned == want
    for inst, row in zip(INSTRUCTIONS, rows[2:]):
        assert tok.decode(row["input_ids"]) == inst["prompt"] + inst["completion"] + "<|im_end|>"
        learned = [i for i, l in zip(row["input_ids"], row["labels"]) if l != -100]
        assert tok.decode(learned) == inst["completion"] + "<|im_end|>"

    # One step over one batch holding every example: the step's loss is that of the batch.
    seq = 64
    log = tmp_path / "log.jsonl"
    run_lema("train", "--model", model, "--data", prepared, "--out", tmp_path / "out",
             "--steps", 1, "--seq-len", seq, "--batch", len(rows), "--budget", "unlimited",
             "--log-json", log, "--threads", 1)
    ours = json.loads(log.read_text().splitlines()[0])["loss"]
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    labels = torch.full((len(rows), seq), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[r, :n] = torch.tensor(row["input_ids"])
        labels[r, :n] = torch.tensor(row["labels"])
        mask[r, :n] = 1
    reference = transformers.Qwen2ForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(ours - want) <= 1e-4 * abs(want), (ours, want)

    # Validation on the same examples: after the last step, the eval loss is the trained
    # adapter's loss on them as transformers + peft compute it; logged and kept in
    # trainer_state.json.
    peft = pytest.importorskip("peft")
    log = tmp_path / "eval.jsonl"
    run_lema("train", "--model", model, "--data", prepared, "--out", tmp_path / "eval",
             "--steps", 2, "--seq-len", seq, "--batch", 2, "--lr", "1e-2", "--budget",
             "unlimited", "--log-json", log, "--threads", 1, "--eval-data", prepared,
             "--eval-every", 1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [("eval_loss" in r) for r in records] == [True, True]
    state = json.loads((tmp_path / "eval" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["eval_losses"]] == [1, 2]
    assert state["eval_losses"][1]["eval_loss"] == records[1]["eval_loss"]
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "eval").eval()
    with torch.no_grad():
        want = adapted(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(records[1]["eval_loss"] - want) <= 1e-4 * abs(want), (records[1], want)
    assert records[1]["eval_loss"] != records[0]["eval_loss"]

    # Longer than --seq-len: refused naming the prepared file's line.
    proc = run_lema("train", "--model", model, "--data", prepared, "--out", tmp_path / "short",
                    "--steps", 1, "--seq-len", 8, "--batch", 1, check=False)
    assert proc.returncode == 1 and f"{prepared}:1:" in proc.stderr and "--seq-len" in proc.stderr


@pytest.mark.parametrize("bad,needle", [
    ({"text": "no messages here"}, "\"messages\""),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role tool"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": "hello"}, "non-empty list"),
    ({"prompt": "say something", "completion": "  "}, "completion is empty"),
])
def test_bad_lines_are_named_with_their_line_number(model, tmp_path, bad, needle, capsys):
    # In this process (the command line itself is run above): python -m lema.data's main().
    sys.path.insert(0, str(PYTHON_DIR))
    try:
        from lema.data import main
    finally:
        sys.path.remove(str(PYTHON_DIR))
    data = write_lines(tmp_path / "data.jsonl", [{"messages": CHATS[0]}, bad])
    out = tmp_path / "prepared.jsonl"
    assert main(["--model", str(model), "--data", str(data), "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{data}:2:" in lines[0] and needle in lines[0], lines
    assert not out.exists()


def test_eval_losses_continue_across_a_resume(model, tmp_path):
    data = write_lines(tmp_path / "data.jsonl", [{"messages": c} for c in CHATS] + INSTRUCTIONS)
    prepared = tmp_path / "prepared.jsonl"
    prepare(model, data, prepared)

    def train(out, steps, *extra):
        run_lema("train", "--model", model, "--data", prepared, "--out", out, "--steps", steps,
                 "--seq-len", 64, "--batch", 2, "--lr", "1e-2", "--schedule-steps", 4,
                 "--save-every", 1, "--eval-data", prepared, "--eval-every", 1, "--threads", 1,
                 *extra)
        state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        return state["eval_losses"]

    full = train(tmp_path / "full", 4)
    train(tmp_path / "split", 2)
    resumed = train(tmp_path / "split", 4, "--resume")
    assert [e["step"] for e in full] == [1, 2, 3, 4]
    assert resumed == full


def test_generate_chat_continues_apply_chat_template_like_transformers(model, tmp_path,
                                                                        monkeypatch):
    """`lema generate --chat`: the prompt as a user turn through the chat template with the
    generation prompt (rendered by transformers in the python LEMA_PYTHON names), then greedy
    tokens equal to transformers' generate on apply_chat_template's ids."""
    monkeypatch.setenv("LEMA_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(PYTHON_DIR))
    question = "What colour is the sky?"
    proc = run_lema("generate", "--model", model, "--chat", "--prompt", question, "--greedy",
                    "--max-new-tokens", 8, "--ignore-eos", "--json")
    got = json.loads(proc.stdout)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": question}]
    want_prompt = tok.apply_chat_template(messages, add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
    assert tok.decode(want_prompt).endswith("<|im_start|>assistant\n")
    assert got["prompt_ids"] == list(want_prompt)
    reference = transformers.Qwen2ForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = reference.generate(torch.tensor([want_prompt]), max_new_tokens=8, do_sample=False,
                                 min_new_tokens=8)
    assert got["output_ids"] == out[0, len(want_prompt):].tolist()

    # No chat template, a python that cannot render, --chat with ids: one line each.
    proc = run_lema("generate", "--model", model, "--chat", "--prompt-ids", "1,2", check=False)
    assert proc.returncode == 1 and "--chat" in proc.stderr, proc.stderr
    plain = tmp_path / "plain"
    shutil.copytree(model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    proc = run_lema("generate", "--model", plain, "--chat", "--prompt", question, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--chat" in lines[0] and "no chat_template" in lines[0], lines[0]
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'transformers'\" "
                      ">&2\nexit 1\n")
    broken.chmod(0o755)
    for python, needle in ((broken, "No module named 'transformers'"),
                           (tmp_path / "absent", "cannot be run")):
        monkeypatch.setenv("LEMA_PYTHON", str(python))
        proc = run_lema("generate", "--model", model, "--chat", "--prompt", question,
                        check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert str(python) in lines[0] and needle in lines[0] and "LEMA_PYTHON" in lines[0]


def test_a_template_that_fails_to_render_is_named_with_the_line(model, tmp_path, capsys):
    """A template error that is not a refusal of the messages (here an undefined filter, raised
    by Jinja2 when it compiles or renders) names the first chat line and writes nothing."""
    sys.path.insert(0, str(PYTHON_DIR))
    try:
        from lema.data import main
    finally:
        sys.path.remove(str(PYTHON_DIR))
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    (broken / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}")
    data = write_lines(tmp_path / "data.jsonl", INSTRUCTIONS[:1] + [{"messages": CHATS[0]}])
    out = tmp_path / "prepared.jsonl"
    assert main(["--model", str(broken), "--data", str(data), "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{data}:2:" in lines[0] and "no_such_filter" in lines[0], lines
    assert not out.exists()
