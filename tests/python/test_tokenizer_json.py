"""The trainer's tokenizer.json reader gives the tokenizers package's ids.

Tokenizers are trained here with the `tokenizers` package in the layouts of GPT-2, Llama 3
(byte-level BPE with a Unicode-class Split regex) and Llama 2 / Mistral (SentencePiece-style BPE
with byte fallback), saved as tokenizer.json, and read back by `trainer_tokenize_dump`, which
prints the C++ reader's ids, decoded text and BOS/EOS as JSON.
"""
import json
import os
import re
import subprocess

import pytest
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

DUMP = os.environ.get("LEMA_TOKENIZE_DUMP")
pytestmark = pytest.mark.skipif(not DUMP, reason="LEMA_TOKENIZE_DUMP not set")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

TRAIN = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 12345 foxes!",
    "def add(a, b):\n    return a + b  # sum\n\tif x == 10: print(\"ok\")",
    "東京は日本の首都です。北京是中国的首都。",
    "Ünïcödé café naïve résumé — “quotes” and ‘more’…",
    "   spaces    and\ttabs\n\nnewlines   ",
] * 20

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]

TEXTS = [
    "",
    "Hello world",
    " leading space and trailing  ",
    "The quick brown fox jumps over the lazy dog.",
    "東京は日本の首都です。 한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "combining e\u0301 a\u0308 o\u0302 and precomposed é ä ô",
    "whitespace   runs\t\ttabs\n\nnewlines\r\n  \n end",
    "digits 1234567890 3.14159 1,000,000",
    "code: for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }\n",
    "it's they're we've I'm you'll he'd IT'S",
    "unseen: ƛ ʃ Ω ∑ ∫ ≈ ∞ ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "   ",
    "\n",
    "a",
] + [f"before{s}after {s} spaced {s}" for s in SPECIALS] + ["".join(SPECIALS), "x<|eot_id|>\ny",
                                                    "<s>first</s> second<s>  third <unk>"]



def random_texts(count, seed=0):
    """Mixtures of the pieces where tokenizers differ most: spaces, marks, scripts, specials."""
    import random
    rng = random.Random(seed)
    pieces = [" ", "  ", "\t", "\n", "\r\n", "a", "The", "fox", "'s", "'LL", "12", "3456", "_",
              "é", "e\u0301", "\u0308", "東京", "한", "😀", "👍🏽", "\u200d", "\u00a0", "\u3000",
              "\u0085", "\u2028", "\u000b", "\u180e",
              "ƛ", "Ω", "ΑΣ", "İ", "ﬁ", "①", "½", "x²", ".", "!?", "—", "(", "{}", "<s>", "</s>", "<unk>",
              "▁", "Ġ", "<0x41>", "[UNK]", "##"] + SPECIALS
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(count)]


TEXTS += random_texts(400)


