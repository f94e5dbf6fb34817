"""Merges one device_bench run (its --only parts) into OUT_DIR's device_bench.json and .md.

    python3 merge_bench.py RUN_DIR OUT_DIR REHEARSAL(0|1)

The bandwidth and the Pager passes run as separate phases of run.sh, each with its own cut-off;
OUT_DIR keeps one JSON and one table for both (only eight files come back from the device).
"""
import json
import pathlib
import sys

NOTE = ("**CPU rehearsal against the fake CUDA driver: these are host memcpy/mmap costs, not GPU "
        "figures.**\n\n")


def main():
    run, out, rehearsal = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
    new = json.loads((run / "device_bench.json").read_text())
    merged_json = out / "device_bench.json"
    merged = json.loads(merged_json.read_text()) if merged_json.exists() else {}
    merged.update(new)
    if rehearsal:
        merged["rehearsal"] = "fake CUDA driver: not GPU figures"
    merged_json.write_text(json.dumps(merged, indent=2) + "\n")

    table = (run / "device_bench.md").read_text()
    merged_md = out / "device_bench.md"
    if merged_md.exists():  # the device line is there already
        table = merged_md.read_text() + table.split("\n", 1)[1]
    elif rehearsal:
        table = NOTE + table
    merged_md.write_text(table)
    print(f"merged {sorted(new)} into {merged_json}")


if __name__ == "__main__":
    main()
