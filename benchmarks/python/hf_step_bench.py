"""Step time and peak memory of a transformers+peft LoRA step through lema.from_pretrained
against plain transformers, and the trace policy's prefetch hit rate on a Trainer run.

    python benchmarks/python/hf_step_bench.py [--out DIR] [--steps N] [--rounds R]

Makes a Llama checkpoint with `lema gen` (the installed command), then runs each case in a
process of its own (so its peak RSS is its own), the cases interleaved round by round so that
the ratios are taken over the same stretch of machine time:
  plain      AutoModelForCausalLM.from_pretrained, every weight in ordinary memory
  resident   lema.from_pretrained(budget="unlimited"): every page resident after the first step
  quarter    lema.from_pretrained(budget=a quarter of the weights), policy trace
each with 1 and 2 torch threads. Step time: the median over the steps after the warm-up ones.
Peak RSS: ru_maxrss of the case's process, with its parts: RSS after imports (the runtime),
after load, and the weights' and the budget's sizes.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts():
    """RssAnon, RssFile and RssShmem of this process now, in bytes."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "RssShmem"):
                parts[key] = int(line.split()[1]) * 1024
    return parts


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(path):
    import json as j
    import struct
    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = j.loads(f.read(n))
            total += sum(v["data_offsets"][1] - v["data_offsets"][0]
                         for k, v in header.items() if k != "__metadata__")
    return total


def run_case(args):
    import torch
    torch.set_num_threads(args.threads)
    import lema
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    after_imports = rss_bytes()
    budget = None
    if args.child == "plain":
        model = AutoModelForCausalLM.from_pretrained(args.model)
    elif args.child == "resident":
        model = lema.from_pretrained(args.model, budget="unlimited")
    else:
        budget = weight_bytes(args.model) // 4
        model = lema.from_pretrained(args.model, budget=budget, policy="trace")
    after_load = rss_bytes()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(1))
    model.train()
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    out = {"case": args.child, "threads": args.threads, "step_s": times[args.warmup:],
           "loss": loss.item(), "rss_after_imports": after_imports, "rss_after_load": after_load,
           "peak_rss": peak_rss_bytes(), "rss_parts": rss_parts(),
           "weights": weight_bytes(args.model), "budget": budget}
    if args.child != "plain":
        out["stats"] = lema.stats(model)
    print(json.dumps(out))


def run_interleaved(args):
    """The three cases in one process, one step of each in turn, so that each ratio is taken
    over the same moments of a shared machine."""
    import torch
    torch.set_num_threads(args.threads)
    import lema
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    budget = weight_bytes(args.model) // 4
    loaders = {"plain": lambda: AutoModelForCausalLM.from_pretrained(args.model),
               "resident": lambda: lema.from_pretrained(args.model, budget="unlimited"),
               "quarter": lambda: lema.from_pretrained(args.model, budget=budget,
                                                       policy="trace")}
    runs = {}
    for case, load in loaders.items():
        torch.manual_seed(0)
        model = get_peft_model(load(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[case] = (model, opt)
    ids = torch.randint(0, runs["plain"][0].config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(1))
    times = {case: [] for case in runs}
    for step in range(args.warmup + args.steps * args.rounds):
        for case, (model, opt) in runs.items():
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step >= args.warmup:
                times[case].append(time.perf_counter() - start)
    print(json.dumps({"threads": args.threads, "step_s": times,
                      "stats": lema.stats(runs["quarter"][0])}))


def run_trainer(args):
    import torch
    torch.set_num_threads(args.threads)
    import lema
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    budget = weight_bytes(args.model) // 4
    model = lema.from_pretrained(args.model, budget=budget, policy="trace")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, model.config.vocab_size, (args.seq_len,), generator=g)
            for _ in range(args.batch * args.trainer_steps)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    targs = TrainingArguments(output_dir=os.path.join(args.out, "trainer"),
                              max_steps=args.trainer_steps, per_device_train_batch_size=args.batch,
                              logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=data,
                      callbacks=[lema.hf.LemaCallback()])
    trainer.train()
    logs = [{k: v for k, v in h.items() if k.startswith("lema/") or k == "step"}
            for h in trainer.state.log_history if "lema/faults" in h]
    print(json.dumps({"case": "trainer", "threads": args.threads, "stats": lema.stats(model),
                      "logs": logs, "budget": budget, "weights": weight_bytes(args.model)}))


def child(case, threads, args):
    cmd = [sys.executable, __file__, "--child", case, "--threads", str(threads),
           "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--out", args.out,
           "--trainer-steps", str(args.trainer_steps), "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        sys.exit(f"{case} with {threads} threads failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n):
    return f"{n / 2**20:.0f} MiB"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="out/hf-bench")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--trainer-steps", type=int, default=8)
    p.add_argument("--model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child == "trainer":
        return run_trainer(args)
    if args.child == "interleaved":
        return run_interleaved(args)
    if args.child:
        return run_case(args)

    os.makedirs(args.out, exist_ok=True)
    if not args.model:
        args.model = os.path.join(args.out, "model")
        lema_command = os.path.join(sysconfig.get_path("scripts"), "lema")
        subprocess.run([lema_command, "gen", "--out", args.model, "--force", "--preset", "small",
                        "--hidden", "512", "--layers", "8", "--heads", "8", "--kv-heads", "4",
                        "--intermediate", "1408", "--vocab", "8192"], check=True,
                       capture_output=True)
    timing = {threads: child("interleaved", threads, args) for threads in (1, 2)}
    memory = {case: child(case, 1, args) for case in ("plain", "resident", "quarter")}
    trainer = child("trainer", 1, args)

    report = {"model": args.model, "weights": weight_bytes(args.model), "timing": timing,
              "memory": memory}
    print(f"weights {mib(report['weights'])}, seq {args.seq_len} x batch {args.batch}, "
          f"{args.steps * args.rounds} steps of each case, interleaved, after {args.warmup}")
    print(f"{'threads':>7} {'case':10} {'median s':>8} {'ratio':>6} {'ratio range':>12}")
    for threads, t in timing.items():
        plain = t["step_s"]["plain"]
        for case in ("plain", "resident", "quarter"):
            ratios = [a / b for a, b in zip(t["step_s"][case], plain)]
            print(f"{threads:7} {case:10} {statistics.median(t['step_s'][case]):8.3f} "
                  f"{statistics.median(ratios):6.3f} {min(ratios):5.2f}-{max(ratios):5.2f}")
    print(f"{'case':10} {'peak RSS':>9} {'imports':>8} {'anon':>8} {'file':>8} {'shmem':>8}")
    for case, r in memory.items():
        parts = r["rss_parts"]
        print(f"{case:10} {mib(r['peak_rss']):>9} {mib(r['rss_after_imports']):>8} "
              f"{mib(parts['RssAnon']):>8} {mib(parts['RssFile']):>8} "
              f"{mib(parts['RssShmem']):>8}")
    s = trainer["stats"]
    report["trainer"] = trainer
    print(f"Trainer, {args.trainer_steps} steps under {mib(trainer['budget'])} (trace): "
          f"prefetch hit rate {s['prefetch_hit_rate']:.3f} (prefetches used "
          f"{s['prefetches_used']}, faults {s['faults']}), hit rate {s['hit_rate']:.3f}; per "
          "log: " + ", ".join(f"{h['lema/prefetch_hit_rate']:.2f}" for h in trainer["logs"]))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
