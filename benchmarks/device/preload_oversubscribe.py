"""A PyTorch workload larger than the device memory left to it, run under the LD_PRELOAD hook
(liblema_preload.so) two ways, step time against step time:

  hook:  large allocations (>= 32 MiB: PyTorch's caching allocator's big segments) in managed
         memory advised to prefer the device; the small pool's segments stay device memory;
  uvm:   every allocation plain cudaMallocManaged, no advice (LEMA_PRELOAD_THRESHOLD=0,
         LEMA_PRELOAD_ADVISE=0): plain unified-memory oversubscription.

The device is first filled, outside PyTorch and outside the hook (cuMemAlloc of the driver API),
down to --free GiB, so the workload (--factor times that) oversubscribes it without needing host
memory of the device's size. The workload: a chain of square bf16 matmuls through --layers
weights, forward only, timed per step (median of --steps after one warm-up step).

    preload_oversubscribe.py --preload build/allocator/preload/liblema_preload.so --out DIR

Writes DIR/preload.json and prints a markdown table. Exits 0 with "skipped: ..." when there is no
usable GPU."""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

GiB = 1 << 30


def child(args):
    import torch
    if args.ballast_gib > 0:  # the driver API: neither PyTorch nor the hook sees it
        cuda = ctypes.CDLL("libcuda.so.1")
        torch.empty(1, device="cuda")  # the primary context, made current by PyTorch
        ptr = ctypes.c_uint64()
        rc = cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(args.ballast_gib * GiB)))
        if rc != 0:
            print(json.dumps({"error": f"cuMemAlloc of the ballast failed ({rc})"}))
            return 1
    width = args.width
    layer_bytes = width * width * 2
    layers = max(1, int(args.workload_gib * GiB // layer_bytes))
    torch.manual_seed(0)
    weights = [torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width ** 0.5
               for _ in range(layers)]
    x = torch.randn(args.batch, width, device="cuda", dtype=torch.bfloat16)
    times = []
    with torch.no_grad():
        for step in range(args.steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = x
            for w in weights:
                y = torch.relu(y @ w)
            torch.cuda.synchronize()
            if step > 0:
                times.append(time.perf_counter() - t0)
    print(json.dumps({"layers": layers, "workload_bytes": layers * layer_bytes,
                      "step_s": statistics.median(times), "steps_s": times,
                      "finite": bool(torch.isfinite(y).all())}))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preload", help="liblema_preload.so")
    p.add_argument("--out", default=".")
    p.add_argument("--free", type=float, default=8.0, help="GiB of device memory left free")
    p.add_argument("--factor", type=float, default=1.5, help="workload / free memory")
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=150, help="seconds per run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ballast-gib", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workload-gib", type=float, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available() and "
         "torch.cuda.mem_get_info()[1] or 0)"], capture_output=True, text=True)
    total = int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0
    if total == 0:
        print("skipped: no usable GPU (torch.cuda.is_available() is false)")
        return 0
    if not args.preload or not os.path.isfile(args.preload):
        print(f"preload library '{args.preload}' not found: build lema_preload")
        return 1
    # What the context, cuBLAS and the caching allocator's small pool take besides the ballast.
    ballast = max(0.0, total / GiB - args.free - 1.5)
    workload = args.free * args.factor
    runs = {
        "hook": {"LEMA_PRELOAD_THRESHOLD": "32M", "LEMA_PRELOAD_ADVISE": "1"},
        "uvm": {"LEMA_PRELOAD_THRESHOLD": "0", "LEMA_PRELOAD_ADVISE": "0"},
    }
    results = {"device_total_bytes": total, "ballast_gib": ballast, "workload_gib": workload}
    for name, extra in runs.items():
        env = dict(os.environ, LD_PRELOAD=args.preload, LEMA_PRELOAD_LOG="info", **extra)
        env.pop("LEMA_BUDGET", None)
        cmd = [sys.executable, __file__, "--child", "--ballast-gib", str(ballast),
               "--workload-gib", str(workload), "--width", str(args.width), "--batch",
               str(args.batch), "--steps", str(args.steps)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            results[name] = json.loads(lines[-1]) if lines else {
                "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            results[name]["hook_lines"] = [l for l in proc.stderr.splitlines()
                                           if l.startswith("lema preload: ")][-3:]
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {args.timeout} s"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "preload.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"workload {workload:.1f} GiB against {args.free:.1f} GiB left free "
          f"(device {total / GiB:.1f} GiB)\n")
    print("| run | step (s) | vs uvm |\n|---|---|---|")
    base = results["uvm"].get("step_s")
    for name in runs:
        r = results[name]
        if "step_s" in r:
            ratio = f"{base / r['step_s']:.2f}x faster" if base else "-"
            print(f"| {name} | {r['step_s']:.3f} | {ratio} |")
        else:
            print(f"| {name} | {r['error']} | - |")
    return 0 if all("step_s" in results[n] for n in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
