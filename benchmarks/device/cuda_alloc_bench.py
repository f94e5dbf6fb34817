#!/usr/bin/env python3
"""PyTorch with LEMA's pluggable allocator (liblema_cuda_alloc.so) against torch's own: time per
tensor allocation and free, cold (the backing allocator's cost: first round, or caching off) and
warm (a second round, which a caching layer serves from its cache); pinned host allocation
(cudaHostAlloc, what pause(keep_contents=True) pays per block); and pause/resume of a 1 GiB tag.
Each mode runs in its own process (torch's allocator can be replaced only before its first use).

    python3 benchmarks/device/cuda_alloc_bench.py --library build/allocator/pluggable/liblema_cuda_alloc.so \
        --out cuda_alloc.md

Prints the table; the last line is a one-line summary. Exit 1 when a LEMA mode failed.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_PARENT = os.path.abspath(os.path.join(HERE, "..", "..", "python"))
MiB = 1 << 20

CHILD = r"""
import json, os, sys, time
import torch
mode, sizes, reps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, os.environ["LEMA_PACKAGE_PARENT"])
pool = None
if mode.startswith("lema"):
    import lema.cuda_alloc as lca
    if mode == "lema":
        lca.install()
    else:
        pool = lca.mem_pool()
now = time.perf_counter_ns

def rounds(n):
    # Two rounds of `reps` tensors allocated, then freed: per tensor, allocate and free µs.
    out = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = now()
        ts = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(reps)]
        torch.cuda.synchronize()
        t1 = now()
        del ts
        torch.cuda.synchronize()
        t2 = now()
        out.append(((t1 - t0) / reps / 1e3, (t2 - t1) / reps / 1e3))
    return out

result = {"mode": mode, "sizes": {}}
if mode == "pinned":
    for n in sizes:
        times = []
        for _ in range(reps):
            torch._C._host_emptyCache()
            t0 = now()
            t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            times.append((now() - t0) / 1e3)
            del t
        times.sort()
        result["sizes"][str(n)] = {"alloc_us_cold": times[len(times) // 2]}
else:
    import contextlib
    def ctx():  # a fresh context each time: use_mem_pool is a one-shot generator
        return torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext()
    with ctx():
        for n in sizes:
            (ca, cf), (wa, wf) = rounds(n)
            result["sizes"][str(n)] = {"alloc_us_cold": ca, "free_us_cold": cf,
                                       "alloc_us_warm": wa, "free_us_warm": wf}
    if mode == "lema_pool":
        with ctx(), lca.tag("w"):
            w = torch.ones(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
        address = w.data_ptr()
        torch.cuda.synchronize()
        pr = {}
        for keep in (False, True):
            t0 = now(); lca.pause("w", keep_contents=keep); t1 = now()
            lca.resume("w"); t2 = now()
            pr["keep" if keep else "drop"] = ((t1 - t0) / 1e6, (t2 - t1) / 1e6)
        pr["same_address"] = w.data_ptr() == address
        pr["contents_kept"] = float(w.sum()) == float(1 << 28)
        result["pause_resume_1GiB_ms"] = pr
print("RESULT " + json.dumps(result))
"""


def run_mode(mode, sizes, reps, library, timeout):
    env = dict(os.environ, LEMA_PACKAGE_PARENT=PACKAGE_PARENT, LEMA_ALLOC_LIBRARY=library)
    if mode == "torch_nocache":
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(sizes), str(reps)],
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"timed out after {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"mode": mode, "error": f"exit {p.returncode}: {tail}"}


def table(results, sizes):
    names = {"torch": "torch caching allocator", "torch_nocache": "torch, caching off (cudaMalloc)",
             "lema": "LEMA, change_current_allocator", "lema_pool": "LEMA under a torch MemPool",
             "pinned": "pinned host, torch pin_memory (cudaHostAlloc)"}
    lines = ["| allocator | size | alloc µs cold | free µs cold | alloc µs warm | free µs warm |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {names[r['mode']]} | – | {r['error']} | | | |")
            continue
        for n in sizes:
            s = r["sizes"][str(n)]
            f = lambda k: f"{s[k]:.1f}" if k in s else "–"  # noqa: E731
            lines.append(f"| {names[r['mode']]} | {n // MiB} MiB | {f('alloc_us_cold')} | "
                         f"{f('free_us_cold')} | {f('alloc_us_warm')} | {f('free_us_warm')} |")
    for r in results:
        pr = r.get("pause_resume_1GiB_ms")
        if pr:
            lines.append("")
            lines.append(f"pause/resume of a 1 GiB tag: {pr['drop'][0]:.2f} / {pr['drop'][1]:.2f} ms; "
                         f"keeping contents {pr['keep'][0]:.2f} / {pr['keep'][1]:.2f} ms; same "
                         f"address {pr['same_address']}, contents kept {pr['contents_kept']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--library", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--timeout", type=int, default=120)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    sizes = [2 * MiB, 64 * MiB]
    results = [run_mode(m, sizes, args.reps, os.path.abspath(args.library), args.timeout)
               for m in ("torch", "torch_nocache", "lema", "lema_pool", "pinned")]
    md = f"# PyTorch's pluggable allocator ({torch.cuda.get_device_name(0)}, {args.reps} tensors a round)\n\n"
    md += table(results, sizes) + "\n"
    with open(args.out, "w") as f:
        f.write(md)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(md)
    failed = [r["mode"] for r in results if "error" in r and r["mode"].startswith("lema")]
    ok = [r for r in results if "error" not in r and r["mode"] == "lema"]
    if ok:
        s = ok[0]["sizes"][str(2 * MiB)]
        print(f"LEMA 2 MiB alloc {s['alloc_us_cold']:.1f} µs cold" + (f"; failed: {failed}" if failed else ""))
    else:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
