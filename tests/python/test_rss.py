"""Memory stays bounded by the budget, not by the model: `lema verify` of a checkpoint of about
1 GB under a 32 MiB budget keeps its process's peak resident set under 200 MB, and its own
counters report a peak resident bytes within the budget."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

LEMA = os.environ.get("LEMA_BIN", "lema")
BUDGET = 32 << 20
RSS_LIMIT = 200 * 1000 * 1000


def run_measuring_peak_rss(args):
    """Runs `args` as a child and returns (exit status, stdout, stderr, peak RSS in bytes) of
    exactly that child, from the rusage wait4 reports for it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def big_model():
    # On the same disk as the other test data, not in memory: a tmpfs file would count against
    # the machine's memory and hide nothing about the process's own.
    root = tempfile.mkdtemp(prefix="lema-rss-", dir=os.environ.get("LEMA_TEST_TMPDIR", "/var/tmp"))
    try:
        out = os.path.join(root, "model")
        subprocess.run([LEMA, "gen", "--out", out, "--preset", "medium", "--seed", "3"],
                       check=True, capture_output=True)
        yield out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def model_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


@pytest.mark.parametrize("mode", ["guard", "fault"])
def test_verify_of_1gb_under_32mib_keeps_peak_rss_under_200mb(big_model, mode):
    assert model_bytes(big_model) > 900 * 1000 * 1000
    rc, out, err, peak_rss = run_measuring_peak_rss(
        [LEMA, "verify", big_model, "--budget", "32MiB", "--mode", mode, "--json"])
    assert rc == 0, err
    report = json.loads(out)
    stats = report["stats"]
    assert len(report["tensors"]) > 0
    assert 0 < stats["peak_resident_bytes"] <= stats["budget_bytes"] <= BUDGET
    assert peak_rss < RSS_LIMIT, (
        f"peak RSS {peak_rss / 1e6:.1f} MB of `lema verify --budget 32MiB --mode {mode}` over a "
        f"{model_bytes(big_model) / 1e9:.2f} GB checkpoint (stats: {stats})")
