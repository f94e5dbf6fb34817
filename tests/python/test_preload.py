"""The LD_PRELOAD hook (liblema_preload.so) in front of a Python process that reaches the CUDA
runtime through ctypes, as a framework does through its own bindings. The runtime is the fake
(tests/fakes/fake_cudart.cpp), loaded with RTLD_GLOBAL; calls are made through the process's
global scope, where the preloaded hook comes first."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELOAD = os.environ.get("LEMA_PRELOAD")
FAKE = os.environ.get("LEMA_FAKE_CUDART")
LEMA = os.environ.get("LEMA_BIN", "lema")
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not PRELOAD or not FAKE,
                                reason="LEMA_PRELOAD and LEMA_FAKE_CUDART name the libraries")

PRELUDE = textwrap.dedent("""
    import ctypes, os
    local = os.environ.get("FAKE_CUDART_LOCAL") == "1"
    fake = ctypes.CDLL(os.environ["LEMA_FAKE_CUDART"],
                       mode=ctypes.RTLD_LOCAL if local else ctypes.RTLD_GLOBAL)
    fake.fake_cudart_count.restype = ctypes.c_longlong
    fake.fake_cudart_is_managed.argtypes = [ctypes.c_void_p]
    rt = ctypes.CDLL(None)  # the global scope: the preloaded hook's cuda* first
    rt.cudaFree.argtypes = [ctypes.c_void_p]
    MiB = 1 << 20
    def malloc(size):
        p = ctypes.c_void_p()
        rc = rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(size))
        return rc, p.value
    def info():
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        assert rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0
        return free.value, total.value
    count = lambda name: fake.fake_cudart_count(name.encode())
""")


def run(body, preload=True, **env):
    full = dict(os.environ, LEMA_FAKE_CUDART=FAKE, FAKE_CUDART_TOTAL=str(1 << 30))
    full.update({k: str(v) for k, v in env.items()})
    full.pop("LD_PRELOAD", None)
    if preload:
        full["LD_PRELOAD"] = PRELOAD
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=full,
                          capture_output=True, text=True, timeout=120)


def hook_lines(proc):
    return [l for l in proc.stderr.splitlines() if l.startswith("lema preload: ")]


def test_large_allocations_are_managed_under_the_budget():
    proc = run("""
        rc, large = malloc(4 * MiB)
        assert rc == 0 and fake.fake_cudart_is_managed(large), "large: managed"
        rc, small = malloc(4096)
        assert rc == 0 and not fake.fake_cudart_is_managed(small), "small: passed through"
        assert info() == (60 * MiB, 64 * MiB), info()
        held = [malloc(24 * MiB) for _ in range(3)]
        assert [rc for rc, _ in held] == [0, 0, 2], "the third is over the budget"
        assert info() == (12 * MiB, 64 * MiB), info()
        for _, p in [(0, large), (0, small)] + held[:2]:
            assert rt.cudaFree(p) == 0
        assert count("live") == 0 and count("managed") == 3 and count("malloc") == 1
        print("ok")
    """, LEMA_BUDGET="64M")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok" and hook_lines(proc) == []


def test_without_the_hook_the_same_calls_reach_the_runtime():
    # The property above is the hook's: without it, the large allocation is not managed.
    proc = run("""
        rc, large = malloc(4 * MiB)
        print(fake.fake_cudart_is_managed(large), info()[1])
    """, preload=False, LEMA_BUDGET="64M")
    assert proc.stdout.split() == ["0", str(1 << 30)]


@pytest.mark.parametrize("name,value,says", [
    ("LEMA_PRELOAD_THRESHOLD", "1.5.2M", "LEMA_PRELOAD_THRESHOLD='1.5.2M' is not a size"),
    ("LEMA_BUDGET", "-5G", "LEMA_BUDGET='-5G' is not a size above zero"),
    ("LEMA_PRELOAD_ADVISE", "maybe", "LEMA_PRELOAD_ADVISE='maybe' is not 1 or 0"),
    ("LEMA_PRELOAD_TABLE", "8", "LEMA_PRELOAD_TABLE='8' is not a count of entries"),
])
def test_a_bad_setting_is_one_line_and_a_pass_through(name, value, says):
    env = {"LEMA_BUDGET": "64M", name: value}
    proc = run("""
        rc, large = malloc(4 * MiB)
        assert rc == 0 and not fake.fake_cudart_is_managed(large)
        assert info()[1] == 1 << 30
        assert rt.cudaFree(large) == 0
        print("ok")
    """, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = hook_lines(proc)
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "passes every call through" in lines[0]


def test_double_and_unknown_frees_are_one_line_each():
    proc = run("""
        rc, p = malloc(4 * MiB)
        assert rt.cudaFree(p) == 0
        assert rt.cudaFree(p) == 1            # the runtime's answer, passed on
        assert rt.cudaFree(0xdead0000) == 1
        print("ok")
    """, LEMA_BUDGET="64M")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = hook_lines(proc)
    assert len(lines) == 2, proc.stderr
    assert "double free of managed memory" in lines[0]
    assert "cudaFree(0xdead0000): not memory of this process" in lines[1]


def test_a_process_without_a_runtime_runs_unaffected():
    env = dict(os.environ, LD_PRELOAD=PRELOAD, LEMA_BUDGET="64M")
    proc = subprocess.run([sys.executable, "-c", "import json; print(json.dumps([1, 2]))"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[1, 2]" and proc.stderr == ""


def test_log_file_takes_the_lines(tmp_path):
    log = tmp_path / "hook.log"
    proc = run("""
        rc, p = malloc(4 * MiB)
        rt.cudaFree(p)
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_LOG="debug", LEMA_PRELOAD_LOG_FILE=log)
    assert proc.returncode == 0 and hook_lines(proc) == [], proc.stderr
    text = log.read_text()
    assert "loaded: mode managed, threshold 1 MiB, budget 64 MiB" in text
    assert "cudaMalloc(4 MiB) = 0" in text and "cudaFree(4 MiB) = 0" in text


