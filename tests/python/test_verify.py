"""`lema verify` streams every tensor through the pager under a budget; its CRC32s must equal
zlib's CRC32 of the bytes the reference `safetensors` package reads, in every mode, order and
policy, and the peak resident bytes must stay within the budget."""
import json
import os
import shutil
import subprocess
import time
import zlib

import pytest
from safetensors import safe_open

from conftest import process_read_bytes, read_header

LEMA = os.environ.get("LEMA_BIN", "lema")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "model"
    subprocess.run([LEMA, "gen", "--out", str(out), "--preset", "small", "--shard-size", "6MiB",
                    "--seed", "7"], check=True, capture_output=True)
    return out


def reference_crcs(model):
    crcs = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            for name in f.keys():
                crcs[name] = "%08x" % zlib.crc32(f.get_tensor(name).tobytes())
    return crcs


@pytest.mark.parametrize("budget", ["2MiB", "6MiB", "64MiB"])
@pytest.mark.parametrize("order", ["file", "layer", "random"])
@pytest.mark.parametrize("mode,policy", [("guard", "lru"), ("guard", "trace"), ("fault", "lru"),
                                         ("fault", "trace")])
def test_crcs_equal_reference_under_budget(model, budget, order, mode, policy):
    out = subprocess.run([LEMA, "verify", str(model), "--budget", budget, "--order", order,
                          "--mode", mode, "--policy", policy, "--passes", "2", "--seed", "3",
                          "--json"], check=True, capture_output=True, text=True)
    report = json.loads(out.stdout)
    got = {t["name"]: t["crc32"] for t in report["tensors"]}
    assert got == reference_crcs(model)
    stats = report["stats"]
    assert 0 < stats["peak_resident_bytes"] <= stats["budget_bytes"]
    assert stats["budget_bytes"] <= int(budget[:-3]) << 20


def test_budget_smaller_than_a_page_is_one_line_error(model):
    out = subprocess.run([LEMA, "verify", str(model), "--budget", "1MiB"], capture_output=True,
                         text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "1 MiB" in lines[0] and "2 MiB" in lines[0]


# ------------------------------------------------------- files that change while being read
#
# The checkpoint is changed once `lema verify` has read it twice over (its read bytes, from
# /proc/<pid>/io, counted with LEMA_IO=pread): the first pass is then complete, and with a budget
# of one page every pass reads every page again.

def start_and_wait_for_reads(args, nbytes):
    proc = subprocess.Popen([LEMA, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LEMA_IO": "pread"})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if process_read_bytes(proc.pid) >= nbytes:
                break
        except OSError:
            break
        time.sleep(0.01)
    return proc


def finish(proc):
    """(status, the stderr lines that start with 'error:'); a run that does not end in time is
    killed and fails the test (a hang or a spin)."""
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("lema did not exit within 120 s after its checkpoint changed (hang or spin)")
    return proc.returncode, err, [l for l in err.splitlines() if l.startswith("error:")]


def model_copy(model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


def fault_mode_available(model):
    out = subprocess.run([LEMA, "verify", str(model), "--budget", "64MiB", "--mode", "fault",
                          "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["stats"]["mode"] == "fault"


@pytest.mark.parametrize("mode", ["guard", "fault"])
def test_file_truncated_while_verifying_is_one_named_read_error(model, tmp_path, mode):
    if mode == "fault" and not fault_mode_available(model):
        pytest.skip("userfaultfd is not available here")
    copy = model_copy(model, tmp_path)
    shards = sorted(copy.glob("*.safetensors"))
    total = sum(s.stat().st_size for s in shards)
    proc = start_and_wait_for_reads(["verify", copy, "--budget", "2MiB", "--mode", mode,
                                     "--passes", 1000000], 2 * total)
    victim = shards[-1]
    os.truncate(victim, victim.stat().st_size // 2)
    status, err, errors = finish(proc)
    assert status == 1, err  # fault mode used to die of SIGSEGV in the reader of the page
    assert len(errors) == 1, err
    assert str(victim) in errors[0] and "offset" in errors[0], errors[0]
    assert "changed under us" in errors[0], errors[0]


def test_file_modified_between_passes_is_blamed_on_the_file(model, tmp_path):
    copy = model_copy(model, tmp_path)
    shards = sorted(copy.glob("*.safetensors"))
    total = sum(s.stat().st_size for s in shards)
    proc = start_and_wait_for_reads(["verify", copy, "--budget", "2MiB", "--order", "layer",
                                     "--passes", 1000000], 2 * total)
    # The embedding comes first in layer order: its first pass is long done.
    name = "model.embed_tokens.weight"
    for shard in shards:
        n, header = read_header(shard)
        if name in header:
            begin = 8 + n + header[name]["data_offsets"][0]
            with open(shard, "r+b") as f:
                f.seek(begin)
                old = f.read(4096)
                f.seek(begin)
                f.write(bytes(b ^ 0xFF for b in old))
            break
    status, err, errors = finish(proc)
    assert status == 1, err
    assert len(errors) == 1, err
    assert str(shard) in errors[0], errors[0]
    assert f"tensor '{name}' changed on disk between passes" in errors[0], errors[0]
    assert "the pager returned different bytes" not in errors[0], errors[0]


# ------------------------------------------------------------------- the shared host cache

@pytest.mark.parametrize("route", ["flag", "env"])
def test_shared_host_cache_serves_evicted_pages_and_goes_with_the_process(model, route):
    """Under a one-page budget every pass reads every page again; with the shared host cache
    (--shared-host-cache, or LEMA_SHARED_HOST_CACHE as the Python route sets it) later passes
    copy them from shared memory: the files are read once and the bytes still equal the
    reference (the segment's removal is asserted by runtime_shared_cache_test)."""
    def run(extra, env):
        out = subprocess.run([LEMA, "verify", str(model), "--budget", "2MiB", "--passes", "3",
                              "--json", *extra], check=True, capture_output=True, text=True,
                             env={**os.environ, **env})
        return json.loads(out.stdout)

    plain = run([], {})
    shared = run(["--shared-host-cache", "64MiB"], {}) if route == "flag" else \
        run([], {"LEMA_SHARED_HOST_CACHE": "64MiB"})
    assert {t["name"]: t["crc32"] for t in shared["tensors"]} == reference_crcs(model)
    assert shared["stats"]["shared_cache_hits"] > 0
    assert shared["stats"]["bytes_read"] * 3 == plain["stats"]["bytes_read"]


def test_shared_host_cache_too_small_is_one_line_error(model):
    out = subprocess.run([LEMA, "verify", str(model), "--budget", "4MiB"], capture_output=True,
                         text=True, env={**os.environ, "LEMA_SHARED_HOST_CACHE": "1MiB"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "LEMA_SHARED_HOST_CACHE" in lines[0], out.stderr