def dump(tmp_path, tokenizer_json, id_lists=()):
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS), encoding="utf-8")
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(id_lists)))
    run = subprocess.run([DUMP, str(tokenizer_json), str(texts), str(ids)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def check_parity(tmp_path, tok, path=None):
    if path is None:
        path = tmp_path / "tokenizer.json"
        tok.save(str(path))
        tok = Tokenizer.from_file(str(path))  # what the file says, not the live object
    # Random ids decode as tokenizers decodes them, bytes that form no character included; each
    # list ends in "a" so that no character is cut by the end (lema keeps such bytes).
    import random
    rng = random.Random(1)
    size = tok.get_vocab_size(with_added_tokens=True)
    id_lists = [[rng.randrange(size) for _ in range(rng.randint(0, 8))] + [tok.token_to_id("a")]
                for _ in range(300)]
    got = dump(tmp_path, path, id_lists)
    for text, ids, decoded in zip(TEXTS, got["ids"], got["decoded"]):
        want = tok.encode(text, add_special_tokens=False).ids
        assert ids == want, f"ids differ for {text!r}"
        assert decoded == tok.decode(want), f"decode differs for {text!r}"
    for ids, decoded in zip(id_lists, got["decoded_ids"]):
        assert decoded == tok.decode(ids), f"decode differs for {ids}"
    with_specials = tok.encode("Hello", add_special_tokens=True).ids
    plain = tok.encode("Hello", add_special_tokens=False).ids
    start = with_specials.index(plain[0])
    assert got["bos"] == (with_specials[0] if start == 1 else None)
    assert got["eos"] == (with_specials[-1] if len(with_specials) > start + len(plain) else None)
    assert got["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    return got


def byte_level_bpe(split_regex, add_prefix_space=False, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(split_regex),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN, trainer)
    return tok


def test_llama3_style_byte_level_bpe(tmp_path):
    tok = byte_level_bpe(LLAMA3_PATTERN, ignore_merges=True)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", 0)]),
    ])
    got = check_parity(tmp_path, tok)
    assert got["bos"] == 0 and got["eos"] is None
    assert "byte-level" in got["describe"]
    for text, decoded in zip(TEXTS, got["decoded"]):
        if not any(s in text for s in SPECIALS):
            assert decoded == text  # byte-level BPE round-trips any text


def test_gpt2_style_byte_level_with_added_tokens(tmp_path):
    tok = byte_level_bpe(None, add_prefix_space=True)
    tok.add_tokens([AddedToken("brown fox", single_word=True),
                    AddedToken("lazy", lstrip=True, rstrip=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|end_of_text|>", special_tokens=[("<|end_of_text|>", 1)])
    got = check_parity(tmp_path, tok)
    assert got["bos"] is None and got["eos"] == 1


def test_qwen_style_split_with_nfc(tmp_path):
    tok = byte_level_bpe(LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"))
    tok.normalizer = normalizers.NFC()
    check_parity(tmp_path, tok)


def metaspace_bpe(tok_setup):
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok_setup(tok)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                  show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    # Llama's layout: the byte tokens live in the model's vocab, not among the added tokens.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in bytes_]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    return Tokenizer.from_str(json.dumps(spec))


def test_llama2_style_prepend_replace_byte_fallback(tmp_path):
    def setup(tok):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = metaspace_bpe(setup)
    got = check_parity(tmp_path, tok)
    assert got["bos"] == 1
    assert "byte fallback" in got["describe"]
    emoji = TEXTS.index("emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵")
    assert any(3 <= i < 259 for i in got["ids"][emoji])  # unseen characters became byte tokens


def test_mistral_style_metaspace_pre_tokenizer(tmp_path):
    def setup(tok):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(
            replacement="▁", prepend_scheme="first")])
    check_parity(tmp_path, metaspace_bpe(setup))


def test_digits_punctuation_and_lowercase(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["[UNK]"], show_progress=False,
                                  continuing_subword_prefix="##")
    tok.train_from_iterator(TRAIN, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    tok = Tokenizer.from_file(str(path))
    got = dump(tmp_path, path)
    for text, ids in zip(TEXTS, got["ids"]):
        assert ids == tok.encode(text, add_special_tokens=False).ids, f"ids differ for {text!r}"


@pytest.mark.parametrize("behavior", ["removed", "isolated", "merged_with_previous",
                                      "merged_with_next", "contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviours_and_normalizers(behavior, invert, tmp_path):
    from tokenizers import Regex
    tok = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFD(), normalizers.Replace(Regex(r"\d{2}"), "<dd>"), normalizers.NFKD()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|[.,;:!?]|^.|.$|\h\h"), behavior=behavior, invert=invert),
        pre_tokenizers.Whitespace()])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False,
                                  end_of_word_suffix="</w>")
    tok.train_from_iterator(TRAIN, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    tok = Tokenizer.from_file(str(path))
    got = dump(tmp_path, path)
    for text, ids, decoded in zip(TEXTS, got["ids"], got["decoded"]):
        assert ids == tok.encode(text, add_special_tokens=False).ids, f"ids differ for {text!r}"
        assert decoded == tok.decode(ids), f"decode differs for {text!r}"


def test_transformers_gpt2_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = byte_level_bpe(None)
    spec = json.loads(source.to_str())
    (tmp_path / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m
                                  for m in spec["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    hf = transformers.GPT2TokenizerFast(vocab_file=str(tmp_path / "vocab.json"),
                                        merges_file=str(tmp_path / "merges.txt"),
                                        unk_token="<|end_of_text|>", bos_token="<|end_of_text|>",
                                        eos_token="<|end_of_text|>")
    out = tmp_path / "saved"
    hf.save_pretrained(str(out))
    got = dump(tmp_path, out / "tokenizer.json")
    for text, ids in zip(TEXTS, got["ids"]):
        assert ids == hf.encode(text, add_special_tokens=False), f"ids differ for {text!r}"


@pytest.mark.parametrize("family", ["Qwen2Tokenizer", "LlamaTokenizer"])
def test_transformers_built_tokenizer_json(family, tmp_path):
    """The tokenizer.json transformers writes for Qwen2 (NFC, Qwen's Split regex, byte-level) and
    Llama (Metaspace "first" without split, byte fallback), from a vocab and merges trained here."""
    transformers = pytest.importorskip("transformers")
    if family == "Qwen2Tokenizer":
        source = byte_level_bpe(None)
    else:
        source = metaspace_bpe(lambda tok: setattr(tok, "pre_tokenizer", pre_tokenizers.Metaspace()))
    spec = json.loads(source.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]]
    hf = getattr(transformers, family)(vocab=spec["model"]["vocab"], merges=merges)
    hf.save_pretrained(str(tmp_path / "saved"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    got = dump(tmp_path, tmp_path / "saved" / "tokenizer.json")
    for text, ids, decoded in zip(TEXTS, got["ids"], got["decoded"]):
        assert ids == hf.encode(text, add_special_tokens=False), f"ids differ for {text!r}"
        assert decoded == hf.decode(ids, skip_special_tokens=True), f"decode differs for {text!r}"
    plain, full = hf.encode("Hello", add_special_tokens=False), hf.encode("Hello")
    assert got["bos"] == (full[0] if full[1:1 + len(plain)] == plain else None)


# ---- lema train and lema generate on models whose tokenizer is a tokenizer.json -------------

DOCUMENT = ("The quick brown fox, 東京 and 😀, jumps over 12345 lazy dogs.\n"
            "\tdef f(x): return x * 2  # code")


def save_model(tok, out, family, **special):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    hf.save_pretrained(out)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=len(hf),
                          max_position_embeddings=256)
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(out)
    return hf, model.eval()


def llama3_model(out):
    tok = byte_level_bpe(LLAMA3_PATTERN)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return save_model(tok, out, "llama", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def mistral_model(out):
    def setup(tok):  # as Mistral v0.3's tokenizer.json
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return save_model(metaspace_bpe(setup), out, "mistral", bos_token="<s>", eos_token="</s>",
                      unk_token="<unk>")


@pytest.mark.parametrize("make", [llama3_model, mistral_model], ids=["llama3", "mistral"])
def test_train_and_generate_read_the_tokenizer_json(make, tmp_path):
    if not os.environ.get("LEMA_BIN"):
        pytest.skip("LEMA_BIN not set (a build without the trainer)")
    import torch
    from conftest import run_lema
    model_dir = tmp_path / "model"
    hf, reference = make(model_dir)
    want = hf(DOCUMENT)["input_ids"]  # with the BOS of the template
    assert want[0] == hf.bos_token_id

    # One sequence holding exactly the document: the first loss is transformers' on the same ids.
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": DOCUMENT}) + "\n", encoding="utf-8")
    log = tmp_path / "log.jsonl"
    run_lema("train", "--model", model_dir, "--data", data, "--out", tmp_path / "out",
             "--steps", 1, "--seq-len", len(want), "--batch", 1, "--budget", "unlimited",
             "--log-json", log, "--threads", 1)
    ours = json.loads(log.read_text().splitlines()[0])["loss"]
    ids = torch.tensor([want])
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=ids).loss.item()
    assert abs(ours - expected) <= 1e-4 * abs(expected), (ours, expected)
    # One id more than the document gives is more than the data holds.
    proc = run_lema("train", "--model", model_dir, "--data", data, "--out", tmp_path / "out2",
                    "--steps", 1, "--seq-len", len(want) + 1, check=False)
    assert proc.returncode == 1

    prompt = "東京 and the lazy 😀 fox"
    out = json.loads(run_lema("generate", "--model", model_dir, "--prompt", prompt,
                              "--max-new-tokens", 6, "--greedy", "--json").stdout)
    assert out["prompt_ids"] == hf(prompt)["input_ids"]
    assert hf.decode(out["prompt_ids"], skip_special_tokens=True) == prompt
    # Bytes that form no character: tokenizers writes U+FFFD per byte token, lema keeps the
    # bytes (a later token may complete them) and the JSON output replaces them; so compare the
    # text with each run of replacement characters as one.
    def runs(t):
        return re.sub("\ufffd+", "\ufffd", t)
    assert runs(out["text"]) == runs(hf.decode(out["output_ids"], skip_special_tokens=True))
