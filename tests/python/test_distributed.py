"""`lema train` over several ranks (c10d: TCPStore + Gloo on the loopback interface):

- torchrun --no-python starts the ranks as --nproc does;
- 2 ranks × --batch 2 take the steps of 1 rank × --batch 4, with --grad-accum too: the same
  per-step losses and adapters up to float rounding;
- a resumed 2-rank run ends with the adapter of an uninterrupted one, bit for bit;
- ranks started with different settings are refused, naming the setting and the ranks;
- a port in use is one line naming it;
- each rank saves its own profile, and `lema prof report` of several shows a line per rank;
- a rank killed with SIGKILL stops the others at once with an error naming it, the launcher
  names it too, and the last checkpoint resumes;
- a rank that hangs (SIGSTOP) is named after --dist-timeout, by the launcher too (rank and
  pid), which kills it at once; the last checkpoint resumes;
- --dist-backend: auto picks Gloo on the CPU (the log line and --log-json say so), a named
  backend trains through a group even of one rank, nccl on the CPU is refused in one line, and
  on a machine without a GPU --device cuda (NCCL) is one line, neither a crash nor a hang.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import lema_bin
from conftest import run_lema as lema

CORPUS = "\n".join(
    f"the {a} {b} sat on the {c} mat, and the {b} {a} ran to the {c} door."
    for a in ["red", "small", "old", "quick"] for b in ["cat", "dog", "fox"]
    for c in ["green", "blue"]) + "\n"
SETTINGS = ["--seq-len", "16", "--lr", "3e-3", "--threads", "1", "--dist-timeout", "5"]
COMMON = [*SETTINGS, "--seed", "5"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "model"
    lema("gen", "--out", out, "--preset", "tiny", "--seed", "3")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def train(model, corpus, out, *extra):
    log = Path(str(out) + ".jsonl")
    lema("train", "--model", model, "--data", corpus, "--out", out, "--log-json", log,
         *COMMON, *extra)
    return [json.loads(line) for line in log.read_text().splitlines()]


def adapter(out):
    return load_file(Path(out) / "adapter_model.safetensors")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_take_the_steps_of_one_with_twice_the_batch(model, corpus, tmp_path,
                                                              grad_accum):
    args = ["--steps", "4", "--grad-accum", str(grad_accum)]
    one = train(model, corpus, tmp_path / "one", *args, "--batch", "4")
    two = train(model, corpus, tmp_path / "two", *args, "--batch", "2", "--nproc", "2")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    # The gradients are the global batch's mean, not the ranks' sum (AdamW alone would hide it).
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one],
                               rtol=1e-4)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # The adapters did move: the comparison is not between two untouched initialisations.
    assert any(np.abs(t).max() > 0 for n, t in a.items() if "lora_B" in n)
    # Rank 0 alone wrote into --out: checkpoints, the adapter, one log line per step.
    assert (tmp_path / "two" / "latest").read_text().strip() == "checkpoint-4"


def test_synthetic_tokens_are_those_of_the_global_batch(model, tmp_path):
    def losses(out, *extra):
        log = tmp_path / f"{out}.jsonl"
        lema("train", "--model", model, "--out", tmp_path / out, "--log-json", log, "--steps",
             "2", *COMMON, *extra)
        return [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    np.testing.assert_allclose(losses("two", "--batch", "2", "--nproc", "2"),
                               losses("one", "--batch", "4"), rtol=1e-5)


def test_each_rank_saves_its_own_profile(model, corpus, tmp_path):
    env = dict(os.environ, LEMA_PROFILE=str(tmp_path / "run.lprof"))
    proc = subprocess.run(
        [lema_bin(), "train", "--model", str(model), "--data", str(corpus), "--out",
         str(tmp_path / "out"), "--steps", "2", "--batch", "2", "--nproc", "2", *COMMON],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.lprof")) == ["run.rank0.lprof",
                                                                "run.rank1.lprof"]
    files = [tmp_path / "run.rank0.lprof", tmp_path / "run.rank1.lprof"]
    lines = lema("prof", "report", *files).stdout.splitlines()
    assert lines[0].split()[:4] == ["profile", "pid", "wall", "s"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert list(rows) == [str(f) for f in files] + ["total"]
    assert int(rows["total"][1]) == int(rows[str(files[0])][3]) + int(rows[str(files[1])][3])
    assert lines[4].startswith("most stalled: ")
    per_rank = json.loads(lema("prof", "report", "--json", *files).stdout)
    assert [r["file"] for r in per_rank] == [str(f) for f in files]


def test_torchrun_starts_the_ranks_as_nproc_does(model, corpus, tmp_path):
    args = ["--steps", "2", "--batch", "2"]
    ours = train(model, corpus, tmp_path / "ours", *args, "--nproc", "2")
    log = tmp_path / "torchrun.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--no-python", "--nproc_per_node", "2",
         "--master_port", str(free_port()), lema_bin(), "train", "--model", str(model), "--data",
         str(corpus), "--out", str(tmp_path / "torchrun"), "--log-json", str(log), *COMMON,
         *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    theirs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["loss"] for r in theirs] == [r["loss"] for r in ours]
    assert ((tmp_path / "ours" / "adapter_model.safetensors").read_bytes() ==
            (tmp_path / "torchrun" / "adapter_model.safetensors").read_bytes())


def test_a_resumed_two_rank_run_ends_as_an_uninterrupted_one(model, corpus, tmp_path):
    whole = ["--batch", "2", "--nproc", "2", "--schedule-steps", "6"]
    train(model, corpus, tmp_path / "whole", *whole, "--steps", "6")
    train(model, corpus, tmp_path / "parts", *whole, "--steps", "3")
    log = train(model, corpus, tmp_path / "parts", *whole, "--steps", "6", "--resume")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the resumed run appends
    assert ((tmp_path / "parts" / "adapter_model.safetensors").read_bytes() ==
            (tmp_path / "whole" / "adapter_model.safetensors").read_bytes())


def start_ranks(model, corpus, out, per_rank_args, port=None):
    port = port or free_port()
    procs = []
    for rank, extra in enumerate(per_rank_args):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(len(per_rank_args)), LOCAL_WORLD_SIZE=str(len(per_rank_args)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_CPP_LOG_LEVEL="ERROR")
        procs.append(subprocess.Popen(
            [lema_bin(), "train", "--model", str(model), "--data", str(corpus), "--out",
             str(out), "--steps", "2", "--batch", "2", *SETTINGS, *extra],
            env=env, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=60), p.stderr.read()) for p in procs]


def test_ranks_with_different_settings_are_refused(model, corpus, tmp_path):
    results = start_ranks(model, corpus, tmp_path / "out", [["--seed", "5"], ["--seed", "6"]])
    for rc, err in results:
        assert rc == 1
        assert err.strip().splitlines()[-1] == (
            "error: --seed differs between ranks: rank 0 has 5, rank 1 has 6; start every rank "
            "with the same settings")
    assert not (tmp_path / "out" / "latest").exists()


def test_a_port_in_use_is_named(model, corpus, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, err = start_rank0_only(model, corpus, tmp_path / "out", port)
    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        f"error: MASTER_PORT {port} is in use on this machine, so rank 0 cannot serve the "
        "rendezvous on it; give another port (MASTER_PORT, torchrun --master-port) or let lema "
        "train --nproc pick a free one")


def start_rank0_only(model, corpus, out, port):
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCH_CPP_LOG_LEVEL="ERROR")
    p = subprocess.run([lema_bin(), "train", "--model", str(model), "--data", str(corpus),
                        "--out", str(out), "--steps", "2", "--batch", "2", *COMMON],
                       env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr


def rank_pid(launcher, rank):
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among the launcher's children {children}")


def start_and_hit_rank1(model, corpus, out, sig):
    """Starts 2 ranks, sends `sig` to rank 1 once a checkpoint exists; the launcher's stderr
    lines and rank 1's pid."""
    launcher = subprocess.Popen(
        [lema_bin(), "train", "--model", str(model), "--data", str(corpus), "--out", str(out),
         "--steps", "100000", "--batch", "2", "--save-every", "2", "--nproc", "2", *COMMON],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "latest").exists():
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rank1 = rank_pid(launcher.pid, 1)
        os.kill(rank1, sig)
        # Within --dist-timeout 5 (and the launcher's grace); the test asserts the outcome only.
        err = launcher.communicate(timeout=50)[1]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
            try:  # a stopped rank ignores the SIGTERM its launcher's death sends
                os.kill(rank1, signal.SIGKILL)
            except (NameError, ProcessLookupError):
                pass
    assert launcher.returncode == 1
    return err.strip().splitlines(), rank1


