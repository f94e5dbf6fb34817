"""`lema verify` streams every tensor through the pager under a budget; its CRC32s must equal
zlib's CRC32 of the bytes the reference `safetensors` package reads, in every mode, order and
policy, and the peak resident bytes must stay within the budget."""
import json
import os
import subprocess
import zlib

import pytest
from safetensors import safe_open

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
