"""`lema prof`: record a paging run of `lema verify`, report it as a table, JSON, a Chrome trace
and an SVG timeline; the report's counts must equal the counters `lema verify` itself prints."""
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from conftest import run_lema as lema

LEMA = os.environ.get("LEMA_BIN", "lema")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "model"
    lema("gen", "--out", out, "--preset", "small", "--shard-size", "6MiB", "--seed", "7")
    return out


@pytest.mark.parametrize("mode,policy", [("guard", "lru"), ("guard", "trace"), ("fault", "lru")])
def test_report_counts_equal_the_runs_own_counters(model, tmp_path, mode, policy):
    prof = tmp_path / "run.lprof"
    run = lema("prof", "record", "-o", prof, "--", LEMA, "verify", model, "--budget", "4MiB",
               "--passes", "3", "--mode", mode, "--policy", policy, "--json")
    stats = json.loads(run.stdout)["stats"]
    assert prof.exists()
    report = json.loads(lema("prof", "report", prof, "--json").stdout)
    assert not os.path.exists(f"/dev/shm/lema-prof-{report['pid']}"), "the recorder removes it"
    exact = ["faults", "hits", "page_size"]
    if policy == "lru":
        exact += ["bytes_read", "evictions", "prefetches_issued", "peak_resident_bytes"]
    else:
        # `lema verify` reads its counters while the last prefetches may still be in flight;
        # the profile holds the counters as the pager closed.
        assert stats["bytes_read"] <= report["bytes_read"]
        assert report["bytes_read"] - stats["bytes_read"] <= 8 * stats["page_size"]
    for key in exact:
        assert report[key] == stats[key], key
    assert report["io_path"] == stats["io_path"]
    assert report["dropped"] == 0
    assert report["peak_resident_bytes"] <= report["budget_bytes"]
    b = report["belady"]
    assert 0 < b["belady_fetches"] <= b["run_fetches"]
    assert b["run_fetches"] == report["faults"] + report["prefetches_issued"]
    assert b["belady_bytes"] <= report["bytes_read"] + 1
    assert report["layers"] and report["tensors"]
    assert "verify" in report["command"]


def test_chrome_trace_and_svg(model, tmp_path):
    prof = tmp_path / "run.lprof"
    lema("prof", "record", "-o", prof, "--", LEMA, "verify", model, "--budget", "2MiB",
         "--passes", "2")
    chrome, svg = tmp_path / "trace.json", tmp_path / "timeline.svg"
    table = lema("prof", "report", prof, "--chrome", chrome, "--svg", svg, "--top", "3").stdout
    for line in ("faults", "hit rate", "read bandwidth", "stall time", "peak resident", "budget",
                 "io path", "Belady", "by layer", "by tensor"):
        assert line in table, line

    trace = json.loads(chrome.read_text())
    events = trace["traceEvents"]
    assert events
    for e in events:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in e, (key, e)
    faults = [e for e in events if e["ph"] == "X" and e["name"] == "fault"]
    assert faults and all("dur" in e and "page" in e["args"] for e in faults)

    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    ids = {el.get("id") for el in root.iter()}
    assert {"faults", "prefetches", "evictions", "budget", "resident", "legend"} <= ids
    assert root.find(".//{http://www.w3.org/2000/svg}path[@id='faults']").get("d")


def test_record_forwards_the_exit_code_and_keeps_what_was_recorded(tmp_path):
    prof = tmp_path / "fail.lprof"
    proc = lema("prof", "record", "-o", prof, "--", "sh", "-c", "exit 7", check=False)
    assert proc.returncode == 7
    report = json.loads(lema("prof", "report", prof, "--json").stdout)
    assert report["exit_code"] == 7 and report["faults"] == 0


