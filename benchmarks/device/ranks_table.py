"""The train_ranks phase's figures (run.sh, Note [Ranks phase]).

    python3 ranks_table.py RUNS_DIR BACKEND N...

Reads RUNS_DIR/ranks_N.jsonl for each rank count N (the first is 1), checks that every step of
each was logged with BACKEND and N ranks, writes RUNS_DIR/ranks.json, and prints one line: the
median tokens/s of the steps after the first (all ranks together) per count, the ratio to 1
rank, and 1 rank's against RUNS_DIR/train_resident.jsonl (the same run without a group) when
it exists. Exits 1, naming the file, when a run's steps are missing or say another backend.
"""
import json
import statistics
import sys
from pathlib import Path


def steps(path):
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_rate(records):
    after_first = records[1:] or records
    return statistics.median(r["tokens_per_s"] for r in after_first)


def main():
    runs, backend, counts = Path(sys.argv[1]), sys.argv[2], [int(n) for n in sys.argv[3:]]
    rates = {}
    for n in counts:
        path = runs / f"ranks_{n}.jsonl"
        records = steps(path)
        if not records:
            sys.exit(f"ranks_table.py: {path} holds no steps")
        seen = {(r.get("dist_backend"), r.get("world_size")) for r in records}
        if seen != {(backend, n)}:
            sys.exit(f"ranks_table.py: {path}: steps logged with (backend, ranks) "
                     f"{sorted(map(str, seen))}, expected ({backend}, {n})")
        rates[n] = median_rate(records)
    parts = []
    for n in counts:
        part = f"{n} rank{'s' if n > 1 else ''} {rates[n]:.0f} tokens/s"
        if n > 1:
            part += f" ({rates[n] / rates[1]:.2f}x of 1 rank)"
        parts.append(part)
    plain = steps(runs / "train_resident.jsonl")
    result = {"backend": backend, "tokens_per_s": {str(n): rates[n] for n in counts}}
    if plain and "dist_backend" not in plain[0]:  # run.sh --nproc 1: that run had no group
        result["plain_tokens_per_s"] = plain_rate = median_rate(plain)
        parts[0] += f" (no group: {plain_rate:.0f}, {rates[1] / plain_rate:.2f}x)"
    (runs / "ranks.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{backend}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
