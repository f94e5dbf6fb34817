"""`lema generate`: where a reply stops and the text it prints, against transformers.

The models here are "successor tables": one Llama layer whose attention and MLP write nothing,
one-hot embeddings and an lm_head that maps each id to the id chosen to follow it, so a greedy
continuation is any sequence of ids the test writes down, and transformers' generate() gives the
same ids. Tokenizers are trained in the test with the tokenizers package (byte-level BPE as
Llama 3, SentencePiece-style BPE with Metaspace and byte fallback as Llama 2 and Mistral).
- stop ids are generation_config.json's eos_token_id (an id or a list, either entry), else
  config.json's, as transformers' generate() stops; --chat stops at <|eot_id|>; --stop-id
  overrides; a malformed generation_config.json is one line naming the file and the field;
- the plain-text output is tokenizer.decode(prompt + reply) of the tokenizers package: a reply
  starting with a word boundary keeps its space, a character whose bytes span the prompt and the
  reply prints whole;
- text documents are joined as run_clm joins them: each with what the tokenizer adds (Llama 3:
  BOS only), no EOS added between them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lema_bin, run_lema

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("LEMA_BIN"), reason="LEMA_BIN not set")

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
TRAIN = ["Hello world, the quick brown fox jumps over the lazy dog. The sky is blue!",
         "What colour is the sky? It is blue, and the grass is green."] * 20
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                   "<|end_header_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def llama3_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(
        vocab_size=320, special_tokens=LLAMA3_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(  # BOS only, as Llama 3's
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE)


def metaspace_tokenizer():
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"] + bytes_, show_progress=False))
    spec = json.loads(tok.to_str())  # byte tokens in the vocab, not added tokens (Llama's layout)
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in bytes_]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def save_successor_model(out, hf, successors, *, eos_token_id=None):
    """A Llama whose greedy next id after id i is successors.get(i, filler)."""
    vocab = len(hf)
    hidden = -(-vocab // 8) * 8
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=hf.bos_token_id, eos_token_id=eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    filler = hf.convert_tokens_to_ids(hf.tokenize("lazy"))[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1)
        model.model.embed_tokens.weight[torch.arange(vocab), torch.arange(vocab)] = 1
        for i in range(vocab):
            model.lm_head.weight[successors.get(i, filler), i] = 1
    hf.save_pretrained(out)
    model.save_pretrained(out)
    (Path(out) / "generation_config.json").unlink(missing_ok=True)
    return model.eval()


def chain(start, ids):
    """successors such that `start` is followed by `ids`, one after another."""
    table = {}
    for a, b in zip([start] + ids, ids):
        assert table.setdefault(a, b) == b, "the chain visits an id twice"
    return table


def generate_json(model_dir, *args):
    return json.loads(run_lema("generate", "--model", model_dir, "--greedy", "--json",
                               *args).stdout)


def reference_reply(model, prompt_ids, max_new_tokens, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


# ---- stop ids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["<|end_of_text|>", "<|eot_id|>"])
def test_stops_at_any_eos_id_of_generation_config(tmp_path, stop):
    hf = llama3_tokenizer()
    end, eot = hf.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    prompt = hf("The sky")["input_ids"]
    reply = hf(" is blue", add_special_tokens=False)["input_ids"] + [hf.convert_tokens_to_ids(stop)]
    table = chain(prompt[-1], reply)
    table[reply[-1]] = hf.convert_tokens_to_ids(hf.tokenize("green"))[0]  # then it would run on
    model = save_successor_model(tmp_path, hf, table, eos_token_id=end)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf.bos_token_id, "eos_token_id": [end, eot]}))
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reference.generation_config.eos_token_id == [end, eot]
    want = reference_reply(reference, prompt, 20, reference.generation_config.eos_token_id)
    assert want == reply
    got = generate_json(tmp_path, "--prompt", "The sky", "--max-new-tokens", 20)
    assert got["prompt_ids"] == prompt
    assert got["output_ids"] == want
    # --ignore-eos runs on; --stop-id replaces the model's ids.
    got = generate_json(tmp_path, "--prompt", "The sky", "--max-new-tokens", 20, "--ignore-eos")
    assert len(got["output_ids"]) == 20
    got = generate_json(tmp_path, "--prompt", "The sky", "--max-new-tokens", 20,
                        "--stop-id", f"{reply[0]},{hf.vocab_size - 1}")
    assert got["output_ids"] == reply[:1]


def test_without_generation_config_stops_at_config_eos(tmp_path):
    hf = llama3_tokenizer()
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    prompt = hf("The sky")["input_ids"]
    reply = hf(" is blue", add_special_tokens=False)["input_ids"] + [eot]
    table = chain(prompt[-1], reply)
    table[eot] = reply[0]
    model = save_successor_model(tmp_path, hf, table, eos_token_id=eot)
    assert not (tmp_path / "generation_config.json").exists()
    got = generate_json(tmp_path, "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", 20)
    assert got["output_ids"] == reference_reply(model, prompt, 20, eot) == reply


def test_chat_stops_at_eot_id(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMA_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(PYTHON_DIR))
    hf = llama3_tokenizer()
    end, eot = hf.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    question = "What colour is the sky?"
    prompt = hf.apply_chat_template([{"role": "user", "content": question}],
                                    add_generation_prompt=True, return_dict=True)["input_ids"]
    reply = hf("It is blue", add_special_tokens=False)["input_ids"] + [eot]
    table = chain(prompt[-1], reply)
    table[eot] = reply[0]
    save_successor_model(tmp_path, hf, table, eos_token_id=end)  # Llama 3 Instruct's layout
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eot]}))
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    want = reference_reply(reference, prompt, 20, reference.generation_config.eos_token_id)
    assert want == reply
    got = generate_json(tmp_path, "--chat", "--prompt", question, "--max-new-tokens", 20)
    assert got["prompt_ids"] == prompt and got["output_ids"] == want
    text = run_lema("generate", "--model", tmp_path, "--chat", "--prompt", question, "--greedy",
                    "--max-new-tokens", 20).stdout
    assert text == hf.decode(prompt) + "It is blue\n"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"eos_token_id": "</s>"}', 'eos_token_id is "</s>"'),
    ('{"eos_token_id": [2, 1.5]}', "eos_token_id is [2,1.5]"),
    ('{"eos_token_id": [2, 100000]}', "eos_token_id 100000 is outside"),
    ('{"eos_token_id": -1}', "eos_token_id -1 is outside"),
    ('{"eos_token_id": 18446744073709551615}', "eos_token_id 18446744073709551615 is outside"),
    ('{"eos_token_id": true}', "eos_token_id is true"),
])
def test_malformed_generation_config_is_one_line(tmp_path, content, needle):
    hf = llama3_tokenizer()
    save_successor_model(tmp_path, hf, {})
    (tmp_path / "generation_config.json").write_text(content)
    proc = run_lema("generate", "--model", tmp_path, "--prompt", "The sky", "--greedy",
                    check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "generation_config.json" in lines[0] and needle in lines[0], lines[0]
    assert "eos_token_id" in lines[0]
    # --stop-id does not read the file; with --ignore-eos it is refused.
    run_lema("generate", "--model", tmp_path, "--prompt", "The sky", "--stop-id", "2")
    proc = run_lema("generate", "--model", tmp_path, "--prompt", "The sky", "--stop-id", "2",
                    "--ignore-eos", check=False)
    assert proc.returncode != 0 and "--ignore-eos" in proc.stderr


def test_stop_id_outside_the_vocabulary_is_refused(tmp_path):
    hf = llama3_tokenizer()
    save_successor_model(tmp_path, hf, {})
    proc = run_lema("generate", "--model", tmp_path, "--prompt", "The sky", "--stop-id",
                    len(hf), check=False)
    assert proc.returncode == 1 and "--stop-id" in proc.stderr, proc.stderr


# ---- the printed text -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [metaspace_tokenizer, llama3_tokenizer],
                         ids=["metaspace", "byte-level"])
def test_plain_text_is_the_decoding_of_all_ids(tmp_path, make):
    hf = make()
    whole = hf("Hello world 東京!")["input_ids"]
    # Cut after "Hello" (the reply starts with a word boundary) and inside 東 (its bytes are in
    # separate tokens: neither tokenizer learned the character).
    first_byte = hf.convert_tokens_to_ids(["<0xE6>" if make is metaspace_tokenizer else "æ"])[0]
    assert first_byte in whole and hf.decode(whole, skip_special_tokens=True) == \
        "Hello world 東京!"
    hello = len(hf("Hello")["input_ids"])
    assert whole[:hello] == hf("Hello")["input_ids"]
    for cut, prompt_args in ((hello, ["--prompt", "Hello"]),
                             (whole.index(first_byte) + 1, None)):
        prompt, reply = whole[:cut], whole[cut:]
        model_dir = tmp_path / f"cut{cut}"
        save_successor_model(model_dir, hf, chain(prompt[-1], reply))
        args = prompt_args or ["--prompt-ids", ",".join(map(str, prompt))]
        got = generate_json(model_dir, *args, "--max-new-tokens", len(reply), "--ignore-eos")
        assert got["prompt_ids"] == prompt and got["output_ids"] == reply
        proc = subprocess.run([lema_bin(), "generate", "--model", model_dir, *map(str, args),
                               "--greedy", "--max-new-tokens", str(len(reply)), "--ignore-eos"],
                              capture_output=True)  # bytes: a cut character must not pass
        assert proc.returncode == 0, proc.stderr
        want = hf.decode(whole, skip_special_tokens=True) + "\n"
        assert proc.stdout == want.encode(), (cut, proc.stdout)


# ---- text documents in lema train -------------------------------------------------------------

def test_documents_are_joined_as_run_clm_joins_them(tmp_path):
    """run_clm tokenizes each document with tokenizer(text) and concatenates the ids: with a
    BOS-only tokenizer (Llama 3) no EOS comes between documents, and lema adds none either."""
    hf = llama3_tokenizer()
    model = save_successor_model(tmp_path / "model", hf, {})
    docs = ["The sky is blue.", "What colour is the grass? Green."]
    want = sum((hf(d)["input_ids"] for d in docs), [])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    log = tmp_path / "log.jsonl"
    run_lema("train", "--model", tmp_path / "model", "--data", data, "--out", tmp_path / "out",
             "--steps", 1, "--seq-len", len(want), "--batch", 1, "--log-json", log,
             "--threads", 1)
    ours = json.loads(log.read_text().splitlines()[0])["loss"]
    ids = torch.tensor([want])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert abs(ours - expected) <= 1e-4 * abs(expected), (ours, expected)
    proc = run_lema("train", "--model", tmp_path / "model", "--data", data, "--out",
                    tmp_path / "out2", "--steps", 1, "--seq-len", len(want) + 1, check=False)
    assert proc.returncode == 1, proc.stderr
