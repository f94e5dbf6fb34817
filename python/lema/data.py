"""Chat and instruction data → prepared examples that `lema train --data` reads.

    python -m lema.data --model DIR --data train.jsonl --out prepared.jsonl

Each line of the data file is one of
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}   chat
    {"prompt": "...", "completion": "..."}                                                  instruction
and becomes one line {"input_ids": [...], "labels": [...]} of the output, labels -100 where no
loss is taken: a chat is rendered with the model's own chat template exactly as
transformers' apply_chat_template renders it and learns only its assistant turns; an instruction
learns only its completion (followed by the end-of-sequence token).

Why a preparation step through the reference packages, rather than C++: the chat template is
Jinja run in transformers' environment (its extensions and helpers), and a tokenizer.json's
normalizers, pre-tokenizers and added tokens are defined by the tokenizers package; calling them
gives the ids transformers gives by construction, and the trainer stays a reader of ids.

A bad line (no "messages", a role or message the template refuses, a template error, an empty
completion, no assistant turn) is refused with the data file's line number; nothing is written.

    python -m lema.data render-chat --model DIR --prompt TEXT

prints one JSON line {"input_ids": [...], "text": ..., "eos_token_id": ...}: the prompt as a
user message through apply_chat_template(..., add_generation_prompt=True). `lema generate
--chat` runs it, so its prompt ids are transformers' by construction (the template is Python
Jinja2 with transformers' helpers, which no C++ library reproduces).
"""
import argparse
import json
import os
import sys

IGNORE = -100


class DataError(Exception):
    pass


def _assistant_spans(tokenizer, messages, text, where):
    """Character ranges of the assistant turns in `text`: what rendering turn i adds to the
    rendering of the turns before it with the generation prompt."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                               add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template does not render turn {i} after the "
                            "turns before it, so its assistant tokens cannot be found")
        spans.append((len(before), len(upto)))
    if not spans:
        raise DataError(f"{where}: no assistant turn; a chat example learns its assistant turns")
    return spans


def _chat(tokenizer, obj, where):
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{where}: \"messages\" must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects with string values")
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: the model's tokenizer has no chat_template; chat data needs one")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = _assistant_spans(tokenizer, messages, text, where)
    except DataError:
        raise
    except Exception as e:  # jinja2's TemplateError, raise_exception() in the template
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: the chat template refused the messages: {message}") from None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [tid if any(a <= start < b for a, b in spans) else IGNORE
              for tid, (start, _) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def _instruction(tokenizer, obj, where):
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where}: an instruction needs string \"prompt\" and \"completion\"")
    if not completion.strip():
        raise DataError(f"{where}: the completion is empty; there is nothing to learn")
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the BOS the tokenizer adds, if any
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def prepare_line(tokenizer, line, where):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not a JSON object ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a JSON object")
    if "messages" in obj:
        ids, labels = _chat(tokenizer, obj, where)
    elif "prompt" in obj or "completion" in obj:
        ids, labels = _instruction(tokenizer, obj, where)
    else:
        raise DataError(f"{where}: no \"messages\" (chat) and no \"prompt\"/\"completion\" "
                        "(instruction)")
    if all(label == IGNORE for label in labels[1:]):
        raise DataError(f"{where}: no token to learn after the first (all labels -100)")
    return {"input_ids": ids, "labels": labels}


def prepare(model_dir, data, out):
    """Writes `out` (atomically) from `data`; returns (examples, tokens, learned)."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise DataError(f"{model_dir}: cannot load the model's tokenizer ({e})") from None
    rows = []
    with open(data, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                rows.append(prepare_line(tokenizer, line, f"{data}:{number}"))
    if not rows:
        raise DataError(f"{data}: no examples; the file holds only blank lines")
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    learned = sum(sum(1 for label in r["labels"][1:] if label != IGNORE) for r in rows)
    return len(rows), sum(len(r["input_ids"]) for r in rows), learned


def render_chat(model_dir, prompt, system=None):
    """The ids (and text) of `prompt` as a user turn followed by the generation prompt."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise DataError(f"{model_dir}: cannot load the model's tokenizer ({e})") from None
    if tokenizer.chat_template is None:
        raise DataError(f"{model_dir}: the tokenizer has no chat_template; --chat needs one "
                        "(give the prompt as plain text without --chat)")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
    except Exception as e:  # jinja2's TemplateError, raise_exception() in the template
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{model_dir}: the chat template refused the prompt: {message}") from None
    return {"input_ids": list(ids), "text": text, "eos_token_id": tokenizer.eos_token_id}


def _render_chat_main(argv):
    parser = argparse.ArgumentParser(prog="python -m lema.data render-chat",
                                     description="A prompt through the model's chat template")
    parser.add_argument("--model", required=True, help="model directory (its tokenizer files)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", help="a system message before it")
    args = parser.parse_args(argv)
    try:
        out = render_chat(args.model, args.prompt, args.system)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["render-chat"]:
        return _render_chat_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m lema.data", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory (its tokenizer files)")
    parser.add_argument("--data", required=True, help="chat or instruction JSONL")
    parser.add_argument("--out", required=True, help="prepared JSONL for lema train --data")
    args = parser.parse_args(argv)
    try:
        n, tokens, learned = prepare(args.model, args.data, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{n} examples, {tokens} tokens ({learned} learned) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
