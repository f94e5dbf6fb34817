"""`lema train`, `lema merge` and `lema generate` end to end, against the reference packages:

- the losses of a run under a budget smaller than the model equal, bit for bit, those of the same
  run with every weight resident, and the adapters are byte-identical;
- a run of 6 steps equals 3 steps + --resume to 6, bit for bit;
- the adapter loads with peft.PeftModel.from_pretrained, and `lema merge`'s output loads with
  transformers and gives the logits of base + adapter (peft's merge_and_unload);
- `lema generate --json` prints the ids and text, deterministically for a seed;
- bad input is one line naming what is wrong, exit status 1, before any training;
- one run at a time owns --out (a second is refused naming the holder's pid), taking it removes
  what killed saves left and nothing else, and runs killed with SIGKILL at random moments leave
  only complete checkpoints that --resume continues from.
"""
import json
import os
import random
import shutil
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import process_read_bytes
from conftest import run_lema as lema

LEMA = os.environ.get("LEMA_BIN", "lema")
# 'small' is 19 MiB of f32 weights in 2 MiB pages; 6 MiB (three pages) is under a third of it,
# and holds the largest op's inputs (the 4 MiB embedding and output matrices).
BUDGET = "6MiB"
CORPUS = "\n".join(
    f"the {a} {b} sat on the {c} mat, and the {b} {a} ran to the {c} door."
    for a in ["red", "small", "old", "quick"] for b in ["cat", "dog", "fox"]
    for c in ["green", "blue"]) + "\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model"
    lema("gen", "--out", out, "--preset", "small", "--seed", "3")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def train(model, corpus, out, *extra, steps=4, budget=BUDGET):
    log = Path(out).with_suffix(".jsonl")
    lema("train", "--model", model, "--data", corpus, "--out", out, "--steps", steps,
         "--seq-len", 32, "--batch", 2, "--lr", "3e-3", "--seed", 5, "--budget", budget,
         "--log-json", log, "--threads", 1, *extra)
    return [json.loads(line) for line in log.read_text().splitlines()]


def adapter_bytes(out):
    return (Path(out) / "adapter_model.safetensors").read_bytes()


def test_budget_does_not_change_a_single_bit(model, corpus, tmp_path):
    resident = train(model, corpus, tmp_path / "unlimited", budget="unlimited")
    paged = train(model, corpus, tmp_path / "paged")
    assert [r["loss"] for r in paged] == [r["loss"] for r in resident]
    assert adapter_bytes(tmp_path / "paged") == adapter_bytes(tmp_path / "unlimited")
    budget = 6 << 20
    assert all(0 < r["peak_resident_bytes"] <= budget for r in paged)
    assert paged[-1]["faults"] > 0 and paged[-1]["bytes_read"] > 0
    for key in ["step", "loss", "tokens", "step_time_s", "faults", "bytes_read",
                "peak_resident_bytes"]:
        assert key in paged[0]
    assert [r["step"] for r in paged] == [1, 2, 3, 4]
    assert all(r["tokens"] == 64 for r in paged)


def test_one_budget_over_weights_and_activations_does_not_change_a_single_bit(model, corpus,
                                                                               tmp_path):
    # --budget-covers all: the activations, LoRA weights and optimizer state of a 64-token x 4
    # batch (hundreds of MiB allocated per step) share the 8 MiB budget with the weights.
    shape = ["--seq-len", 64, "--batch", 4, "--steps", 2]
    def run(out, budget, *extra):
        log = Path(out).with_suffix(".jsonl")
        lema("train", "--model", model, "--data", corpus, "--out", out, "--lr", "3e-3",
             "--seed", 5, "--budget", budget, "--log-json", log, "--threads", 2, *shape, *extra)
        return [json.loads(line) for line in log.read_text().splitlines()]
    plain = run(tmp_path / "plain", "unlimited")
    shared = run(tmp_path / "shared", "8MiB", "--mode", "fault", "--budget-covers", "all")
    assert [r["loss"] for r in shared] == [r["loss"] for r in plain]
    assert adapter_bytes(tmp_path / "shared") == adapter_bytes(tmp_path / "plain")
    assert all(0 < r["peak_resident_bytes"] <= 8 << 20 for r in shared)
    # The weights are read-only: what was spilled is the run's other tensors, beyond the budget.
    assert shared[-1]["spilled_bytes"] > 8 << 20