def test_a_killed_rank_stops_the_others_and_the_last_checkpoint_resumes(model, corpus,
                                                                        tmp_path):
    out = tmp_path / "out"
    lines, _ = start_and_hit_rank1(model, corpus, out, signal.SIGKILL)
    err = "\n".join(lines)
    assert lines[-1] == "error: rank 1 of 2 (lema train --nproc 2) was killed by signal 9 (Killed)"
    assert any(line.startswith("error: rank 1 stopped during ") and "rank 0 stops too" in line
               for line in lines), err
    step = int((out / "latest").read_text().strip().split("-")[1])
    assert step >= 2
    log = train(model, corpus, out, "--batch", "2", "--nproc", "2", "--resume",
                "--steps", str(step + 2), "--schedule-steps", "100000")
    assert [r["step"] for r in log] == [step + 1, step + 2]


def test_a_hung_rank_is_named_after_the_timeout(model, corpus, tmp_path):
    # A stopped rank neither answers nor closes its connections: rank 0's all-reduce times out
    # after --dist-timeout, the roll call finds rank 1 missing, and the launcher names rank 1 with
    # its pid, as behind in collectives and stopped, and kills it at once.
    out = tmp_path / "out"
    lines, rank1 = start_and_hit_rank1(model, corpus, out, signal.SIGSTOP)
    assert any(line.startswith("error: rank 1 stopped during ") and "Timed out" in line
               for line in lines), lines
    assert lines[-1].startswith(f"error: rank 1 (pid {rank1}) of 2 (lema train --nproc 2) hung: "
                                "it reached no collective for "), lines
    assert lines[-1].endswith(" and is stopped by a signal (--dist-timeout 5 s), so rank 0 "
                              "exited with status 1; it was killed"), lines
    step = int((out / "latest").read_text().strip().split("-")[1])
    log = train(model, corpus, out, "--batch", "2", "--nproc", "2", "--resume",
                "--steps", str(step + 1), "--schedule-steps", "100000")
    assert [r["step"] for r in log] == [step + 1]


