"""Writes OUT_DIR's device_bench.json and .md from the device_bench runs kept in RUNS_DIR.

    python3 merge_bench.py RUNS_DIR OUT_DIR REHEARSAL(0|1)

The bandwidth (RUNS_DIR/bench_h2d_vmm) and the Pager passes (RUNS_DIR/bench_pager) run as
separate phases of run.sh, each with its own cut-off, possibly in separate calls (--resume);
OUT_DIR gets one JSON and one table for both (only eight files come back from the device).
"""
import json
import pathlib
import sys

PARTS = ["bench_h2d_vmm", "bench_pager"]
NOTE = ("**CPU rehearsal against the fake CUDA driver: these are host memcpy/mmap costs, not GPU "
        "figures.**\n\n")


def main():
    runs, out, rehearsal = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
    merged, tables = {}, []
    for part in PARTS:
        run = runs / part
        if not (run / "device_bench.json").exists():
            continue
        merged.update(json.loads((run / "device_bench.json").read_text()))
        table = (run / "device_bench.md").read_text()
        tables.append(table if not tables else table.split("\n", 1)[1])  # one device line
    if not tables:
        sys.exit(f"merge_bench: no device_bench run in {runs}")
    if rehearsal:
        merged["rehearsal"] = "fake CUDA driver: not GPU figures"
        tables.insert(0, NOTE)
    (out / "device_bench.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "device_bench.md").write_text("".join(tables))
    print(f"device_bench.json: {', '.join(k for k in ('h2d', 'vmm', 'vmm_run', 'pager') if k in merged)}")


if __name__ == "__main__":
    main()