def test_profile_summary_is_read_by_lema_prof(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run("""
        ptrs = [malloc(8 * MiB)[1] for _ in range(3)]
        assert malloc(64 * MiB)[0] == 2
        rc, small = malloc(4096)
        for p in ptrs[:2] + [small]:
            rt.cudaFree(p)
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof)
    assert proc.returncode == 0, proc.stderr
    report = subprocess.run([LEMA, "prof", "report", str(prof), "--json"], capture_output=True,
                            text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    r = json.loads(report.stdout)
    assert r["budget_bytes"] == 64 * MiB
    assert r["peak_resident_bytes"] == 24 * MiB
    assert r["policy"] == ("preload managed >= 1 MiB: 3 managed (24 MiB), 1 over budget, "
                           "1 passed through")
    text = subprocess.run([LEMA, "prof", "report", str(prof)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0 and "peak resident          24 MiB" in text.stdout, text.stdout


def test_a_forked_child_leaves_the_profile_to_its_parent(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run(f"""
        import sys
        rc, p = malloc(4 * MiB)
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit: the hook's destructor runs in the child too
        os.waitpid(pid, 0)
        assert not os.path.exists({str(prof)!r}), "the child wrote the parent's profile"
        print("ok")
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    assert prof.exists()


def test_a_runtime_in_a_local_scope_is_found(tmp_path):
    # A runtime dlopen'ed with RTLD_LOCAL (as Python loads extension modules and their
    # libraries): dlsym(RTLD_NEXT) from the hook cannot see it; the hook finds it by its name.
    local = tmp_path / "libcudart.so.13"
    local.write_bytes(open(FAKE, "rb").read())
    proc = run("""
        rc, large = malloc(4 * MiB)
        assert rc == 0 and fake.fake_cudart_is_managed(large), rc
        assert info() == (60 * MiB, 64 * MiB)
        assert rt.cudaFree(large) == 0 and count("live") == 0
        print("ok")
    """, LEMA_BUDGET="64M", LEMA_FAKE_CUDART=local, FAKE_CUDART_LOCAL=1)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    assert hook_lines(proc) == []


def test_preload_library_names_the_built_hook():
    python_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
    code = "import lema; print(lema.preload_library())"
    env = dict(os.environ, PYTHONPATH=python_dir)
    env.pop("LEMA_PRELOAD_LIBRARY", None)
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    assert os.path.samefile(found.stdout.strip(), PRELOAD)
    env["LEMA_PRELOAD_LIBRARY"] = "/nonexistent/liblema_preload.so"
    # The override is tried first; the build tree's library is still found after it.
    again = subprocess.run([sys.executable, "-c", "import lema; print(lema.preload_library())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and os.path.samefile(again.stdout.strip(), PRELOAD)


def report_json(prof):
    report = subprocess.run([LEMA, "prof", "report", str(prof), "--json"], capture_output=True,
                            text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    return json.loads(report.stdout)


def rows(preload):
    """(call, route) → (count, bytes, largest, failed)."""
    return {(r["call"], r["route"]): (r["count"], r["bytes"], r["largest"], r["failed"])
            for r in preload["calls"]}


EVENTS_BODY = """
    rc, large = malloc(4 * MiB)              # managed
    rc, small = malloc(4096)                 # passed through
    a_large, a_small = ctypes.c_void_p(), ctypes.c_void_p()
    assert rt.cudaMallocAsync(ctypes.byref(a_large), ctypes.c_size_t(2 * MiB), None) == 0
    assert rt.cudaMallocAsync(ctypes.byref(a_small), ctypes.c_size_t(1024), None) == 0
    own = ctypes.c_void_p()
    assert rt.cudaMallocManaged(ctypes.byref(own), ctypes.c_size_t(8 * MiB), 1) == 0
    info()
    assert malloc(64 * MiB)[0] == 2          # refused: over the budget
    for p in (large, small, own.value):
        assert rt.cudaFree(ctypes.c_void_p(p)) == 0
    assert rt.cudaFreeAsync(a_large, None) == 0
    assert rt.cudaFreeAsync(a_small, None) == 0
    print("ok")
"""


def test_each_call_is_an_event_with_its_route(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run(EVENTS_BODY, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    p = report_json(prof)["preload"]
    assert p["recorded"] == 12 and p["dropped"] == 0 and p["complete"]
    assert rows(p) == {
        ("cudaMalloc", "managed"): (1, 4 * MiB, 4 * MiB, 0),
        ("cudaMalloc", "passthrough"): (1, 4096, 4096, 0),
        ("cudaMalloc", "refused"): (1, 64 * MiB, 64 * MiB, 1),
        ("cudaMallocAsync", "managed"): (1, 2 * MiB, 2 * MiB, 0),
        ("cudaMallocAsync", "passthrough"): (1, 1024, 1024, 0),
        ("cudaMallocManaged", "managed"): (1, 8 * MiB, 8 * MiB, 0),
        ("cudaMemGetInfo", "budget"): (1, 0, 0, 0),
        # frees carry the bytes of the allocation they release
        ("cudaFree", "managed"): (2, 12 * MiB, 8 * MiB, 0),
        ("cudaFree", "passthrough"): (1, 4096, 4096, 0),
        ("cudaFreeAsync", "managed"): (1, 2 * MiB, 2 * MiB, 0),
        ("cudaFreeAsync", "passthrough"): (1, 1024, 1024, 0),
    }
    assert p["peak_outstanding_bytes"] == 14 * MiB + 4096 + 1024
    assert p["outstanding_at_exit_bytes"] == 0
    assert max(pt["bytes"] for pt in p["timeline"]) == p["peak_outstanding_bytes"]
    assert p["refused_count"] == 1 and p["refused"][0]["bytes"] == 64 * MiB
    assert p["refused"][0]["result"] == 2 and p["bad_free_count"] == 0 and p["threads"] == 1
    both = subprocess.run([LEMA, "prof", "report", str(prof), str(prof), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert both.returncode == 0, both.stderr
    assert [r["preload"] for r in json.loads(both.stdout)] == [p, p]  # one per rank's file
    text = subprocess.run([LEMA, "prof", "report", str(prof)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0, text.stderr
    assert "LD_PRELOAD hook: 12 calls recorded on 1 thread" in text.stdout, text.stdout
    assert "cudaMalloc(64 MiB) refused (error 2): over the budget" in text.stdout, text.stdout


def test_passed_through_calls_are_events_too(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run(EVENTS_BODY.replace("assert malloc(64 * MiB)[0] == 2", "malloc(1)[0]"),
               LEMA_PRELOAD_MODE="passthrough", LEMA_PRELOAD_PROFILE=prof)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    r = rows(report_json(prof)["preload"])
    assert set(route for _, route in r) == {"passthrough"}
    assert sum(v[0] for v in r.values()) == 12
    assert r[("cudaMalloc", "passthrough")][:3] == (3, 4 * MiB + 4096 + 1, 4 * MiB)


def test_bad_and_double_frees_are_listed(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run("""
        rc, p = malloc(4 * MiB)
        assert rt.cudaFree(p) == 0
        assert rt.cudaFree(p) == 1
        assert rt.cudaFree(0xdead0000) == 1
        rc, q = malloc(4096)                 # passed through: the runtime's own memory
        assert rt.cudaFree(q) == 0 and rt.cudaFree(q) == 1
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    p = report_json(prof)["preload"]
    bad = [(b["call"], b["address"], b["what"], b["result"]) for b in p["bad_frees"]]
    assert p["bad_free_count"] == 3
    assert bad[0][2] == "double free" and bad[0][3] == 1
    assert bad[1][1:3] == (0xdead0000, "not memory given out (or freed twice)")
    assert bad[2][2] == "double free"  # the hook passed it through; the events show it
    assert rows(p)[("cudaFree", "passthrough")][3] == 3  # failed


def test_a_full_ring_counts_what_it_dropped(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run("""
        for _ in range(10):
            rc, p = malloc(4 * MiB)
            rt.cudaFree(p)
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof, LEMA_PRELOAD_EVENTS=6)
    assert proc.returncode == 0 and hook_lines(proc) == [], proc.stderr
    p = report_json(prof)["preload"]
    assert (p["recorded"], p["dropped"], p["capacity"]) == (6, 14, 6)
    assert not p["complete"]
    assert rows(p) == {("cudaMalloc", "managed"): (3, 12 * MiB, 4 * MiB, 0),
                                    ("cudaFree", "managed"): (3, 12 * MiB, 4 * MiB, 0)}


def test_a_malformed_event_count_is_one_line_and_the_program_runs(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run("""
        rc, p = malloc(4 * MiB)
        assert rc == 0 and not fake.fake_cudart_is_managed(p)
        assert rt.cudaFree(p) == 0
        print("ok")
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof, LEMA_PRELOAD_EVENTS="lots")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
    lines = hook_lines(proc)
    assert len(lines) == 1 and "LEMA_PRELOAD_EVENTS='lots' is not a count" in lines[0], lines
    p = report_json(prof)["preload"]  # the default ring still records the calls
    assert p["recorded"] == 2 and p["capacity"] == 1 << 20


def test_without_events_the_summary_file_is_as_before(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run("""
        rc, p = malloc(4 * MiB)
        rt.cudaFree(p)
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof, LEMA_PRELOAD_EVENTS=0)
    assert proc.returncode == 0, proc.stderr
    data = prof.read_bytes()
    body = int.from_bytes(data[16:24], "little")
    assert len(data) == 64 + body  # nothing after the body: the summary-only file
    r = report_json(prof)
    assert "preload" not in r and r["peak_resident_bytes"] == 4 * MiB


def test_calls_from_threads_are_each_recorded_once(tmp_path):
    prof = tmp_path / "hook.lprof"
    proc = run("""
        import threading
        def work():
            for _ in range(500):
                rc, p = malloc(2 * MiB)
                assert rc == 0 and rt.cudaFree(p) == 0
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
    """, LEMA_BUDGET="64M", LEMA_PRELOAD_PROFILE=prof)
    assert proc.returncode == 0, proc.stderr
    p = report_json(prof)["preload"]
    assert (p["recorded"], p["dropped"], p["threads"]) == (4000, 0, 4)
    assert rows(p) == {("cudaMalloc", "managed"): (2000, 4000 * MiB, 2 * MiB, 0),
                       ("cudaFree", "managed"): (2000, 4000 * MiB, 2 * MiB, 0)}
    assert p["outstanding_at_exit_bytes"] == 0 and p["peak_outstanding_bytes"] <= 8 * MiB