def train_logged(model, corpus, out, *extra):
    """A short run; its stderr and the records of --log-json."""
    log = Path(str(out) + ".jsonl")
    proc = lema("train", "--model", model, "--data", corpus, "--out", out, "--log-json", log,
                "--steps", "2", *COMMON, *extra)
    return proc.stderr, [json.loads(line) for line in log.read_text().splitlines()]


def test_auto_picks_gloo_on_the_cpu(model, corpus, tmp_path):
    err, records = train_logged(model, corpus, tmp_path / "out", "--nproc", "2", "--batch", "2")
    assert "2 ranks (gloo on cpu, rendezvous at 127.0.0.1:" in err
    assert [(r["dist_backend"], r["world_size"]) for r in records] == [("gloo", 2)] * 2


def test_a_named_backend_trains_one_rank_through_a_group_with_the_same_steps(model, corpus,
                                                                             tmp_path):
    _, plain = train_logged(model, corpus, tmp_path / "plain", "--batch", "2")
    err, grouped = train_logged(model, corpus, tmp_path / "grouped", "--batch", "2",
                                "--dist-backend", "gloo")
    assert "1 rank (gloo on cpu, rendezvous at 127.0.0.1:" in err
    assert all("dist_backend" not in r for r in plain)
    assert [r["dist_backend"] for r in grouped] == ["gloo"] * 2
    # A sum over one rank divided by one: the same losses and adapters, bit for bit.
    assert [r["loss"] for r in grouped] == [r["loss"] for r in plain]
    for name, value in adapter(tmp_path / "plain").items():
        np.testing.assert_array_equal(adapter(tmp_path / "grouped")[name], value)


def one_line_refusal(model, tmp_path, *extra):
    """`lema train` that must stop at once with one error line and exit status 1."""
    p = subprocess.run([lema_bin(), "train", "--model", str(model), "--out",
                        str(tmp_path / "out"), "--steps", "1", *COMMON, *extra],
                       capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not (tmp_path / "out").exists()  # refused before anything touched --out
    return lines[0]


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_nccl_on_the_cpu_is_refused_in_one_line(model, tmp_path, nproc):
    line = one_line_refusal(model, tmp_path, "--dist-backend", "nccl", "--device", "cpu",
                            "--nproc", nproc)
    assert line == (
        "error: --dist-backend nccl moves tensors between GPUs, but the training device is "
        "--device cpu; add --device cuda, or use --dist-backend gloo (or auto) on the CPU")


def test_an_unknown_backend_is_refused_in_one_line(model, tmp_path):
    assert one_line_refusal(model, tmp_path, "--dist-backend", "mpi") == (
        "error: --dist-backend mpi: give auto, gloo or nccl")


def gpu_count():
    import torch
    return torch.cuda.device_count()


@pytest.mark.parametrize("extra", [["--dist-backend", "nccl"], ["--nproc", "2"],
                                   ["--nproc", "2", "--dist-backend", "nccl"]],
                         ids=["nccl", "auto-2-ranks", "nccl-2-ranks"])
def test_cuda_without_a_gpu_is_one_line(model, tmp_path, extra):
    if gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    line = one_line_refusal(model, tmp_path, "--device", "cuda", *extra)
    if "this build of LEMA has no NCCL" in line:
        assert "--dist-backend nccl" in extra, line  # auto falls back to Gloo there
        return
    assert line.startswith("error: --dist-backend nccl needs a GPU for --device cuda, and torch "
                           "sees none on this machine ("), line
    assert line.endswith("); train on --device cpu (Gloo)"), line


def test_one_gpu_for_several_nccl_ranks_is_refused_in_one_line(model, tmp_path):
    line = one_line_refusal(model, tmp_path, "--device", "cuda:0", "--nproc", "2",
                            "--dist-backend", "nccl")
    if "this build of LEMA has no NCCL" in line:
        return
    assert line == ("error: --device cuda:0 puts all 2 local ranks on one GPU, and NCCL takes "
                    "one GPU per rank; give --device cuda (local rank r on GPU r)")


def test_cuda_without_a_gpu_under_torchrun_is_one_line_per_rank(model, tmp_path):
    if gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = subprocess.run([lema_bin(), "train", "--model", str(model), "--out",
                        str(tmp_path / "out"), "--steps", "1", *COMMON, "--device", "cuda",
                        "--dist-backend", "nccl"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: --dist-backend nccl needs a GPU for --device cuda,") or \
        "this build of LEMA has no NCCL" in lines[0], lines[0]
