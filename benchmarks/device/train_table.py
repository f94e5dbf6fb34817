"""The LoRA step-time table of the device run, from the runs' --log-json files.

    python3 train_table.py RUNS_DIR [--bench device_bench.json] [--json train_steps.json] > train_steps.md

RUNS_DIR holds the runs' train_NAME.jsonl files; --bench defaults to RUNS_DIR/device_bench.json;
--json also writes each run's figures (null for a run without a result).

Each row: the median step time after the first (warm-up) step, its ratio to the resident run of
the same step size, and for paged runs the PCIe floor: the pages filled per step times the page
size over the pinned H2D bandwidth that device_bench measured (its cudaMemcpyAsync baseline).
A step cannot be shorter than max(resident step, floor); "x bound" is the ratio to that.
"""
import argparse
import json
import pathlib
import statistics
import sys

ROWS = [  # name, resident run it is compared with, what it is
    ("resident", "resident", "16k tokens/step, every weight resident (vmm)"),
    ("half", "resident", "half the weights, vmm"),
    ("half_cached", "resident", "half, vmm + host cache"),
    ("half_managed", "resident", "half, managed (LEMA prefetches)"),
    ("unified", "resident", "plain unified memory, oversubscribed"),
    ("resident_small", "resident_small", "512 tokens/step, resident"),
    ("half_small", "resident_small", "512 tokens/step, half, vmm + host cache"),
]


def load(out, name):
    f = out / f"train_{name}.jsonl"
    if not f.exists():
        return None
    steps = []
    for line in f.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except ValueError:  # the last line of a run cut off while writing it
            pass
    later = steps[1:] or steps  # the first step warms up
    if not later:
        return None
    return {
        "step_s": statistics.median(s["step_time_s"] for s in later),
        "tokens": later[-1]["tokens"],
        "fills": statistics.median(
            s.get("step_faults", 0) + s.get("step_prefetches", 0) for s in later),
        "page_size": later[-1].get("page_size", 0),
        "read": sum(s.get("step_bytes_read", 0) for s in later) / len(later),
        "peak": later[-1].get("peak_resident_bytes", 0),
        # Unified memory only (CUPTI): GPU page faults and what the driver moved, per step.
        "gpu_faults": statistics.median(s.get("step_gpu_faults", 0) for s in later),
        "migrated": statistics.median(s.get("step_migrated_to_device_bytes", 0) for s in later),
        "uvm": later[-1].get("uvm_counters", ""),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs_dir")
    ap.add_argument("--bench", help="device_bench.json (default: RUNS_DIR/device_bench.json)")
    ap.add_argument("--json", help="also write the figures of each run here")
    args = ap.parse_args()
    out = pathlib.Path(args.runs_dir)
    gbps = None
    bench = pathlib.Path(args.bench) if args.bench else out / "device_bench.json"
    if bench.exists():
        h2d = json.loads(bench.read_text()).get("h2d", [])
        if h2d:
            gbps = max(h["baseline_gbps"] for h in h2d)
    runs = {name: load(out, name) for name, _, _ in ROWS}
    print(f"H2D baseline for the floor: {gbps:.1f} GB/s\n" if gbps else
          "No H2D baseline (device_bench.json): no floor.\n")
    print("| run | what | median step s | x resident | fills/step | PCIe floor s | x bound "
          "| tokens/s | read GiB/step | peak resident GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, base_name, what in ROWS:
        r, base = runs[name], runs[base_name]
        if r is None:
            print(f"| {name} | {what} | no result (see the summary) | | | | | | | |")
            continue
        ratio = f"{r['step_s'] / base['step_s']:.3f}" if base else ""
        floor = r["fills"] * r["page_size"] / (gbps * 1e9) if gbps else None
        bound = max(floor or 0, base["step_s"] if base else 0)
        floor_text = "" if floor is None else f"{floor:.3f}"
        bound_text = f"{r['step_s'] / bound:.3f}" if bound else ""
        print(f"| {name} | {what} | {r['step_s']:.3f} | {ratio} | {r['fills']:.0f} | "
              f"{floor_text} | {bound_text} | {r['tokens'] / r['step_s']:.0f} | "
              f"{r['read'] / 2**30:.2f} | {r['peak'] / 2**30:.2f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"h2d_baseline_gbps": gbps, "runs": runs}, indent=2) + "\n")
    uvm = [(name, r) for name, r in runs.items() if r and r["uvm"]]
    if uvm:
        print("\n| run | UVM counters | GPU faults/step | migrated to device GiB/step |")
        print("|---|---|---|---|")
        for name, r in uvm:
            print(f"| {name} | {r['uvm']} | {r['gpu_faults']:.0f} | {r['migrated'] / 2**30:.2f} |")
    if runs["half"] and runs["unified"]:
        print(f"\nvmm at half the weights is {runs['unified']['step_s'] / runs['half']['step_s']:.2f}x "
              "faster than plain unified memory on the same device memory.")


if __name__ == "__main__":
    main()