def test_budget_covers_all_needs_fault_mode(model, corpus, tmp_path):
    expect_error(base_args(model, corpus, tmp_path / "out") + ["--budget-covers", "all"],
                 "--budget-covers all", "--mode fault")
    assert not (tmp_path / "out").exists()


def free_huge_pages():
    try:
        size_kb = next(int(line.split()[1]) for line in open("/proc/meminfo")
                       if line.startswith("Hugepagesize:"))
        base = Path(f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB")
        return int((base / "free_hugepages").read_text()) - int((base / "resv_hugepages").read_text())
    except (StopIteration, OSError, ValueError):
        return 0


def test_huge_page_pool_does_not_change_a_single_bit(model, corpus, tmp_path):
    if free_huge_pages() < 3:
        pytest.skip("fewer than 3 free huge pages (vm.nr_hugepages)")
    paged = train(model, corpus, tmp_path / "paged")
    huge = train(model, corpus, tmp_path / "huge", "--huge-pages")
    assert [r["loss"] for r in huge] == [r["loss"] for r in paged]
    assert adapter_bytes(tmp_path / "huge") == adapter_bytes(tmp_path / "paged")
    assert all(0 < r["peak_resident_bytes"] <= 6 << 20 for r in huge)


def test_huge_pages_beyond_the_system_name_the_setting(model, corpus, tmp_path):
    # Every page resident, in pages of 64 MiB: a pool of several hundred MiB of huge pages.
    if free_huge_pages() >= 256:
        pytest.skip("this machine has enough free huge pages for the whole pool")
    proc = lema(*base_args(model, corpus, tmp_path / "out")[:-2], "--budget", "unlimited",
                "--page-size", "64MiB", "--huge-pages", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "huge pages" in proc.stderr and "nr_hugepages" in proc.stderr, proc.stderr
    proc = lema(*base_args(model, corpus, tmp_path / "out"), "--huge-pages", "--mode", "fault",
                check=False)
    assert proc.returncode == 1 and "guard mode" in proc.stderr, proc.stderr


def test_devices_and_the_host_cache_are_checked(model, corpus, tmp_path):
    proc = lema(*base_args(model, corpus, tmp_path / "out"), "--device", "tpu", check=False)
    assert proc.returncode == 1 and "--device tpu" in proc.stderr, proc.stderr
    proc = lema(*base_args(model, corpus, tmp_path / "out"), "--host-cache", "1GiB", check=False)
    assert proc.returncode == 1 and "--host-cache" in proc.stderr, proc.stderr
    import torch
    if not torch.cuda.is_available():
        proc = lema(*base_args(model, corpus, tmp_path / "out"), "--device", "cuda", check=False)
        assert proc.returncode == 1 and "no CUDA device" in proc.stderr, proc.stderr


def test_gpu_memory_settings_are_checked(model, corpus, tmp_path):
    args = base_args(model, corpus, tmp_path / "out")
    proc = lema(*args, "--gpu-memory", "uvm", check=False)
    assert proc.returncode != 0 and "--gpu-memory" in proc.stderr, proc.stderr
    proc = lema(*args, "--gpu-memory", "managed", check=False)
    assert proc.returncode == 1 and "--device cuda" in proc.stderr, proc.stderr
    proc = lema(*args, "--device-memory-cap", "1GiB", check=False)
    assert proc.returncode == 1 and "--device-memory-cap" in proc.stderr, proc.stderr
    # A budget cannot bound plain unified memory; the refusal says what to give instead.
    proc = lema(*args, "--device", "cuda", "--gpu-memory", "unified", check=False)
    assert proc.returncode == 1 and "--budget unlimited" in proc.stderr, proc.stderr
    proc = lema(*args, "--device", "cuda", "--gpu-memory", "managed", "--host-cache", "1GiB",
                check=False)
    assert proc.returncode == 1 and "--host-cache" in proc.stderr, proc.stderr


def test_loss_falls(model, corpus, tmp_path):
    log = train(model, corpus, tmp_path / "out", steps=12)
    assert log[-1]["loss"] < log[0]["loss"] - 0.5


def test_resume_continues_exactly(model, corpus, tmp_path):
    full = train(model, corpus, tmp_path / "full", "--save-every", 3, steps=6)
    # The first part ends early but keeps the whole run's schedule.
    half = train(model, corpus, tmp_path / "split", "--save-every", 3, "--schedule-steps", 6,
                 steps=3)
    rest = train(model, corpus, tmp_path / "split", "--save-every", 3, "--resume", steps=6)
    assert [r["loss"] for r in half] == [r["loss"] for r in full[:3]]
    # The log of a resumed run is appended to.
    assert [r["loss"] for r in rest] == [r["loss"] for r in full]
    assert adapter_bytes(tmp_path / "split") == adapter_bytes(tmp_path / "full")


def test_adapter_loads_in_peft_and_merge_matches(model, corpus, tmp_path):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    train(model, corpus, tmp_path / "out", steps=3)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    lema("merge", "--model", model, "--adapter", tmp_path / "out", "--out", tmp_path / "merged",
         "--budget", BUDGET)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    base = LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(base, tmp_path / "out")
        expected = peft_model(ids).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
        got = merged(ids).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The adapter changed the model (B is no longer zero after training).
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32)(ids).logits
    assert not torch.allclose(plain, expected, rtol=1e-4, atol=1e-4)


def test_generate_json_is_deterministic(model, corpus, tmp_path):
    train(model, corpus, tmp_path / "out", steps=2)
    args = ["generate", "--model", model, "--adapter", tmp_path / "out", "--prompt", "the red",
            "--max-new-tokens", 6, "--seed", 4, "--json", "--budget", BUDGET, "--ignore-eos"]
    first = json.loads(lema(*args).stdout)
    second = json.loads(lema(*args).stdout)
    assert first == second
    assert first["prompt_ids"][0] == 1 and len(first["prompt_ids"]) == 1 + len("the red")
    assert len(first["output_ids"]) == 6 and isinstance(first["text"], str)
    greedy = json.loads(lema("generate", "--model", model, "--prompt-ids", "1,40,41",
                             "--max-new-tokens", 3, "--greedy", "--json", "--ignore-eos").stdout)
    assert greedy["prompt_ids"] == [1, 40, 41] and len(greedy["output_ids"]) == 3


def test_killed_run_leaves_a_loadable_checkpoint(model, corpus, tmp_path):
    out = tmp_path / "out"
    args = ["train", "--model", model, "--data", corpus, "--out", out, "--steps", 200,
            "--seq-len", 32, "--batch", 2, "--save-every", 1, "--budget", BUDGET, "--threads", 1]
    proc = subprocess.Popen([LEMA, *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "latest").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = out / (out / "latest").read_text().strip()
    assert (latest / "adapter_model.safetensors").exists()
    from safetensors import safe_open
    with safe_open(str(latest / "adapter_model.safetensors"), "np") as f:
        assert len(list(f.keys())) == 4 * 7 * 2
    # And training continues from it.
    lema("train", "--model", model, "--data", corpus, "--out", out, "--steps",
         json.loads((latest / "trainer_state.json").read_text())["step"] + 1, "--seq-len", 32,
         "--batch", 2, "--budget", BUDGET, "--resume", "--threads", 1)


def test_checkpoint_truncated_while_training_is_one_error(model, corpus, tmp_path):
    # The default trace policy prefetches: its prefetcher used to retry the page that failed to
    # read forever, and the step waiting for that page spun with it.
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    weights = sorted(copy.glob("*.safetensors"))
    total = sum(w.stat().st_size for w in weights)
    args = ["train", "--model", copy, "--data", corpus, "--out", tmp_path / "out", "--steps",
            1000000, "--seq-len", 32, "--batch", 2, "--budget", BUDGET, "--threads", 1]
    proc = subprocess.Popen([LEMA, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LEMA_IO": "pread"})
    # A budget of a third of the model reads the weights about twice per step: after ten times
    # their size, the trace policy has learned the step and prefetches.
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and process_read_bytes(proc.pid) < 10 * total:
        time.sleep(0.02)
    victim = weights[-1]
    os.truncate(victim, victim.stat().st_size // 2)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("lema train did not exit within 120 s of its checkpoint being truncated")
    assert proc.returncode == 1, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    assert str(victim) in lines[0] and "changed under us" in lines[0], lines[0]


# ---------------------------------------------------------------------------------- bad input

def expect_error(args, *needles):
    proc = lema(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def base_args(model, data, out):
    return ["train", "--model", model, "--data", data, "--out", out, "--steps", 2, "--seq-len",
            32, "--batch", 2, "--budget", BUDGET]


def test_unsupported_architecture(model, corpus, tmp_path):
    other = tmp_path / "phi3"
    other.mkdir()
    for f in model.iterdir():
        (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["Phi3ForCausalLM"]
    config["model_type"] = "phi3"
    (other / "config.json").write_text(json.dumps(config))
    expect_error(base_args(other, corpus, tmp_path / "out"), "phi3")
    assert not (tmp_path / "out" / "latest").exists()


def test_config_disagrees_with_shapes(model, corpus, tmp_path):
    other = tmp_path / "wrong"
    other.mkdir()
    for f in model.iterdir():
        (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 8
    (other / "config.json").write_text(json.dumps(config))
    expect_error(base_args(other, corpus, tmp_path / "out"), "mlp")


def test_empty_and_short_data(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(base_args(model, empty, tmp_path / "o1"), str(empty))
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(range(20)))  # ten uint16 ids, fewer than one sequence of 32
    expect_error(base_args(model, short, tmp_path / "o2"), str(short))


def test_ids_beyond_the_vocabulary(model, tmp_path):
    import numpy as np
    ids = np.arange(100, dtype=np.uint32)
    ids[70] = 5000  # the 'small' vocabulary has 4096 ids
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    expect_error(base_args(model, path, tmp_path / "out"), str(path), "5000")


def test_unwritable_output(model, corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_error(base_args(model, corpus, blocker / "out"), str(blocker))


def test_resume_with_another_lora_shape(model, corpus, tmp_path):
    train(model, corpus, tmp_path / "out", steps=1)
    expect_error(base_args(model, corpus, tmp_path / "out") + ["--resume", "--lora-rank", 4],
                 "rank")


def test_budget_too_small_names_the_op(model, corpus, tmp_path):
    proc = lema(*base_args(model, corpus, tmp_path / "out")[:-2], "--budget", "2MiB", check=False)
    assert proc.returncode == 1
    assert "budget" in proc.stderr


def test_generate_rejects_ids_outside_the_vocabulary(model):
    expect_error(["generate", "--model", model, "--prompt-ids", "1,99999", "--max-new-tokens",
                  1], "99999")


def test_generate_rejects_absurd_settings(model):
    base = ["generate", "--model", model, "--prompt-ids", "1,2"]
    expect_error(base + ["--max-new-tokens", 10**12], "--max-new-tokens 1000000000000",
                 "max_position_embeddings")
    expect_error(base + ["--temperature", "inf"], "--temperature", "(got inf)")
    proc = lema(*base, "--seed=-1", check=False)  # refused by the parser, before any work
    assert proc.returncode != 0 and "--seed" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ settings out of range

@pytest.mark.parametrize("extra, needles", [
    (["--threads", 100000], ["--threads 100000", "CPU"]),
    (["--threads", -1], ["--threads -1"]),
    (["--lora-rank", 100000], ["--lora-rank 100000", "hidden size 256"]),
    (["--lora-rank", 0], ["--lora-rank 0"]),
    (["--lora-alpha", "nan"], ["--lora-alpha nan"]),
    (["--lora-alpha", "-5"], ["--lora-alpha -5"]),
    (["--lora-dropout", "1"], ["--lora-dropout 1"]),
    (["--warmup-steps", 10**18], ["--warmup-steps 1000000000000000000"]),
    (["--steps", 10**18, "--grad-accum", 10**6], ["--steps 1000000000000000000", "--grad-accum"]),
    (["--batch", 10**9], ["--batch 1000000000", "memory"]),
    (["--weight-decay", "inf"], ["--weight-decay inf"]),
    (["--max-grad-norm", "inf"], ["--max-grad-norm inf"]),
])
def test_absurd_settings_are_refused_in_one_line(model, corpus, tmp_path, extra, needles):
    args = base_args(model, corpus, tmp_path / "out")
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    expect_error(args, *needles)
    assert not (tmp_path / "out").exists(), "refused before touching --out"


def test_synthetic_data_beyond_its_bound_is_refused(model, tmp_path):
    expect_error(["train", "--model", model, "--out", tmp_path / "out", "--steps", 10**7,
                  "--seq-len", 32, "--batch", 2], "--steps 10000000", "--data")


def test_negative_seed_is_refused(model, corpus, tmp_path):
    proc = lema(*base_args(model, corpus, tmp_path / "out"), "--seed=-1", check=False)
    assert proc.returncode != 0 and "--seed" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the output directory

def long_run(model, corpus, out, *extra, steps=100000):
    args = ["train", "--model", model, "--data", corpus, "--out", out, "--steps", steps,
            "--seq-len", 32, "--batch", 2, "--save-every", 1, "--budget", BUDGET, "--threads", 1,
            *extra]
    return subprocess.Popen([LEMA, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(model, corpus, tmp_path):
    out = tmp_path / "out"
    first = long_run(model, corpus, out)
    try:
        lock = out / ".lema.lock"
        assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid))
        line = expect_error(base_args(model, corpus, out), str(out), f"pid {first.pid}")
        assert "in use" in line
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.wait()
    # Its lock died with it (SIGKILL): the directory is free again.
    lema(*base_args(model, corpus, out))


def test_taking_out_removes_only_what_killed_saves_left(model, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ours = [".latest.tmp-4242-0", ".adapter_model.safetensors.tmp-4242-3",
            ".adapter_config.json.tmp-4242-4", ".partial-checkpoint-7-4242",
            ".partial-old-checkpoint-2-4242", ".partial-probe-4242"]
    theirs = ["notes.txt", ".latest.tmp", ".partial-mine", ".latest.tmp-4242-0.bak",
              "data.safetensors.tmp-1-2", ".model.safetensors.tmp-4242-0"]
    for name in ours:
        if name.startswith(".partial-c") or name.startswith(".partial-o"):
            (out / name).mkdir()
            (out / name / "adapter_model.safetensors").write_text("trunc")
        else:
            (out / name).write_text("half")
    for name in theirs:
        (out / name).write_text("keep")
    train(model, corpus, out, steps=1)
    for name in ours:
        assert not (out / name).exists(), name
    for name in theirs:
        assert (out / name).read_text() == "keep", name


LEMA_TEMPORARY = (".partial-", ".latest.tmp-", ".adapter_model.safetensors.tmp-",
                  ".adapter_config.json.tmp-")
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
                    "trainer_state.json"}


def assert_only_complete_checkpoints(out, allow_temporaries):
    for entry in (out.iterdir() if out.exists() else []):
        if entry.name.startswith("checkpoint-"):
            assert {p.name for p in entry.iterdir()} == CHECKPOINT_FILES, entry
            state = json.loads((entry / "trainer_state.json").read_text())
            assert entry.name == f"checkpoint-{state['step']}"
        elif entry.name.startswith(LEMA_TEMPORARY):
            assert allow_temporaries, f"{entry} outlived a resume"
        else:
            assert entry.name in {"latest", ".lema.lock", "adapter_model.safetensors",
                                  "adapter_config.json"}, entry


def test_runs_killed_at_random_moments_leave_only_complete_checkpoints(model, corpus, tmp_path):
    rng = random.Random(7)
    out = tmp_path / "out"
    for attempt in range(8):
        proc = long_run(model, corpus, out, "--resume")  # each run continues the last one
        # Somewhere between starting up and several saves in.
        if attempt % 2:
            wait_for(lambda: (out / "latest").exists())
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_only_complete_checkpoints(out, allow_temporaries=True)
        latest = out / "latest"
        step = 0
        if latest.exists():
            step = json.loads((out / latest.read_text().strip() / "trainer_state.json")
                              .read_text())["step"]
        resumed = lema("train", "--model", model, "--data", corpus, "--out", out, "--steps",
                       step + 1, "--seq-len", 32, "--batch", 2, "--save-every", 1, "--budget",
                       BUDGET, "--resume", "--threads", 1, check=False)
        errors = [l for l in resumed.stderr.splitlines() if l.startswith("error:")]
        assert resumed.returncode == 0 or len(errors) == 1, resumed.stderr
        assert resumed.returncode == 0, resumed.stderr  # nothing here should refuse
        assert_only_complete_checkpoints(out, allow_temporaries=False)
        assert (out / "latest").read_text().strip() == f"checkpoint-{step + 1}"


def test_resume_points_latest_at_the_checkpoint_it_continues_from(model, corpus, tmp_path):
    # A run killed between renaming checkpoint-2 into place and updating `latest` leaves the
    # pointer behind; the resumed run has nothing left to train but must repair it.
    out = tmp_path / "out"
    lema(*base_args(model, corpus, out), "--save-every", 1, "--threads", 1)
    for stale in (None, "checkpoint-1\n"):
        if stale is None:
            (out / "latest").unlink()
        else:
            (out / "latest").write_text(stale)
        resumed = lema(*base_args(model, corpus, out), "--save-every", 1, "--resume",
                       "--threads", 1)
        assert "resumed from" in resumed.stderr, resumed.stderr
        assert (out / "latest").read_text().strip() == "checkpoint-2"


def test_budget_error_is_one_line_with_the_pages_and_the_smallest_budget(model, corpus, tmp_path):
    for args in (base_args(model, corpus, tmp_path / "out")[:-2] + ["--budget", "2MiB"],
                 ["generate", "--model", model, "--prompt-ids", "1,40,41", "--max-new-tokens", 1,
                  "--budget", "2MiB"]):
        proc = lema(*args, check=False)
        assert proc.returncode == 1, proc.stderr
        # The error is the last line and one line: no libtorch stack frames after it (train
        # prints what it opened before).
        lines = proc.stderr.strip().splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert errors == [len(lines) - 1], proc.stderr
        assert "frame #" not in proc.stderr and "Exception raised" not in proc.stderr
        lines = lines[-1:]
        m = re.search(r"they span (\d+) pages of 2 MiB \((\d+) MiB\) but the budget holds 1 page "
                      r"\(2 MiB\); the smallest budget that works is (\d+) MiB \((\d+) bytes\): "
                      r"raise the budget \(--budget\) to at least that", lines[0])
        assert m, lines[0]
        pages = int(m.group(1))
        assert pages >= 2 and int(m.group(2)) == int(m.group(3)) == 2 * pages
        assert int(m.group(4)) == pages << 21
        # 2 MiB is the smallest page: no smaller one is offered; no Python or C++ setting names.
        assert "page size" not in lines[0] and "budget=" not in lines[0], lines[0]
        assert "budget_bytes" not in lines[0], lines[0]


# ------------------------------------------------------------------------------------ presets

# Presets that train in seconds as they are; the others keep their vocabulary and tie setting
# (what the tokenizer checks) over a shrunken body.
FAST_PRESETS = {"tiny", "small"}
SHRUNKEN = ["--hidden", 32, "--layers", 1, "--heads", 2, "--kv-heads", 1, "--intermediate", 64]


def preset_names():
    help_text = lema("gen", "--help").stdout
    m = re.search(r"--preset TEXT:\{([^}]*)\}", help_text)
    assert m, help_text
    return m.group(1).split(",")


def test_every_preset_trains_and_generates_from_text(corpus, tmp_path):
    names = preset_names()
    assert FAST_PRESETS <= set(names), names
    for name in names:
        out = tmp_path / name
        lema("gen", "--out", out, "--preset", name, "--seed", 1,
             *([] if name in FAST_PRESETS else SHRUNKEN))
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        assert vocab >= 3 + 256, (name, vocab)  # the byte-level tokenizer's ids fit
        lema("train", "--model", out, "--data", corpus, "--out", tmp_path / f"{name}-adapter",
             "--steps", 1, "--seq-len", 16, "--batch", 1, "--threads", 1)
        got = json.loads(lema("generate", "--model", out, "--adapter", tmp_path / f"{name}-adapter",
                              "--prompt", "the red", "--max-new-tokens", 3, "--greedy", "--json",
                              "--ignore-eos").stdout)
        assert len(got["output_ids"]) == 3 and all(0 <= i < vocab for i in got["output_ids"])


def test_a_vocabulary_too_small_for_bytes_still_takes_token_ids(tmp_path):
    import numpy as np
    out = tmp_path / "m"
    lema("gen", "--out", out, "--preset", "tiny", "--vocab", 256, "--seed", 1)
    ids = tmp_path / "ids.npy"
    np.save(ids, (np.arange(400, dtype=np.uint32) * 7) % 256)
    lema("train", "--model", out, "--data", ids, "--out", tmp_path / "adapter", "--steps", 1,
         "--seq-len", 16, "--batch", 1, "--threads", 1)
    got = json.loads(lema("generate", "--model", out, "--adapter", tmp_path / "adapter",
                          "--prompt-ids", "1,40,41", "--max-new-tokens", 2, "--greedy", "--json",
                          "--ignore-eos").stdout)
    assert len(got["output_ids"]) == 2
    # Text still needs the byte ids: one line saying so.
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 20)
    expect_error(["train", "--model", out, "--data", text, "--out", tmp_path / "a2", "--steps", 1,
                  "--seq-len", 16, "--batch", 1], "259", "token ids")
    expect_error(["generate", "--model", out, "--prompt", "hi", "--max-new-tokens", 1], "259")