def test_bad_input(tmp_path):
    proc = lema("prof", "record", "-o", tmp_path / "x.lprof", check=False)
    assert proc.returncode != 0 and "COMMAND" in proc.stderr

    proc = lema("prof", "record", "-o", tmp_path / "x.lprof", "--", "no-such-program-here",
                check=False)
    assert proc.returncode != 0 and "no-such-program-here" in proc.stderr

    missing = tmp_path / "missing.lprof"
    proc = lema("prof", "report", missing, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr

    foreign = tmp_path / "foreign.lprof"
    foreign.write_text('{"traceEvents": []}')
    proc = lema("prof", "report", foreign, check=False)
    assert proc.returncode == 1 and str(foreign) in proc.stderr and "not a lema profile" in proc.stderr

    proc = lema("prof", "top", "999999999", "--once", check=False)
    assert proc.returncode == 1 and "no profile segment" in proc.stderr


def test_top_shows_a_running_process(model, tmp_path):
    env = dict(os.environ, LEMA_PROFILE=str(tmp_path / "self.lprof"))
    # Many passes under a tiny budget keep it paging long enough to be watched.
    child = subprocess.Popen([LEMA, "verify", model, "--budget", "2MiB", "--passes", "200"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = None
        for _ in range(200):
            proc = lema("prof", "top", child.pid, "--once", check=False)
            if proc.returncode == 0 and "pager" in proc.stdout:
                seen = proc.stdout
                break
            if child.poll() is not None:
                break
            subprocess.run(["sleep", "0.02"])
        assert seen is not None, "top never saw the process"
        assert "faults" in seen and f"pid {child.pid}" in seen
    finally:
        child.kill()
        child.wait()
        # Killed, it could not remove its segment; nobody else will.
        seg = f"/dev/shm/lema-prof-{child.pid}"
        if os.path.exists(seg):
            os.remove(seg)


def test_a_killed_process_is_not_listed_and_its_segment_is_removed(model, tmp_path):
    env = dict(os.environ, LEMA_PROFILE=str(tmp_path / "killed.lprof"))
    child = subprocess.Popen([LEMA, "verify", model, "--budget", "2MiB", "--passes", "200"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seg = f"/dev/shm/lema-prof-{child.pid}"
    try:
        for _ in range(500):
            if os.path.exists(seg) or child.poll() is not None:
                break
            subprocess.run(["sleep", "0.02"])
        assert os.path.exists(seg), "the profiled process made no segment"
    finally:
        child.kill()  # SIGKILL: it cannot remove its own segment
        child.wait()
    assert os.path.exists(seg)
    proc = lema("prof", "top", "--once", check=False)
    assert f"pid {child.pid}" not in proc.stdout
    assert str(child.pid) not in proc.stderr
    assert not os.path.exists(seg), "top left a dead process's segment"


def test_a_process_with_lema_profile_alone_saves_its_own_profile(model, tmp_path):
    prof = tmp_path / "self.lprof"
    env = dict(os.environ, LEMA_PROFILE=str(prof))
    proc = subprocess.run([LEMA, "verify", model, "--budget", "4MiB", "--json"], env=env,
                          capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout)["stats"]
    report = json.loads(lema("prof", "report", prof, "--json").stdout)
    assert report["faults"] == stats["faults"] and report["hits"] == stats["hits"]
    assert not os.path.exists(f"/dev/shm/lema-prof-{report['pid']}")


# ---- an independent writer of the documented file format (lema/runtime/profile_file.hpp) ----

KINDS = {"fault": 0, "hit": 1, "prefetch_issued": 2, "prefetch_done": 3, "evict": 4, "stall": 5,
         "gpu_fault": 6, "migrate_to_device": 7, "migrate_to_host": 8}


def write_synthetic_profile(path, events: int, pages: int = 4096, budget_pages: int = 1024,
                            page_size: int = 2 << 20, seed: int = 1, version: int = 2,
                            gpu_faults_every: int = 0):
    """A training-like run: steps sweep the pages in order; a page not resident faults (and
    evicts the oldest resident one), a resident page hits; every 16th page is prefetched. With
    gpu_faults_every=N (unified memory), an access to a resident page that is a multiple of N
    is a GPU fault of the driver (two faults served together) instead of a hit. Version 1 is
    the format before unified-memory counters."""
    import random
    import struct
    import zlib

    import numpy as np

    rng = random.Random(seed)
    rec = np.zeros(events, dtype=[("time", "<u8"), ("dur", "<u8"), ("bytes", "<u8"),
                                  ("page", "<u4"), ("count", "<u4"), ("kind", "u1"),
                                  ("pad", "u1"), ("source", "<u2"), ("pad2", "<u4")])
    resident, order = set(), []
    t, n, p = 1_000_000, 0, 0
    faults = hits = evictions = prefetches = stall = gpu_faults = 0
    while n < events:
        page = p % pages
        p += 1
        if page in resident and gpu_faults_every and page % gpu_faults_every == 0:
            rec[n] = (t, 3_000, 2, page, 1, KINDS["gpu_fault"], 0, 0, 0)
            gpu_faults += 2
            n += 1
            t += 4_000
            continue
        if page in resident:
            rec[n] = (t, 0, 0, page, 1, KINDS["hit"], 0, 0, 0)
            hits += 1
            n += 1
            t += 2_000
            continue
        if len(resident) >= budget_pages and n < events:
            victim = order.pop(0)
            resident.discard(victim)
            rec[n] = (t, 500, page_size, victim, 1, KINDS["evict"], 0, 0, 0)
            evictions += 1
            n += 1
        if n >= events:
            break
        dur = rng.randint(100_000, 400_000)
        kind = "prefetch_done" if page % 16 == 0 else "fault"
        rec[n] = (t, dur, page_size, page, 1, KINDS[kind], 0, 0, 0)
        if kind == "fault":
            faults += 1
            stall += dur
        else:
            prefetches += 1
        resident.add(page)
        order.append(page)
        n += 1
        t += dur + 1_000
    body = bytearray()
    s = lambda v: struct.pack("<I", len(v)) + v.encode()
    body += struct.pack("<Qi", 4242, 0) + s("synthetic training run")
    body += struct.pack("<Q", 4242) + s("pager") + s("lru") + s("pread")
    if version >= 2:
        body += s("on" if gpu_faults_every else "")
    body += struct.pack("<6Q", page_size, budget_pages * page_size, budget_pages, pages,
                        1_000_000, t)
    body += struct.pack("<10Q", faults, hits, prefetches, 0, 0, (faults + prefetches) * page_size,
                        evictions, stall, budget_pages * page_size, budget_pages * page_size)
    if version >= 2:  # GPU faults, CPU faults, bytes migrated to the device, to the host
        body += struct.pack("<4Q", gpu_faults, 0, 0, 0)
    layers = 32
    per = pages // layers
    body += struct.pack("<I", layers)
    for layer in range(layers):
        body += struct.pack("<IIi", layer * per, per, layer)
        body += s(f"model.layers.{layer}.mlp.weight")
    body += rec.tobytes()
    header = b"LEMAPROF" + struct.pack("<IIQIIQQQQ", version, 64, len(body), zlib.crc32(body), 1,
                                       events, 0, 1_000_000, t)
    assert len(header) == 64
    with open(path, "wb") as f:
        f.write(header)
        f.write(body)
    return {"faults": faults, "hits": hits, "evictions": evictions, "events": events,
            "gpu_faults": gpu_faults}


def test_reads_a_file_written_from_the_documented_format(tmp_path):
    path = tmp_path / "synthetic.lprof"
    want = write_synthetic_profile(path, 20_000, pages=512, budget_pages=128)
    report = json.loads(lema("prof", "report", path, "--json").stdout)
    assert report["events"] == want["events"]
    assert report["faults"] == want["faults"] and report["hits"] == want["hits"]
    assert report["evictions"] == want["evictions"]
    assert report["layers"][0]["name"].startswith("layer ")
    assert report["gpu_faults"] == 0 and report["uvm_counters"] == ""


def test_unified_memory_counters_from_the_documented_format(tmp_path):
    path = tmp_path / "uvm.lprof"
    # The budget holds every page: after the first sweep, accesses hit or take a GPU fault.
    want = write_synthetic_profile(path, 20_000, pages=256, budget_pages=256, gpu_faults_every=5)
    assert want["gpu_faults"] > 0
    report = json.loads(lema("prof", "report", path, "--json", "--top", "1000").stdout)
    assert report["gpu_faults"] == want["gpu_faults"] and report["uvm_counters"] == "on"
    assert sum(row["gpu_faults"] for row in report["layers"]) == want["gpu_faults"]
    text = lema("prof", "report", path).stdout
    assert "GPU page faults" in text and "GPU faults" in text


def test_a_file_of_the_format_before_unified_memory_is_refused_as_older(tmp_path):
    path = tmp_path / "v1.lprof"
    write_synthetic_profile(path, 1_000, pages=64, budget_pages=16, version=1)
    proc = lema("prof", "report", path, check=False)
    assert proc.returncode == 1 and str(path) in proc.stderr and "older lema" in proc.stderr
    assert proc.stderr.count("\n") == 1


def forge(data: bytes, at: int, fmt: str, value: int) -> bytes:
    """`data` with the field at `at` replaced; a body field gets the checksum fixed, so only the
    forged count is wrong."""
    import struct
    import zlib

    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    if at >= 64:
        struct.pack_into("<I", out, 24, zlib.crc32(bytes(out[64:])))
    return bytes(out)


# Where the counts are in a write_synthetic_profile file (the format in profile_file.hpp).
COMMAND = 64 + 12
KIND = COMMAND + 4 + len("synthetic training run") + 8
PAGE_COUNT = KIND + 4 + len("pager") + 4 + len("lru") + 4 + len("pread") + 4 + 3 * 8
TENSORS = PAGE_COUNT + 8 + 2 * 8 + 14 * 8
NAME = TENSORS + 4 + 12


@pytest.mark.parametrize("field,at,fmt,value", [
    ("event count 4000000000 needs", 32, "<Q", 4_000_000_000),
    ("event count", 32, "<Q", 4_000 + (1 << 61)),  # 40 x this wraps to the events' real size
    ("source count 4000000000 needs", 28, "<I", 4_000_000_000),
    ("source count 10000000 needs", 28, "<I", 10_000_000),
    ("command length 4294967295 needs", COMMAND, "<I", 0xFFFFFFFF),
    ("source 0 kind length", KIND, "<I", 100_000_000),
    ("source 0 page count", PAGE_COUNT, "<Q", 1 << 40),
    ("source 0 tensor count 4294967295 needs", TENSORS, "<I", 0xFFFFFFFF),
    ("source 0 tensor 0 name length", NAME, "<I", 0x7FFFFFFF),
])
def test_a_forged_count_is_refused_by_name_in_bounded_memory(tmp_path, field, at, fmt, value):
    good = tmp_path / "good.lprof"
    write_synthetic_profile(good, 4_000, pages=512, budget_pages=128)
    data = good.read_bytes()
    assert data[KIND + 4:KIND + 9] == b"pager" and data[NAME + 4:NAME + 10] == b"model."
    bad = tmp_path / "forged.lprof"
    bad.write_bytes(forge(data, at, fmt, value))
    # 1 GiB of address space: a reader sized by the forged count would need far more.
    limited = f"ulimit -v {1 << 20} && exec \"$0\" prof report \"$1\""
    ok = subprocess.run(["sh", "-c", limited, LEMA, good], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    proc = subprocess.run(["sh", "-c", limited, LEMA, bad], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert str(bad) in proc.stderr and field in proc.stderr, proc.stderr
    assert "bad_alloc" not in proc.stderr and "corrupt" in proc.stderr


if __name__ == "__main__":
    # python tests/python/test_prof.py OUT.lprof EVENTS: a synthetic profile for benchmarks.
    import sys
    print(write_synthetic_profile(sys.argv[1], int(sys.argv[2])))
