"""Step time of `lema train` with every CPU tensor in VmmResource memory (--budget-covers all)
against torch's own allocator (--budget-covers weights), under no memory pressure.

    python benchmarks/python/budget_covers_bench.py --lema build/tools/lema [--rounds 5]
        [--steps 6] [--seq-len 128] [--batch 4] [--threads 2] [--json FILE]

Makes the 'small' model with `lema gen`, then runs the two cases as processes of their own,
interleaved round by round so each ratio is taken over the same stretch of machine time. Both
run in fault mode with an unlimited budget (every weight page resident after its first touch;
with --budget-covers all the budget also holds every anonymous page, so nothing is evicted or
spilled): what is left is the allocator's own cost, first-touch faults of new pages included.
Step time per run: the median of the steps after the first (warm-up); the ratio per round is
covers-all / weights; the figure is the median of the rounds' ratios.
"""
import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

CORPUS = "\n".join(
    f"the {a} {b} sat on the {c} mat, and the {b} {a} ran to the {c} door."
    for a in ["red", "small", "old", "quick"] for b in ["cat", "dog", "fox"]
    for c in ["green", "blue"]) + "\n"


def run(lema, model, corpus, out, args, covers):
    log = Path(out).with_suffix(".jsonl")
    subprocess.run([lema, "train", "--model", model, "--data", corpus, "--out", out,
                    "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                    "--batch", str(args.batch), "--threads", str(args.threads),
                    "--seed", "5", "--budget", "unlimited", "--mode", "fault",
                    "--budget-covers", covers, "--log-json", log],
                   check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[1:]), [r["loss"] for r in rows], rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lema", default="lema")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        subprocess.run([args.lema, "gen", "--out", model, "--preset", "small", "--seed", "3"],
                       check=True, capture_output=True)
        corpus = tmp / "corpus.txt"
        corpus.write_text(CORPUS)
        plain, covered, ratios = [], [], []
        for r in range(args.rounds):
            w, wl, _ = run(args.lema, model, corpus, tmp / f"w{r}", args, "weights")
            a, al, rows = run(args.lema, model, corpus, tmp / f"a{r}", args, "all")
            assert wl == al, "the losses differ"
            assert rows[-1].get("spilled_bytes", 0) == 0, "pressure: pages were spilled"
            plain.append(w)
            covered.append(a)
            ratios.append(a / w)
            print(f"round {r}: weights {w * 1e3:.1f} ms, all {a * 1e3:.1f} ms, ratio {a / w:.3f}",
                  flush=True)
    result = {"weights_step_s": statistics.median(plain), "all_step_s": statistics.median(covered),
              "ratio": statistics.median(ratios), "ratios": ratios, "args": vars(args)}
    print(f"median step: weights {result['weights_step_s'] * 1e3:.1f} ms, all "
          f"{result['all_step_s'] * 1e3:.1f} ms; median ratio {result['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
