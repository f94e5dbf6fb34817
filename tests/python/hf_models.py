"""Tiny random models of each architecture lema.from_pretrained is tested on, made by
transformers' own classes and saved with save_pretrained, and what the tests of the installed
package share."""
import json
import os

import numpy as np
import torch

# The package under test is the installed one (make test installs the wheel into this venv),
# never python/ of the source tree.
SOURCE_PACKAGE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "python"))


def import_installed_lema():
    try:
        import lema
    except ImportError as e:
        raise ImportError(f"lema is not installed in this Python ({e}); `make test` installs "
                          "it (or pip install . from the source tree)") from None
    if os.path.abspath(lema.__file__).startswith(SOURCE_PACKAGE + os.sep):
        raise ImportError(f"lema was imported from the source tree ({lema.__file__}), not from "
                          "the installed package")
    return lema


# About 22 MB each: the host's pages are 2 MiB, so a quarter budget (a few pages) must still
# hold the largest op's weights (an embedding of 2 MiB, a projection of 768 KiB that may span
# two pages), while 6 layers of 3 MiB page through it.
VOCAB = 2048
COMMON = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)


def _configs():
    from transformers import (Gemma2Config, GPT2Config, LlamaConfig, MistralConfig,
                              MixtralConfig, Phi3Config, Qwen2Config, Qwen3Config)
    return {
        "llama": lambda: LlamaConfig(**COMMON),
        "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**{**COMMON, "tie_word_embeddings": True}),
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=64),
        "gemma2": lambda: Gemma2Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=64,
                                       query_pre_attn_scalar=64, sliding_window=16),
        "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=6, n_head=4,
                                   n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0),
        "mixtral": lambda: MixtralConfig(**{**COMMON, "intermediate_size": 384},
                                         num_local_experts=4, num_experts_per_tok=2),
    }


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "mixtral"]


def make_model(arch, out, seed=0):
    """Saves a random `arch` model with save_pretrained into `out`; returns `out`."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch]())
    model.save_pretrained(out)
    return out


def weight_bytes(path):
    from safetensors import safe_open
    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    total += f.get_tensor(key).nbytes
    return total


def quarter_budget(path):
    return weight_bytes(path) // 4


def make_tokenizer(out, vocab_size=VOCAB):
    """A word-level tokenizer over made-up words (no download), saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out)
    return tok


def sentences(n, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (length,), generator=g))
            for _ in range(n)]


def route_tokens_to_pairs(model, hidden, experts, pairs):
    """Fills a MoE model (Mixtral, Qwen2-MoE) with seeded random weights, N(0, 1/hidden), norms
    left at one, and makes its routers deterministic: `pairs` lists (slice of token ids, expert
    pair); the k-th slice's tokens get embedding dimension k set to 30, and every router weighs
    dimension k for its pair only (4 and 3), so they choose that pair in every layer."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn_like(p) / hidden ** 0.5)
        for dim, (tokens, (first, second)) in enumerate(pairs):
            model.model.embed_tokens.weight[tokens, dim] = 30.0
            row = torch.zeros(experts)
            row[first], row[second] = 4.0, 3.0
            for layer in model.model.layers:
                layer.mlp.gate.weight[:, dim] = row


def step_one_bytes_read(model_dir, tmp_path, *extra):
    """`lema train` of one step on random tokens with no budget: the bytes it read and the size
    of the weights file, for tests of what a routed step leaves unread."""
    from conftest import run_lema
    data = tmp_path / "tokens.bin"
    np.random.default_rng(1).integers(0, 512, 4096, dtype=np.uint16).tofile(data)
    log = tmp_path / "log.jsonl"
    run_lema("train", "--model", model_dir, "--data", data, "--out", tmp_path / "out", "--steps",
             1, "--seq-len", 32, "--batch", 2, "--budget", "unlimited", "--log-json", log,
             "--threads", 1, *extra)
    step = json.loads(log.read_text().splitlines()[0])
    return step["step_bytes_read"], (model_dir / "model.safetensors").stat().st_size
