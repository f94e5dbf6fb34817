"""The Python route over several ranks: `torchrun --nproc_per_node 2` (torch.distributed.run)
with lema.from_pretrained under a quarter budget in each rank and transformers' Trainer (DDP,
Gloo on the CPU) takes the steps of one process with twice the batch: the same logged losses and
adapter, up to float rounding.

Four rows make the whole data set, so every step of either run sees all four whichever way the
samplers (RandomSampler in one process, DistributedSampler in two) order them."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from hf_models import import_installed_lema, make_model, quarter_budget

lema = import_installed_lema()

SCRIPT = r'''
import json, os, sys, torch
import lema
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
path, budget, out, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
model = get_peft_model(lema.from_pretrained(path, budget=budget),
                       LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
g = torch.Generator().manual_seed(1)
rows = [torch.randint(0, 2048, (16,), generator=g) for _ in range(4)]
data = [{"input_ids": r, "labels": r} for r in rows]
args = TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=batch,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                         save_strategy="no", disable_tqdm=True,
                         ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[lema.hf.LemaCallback()])
trainer.train()
if trainer.is_world_process_zero():
    model.save_pretrained(out + "/adapter")
    with open(out + "/losses.json", "w") as f:
        json.dump([h["loss"] for h in trainer.state.log_history if "loss" in h], f)
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, out):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (json.loads((out / "losses.json").read_text()),
            load_file(out / "adapter" / "adapter_model.safetensors"))


def test_torchrun_with_two_ranks_equals_one_process_with_twice_the_batch(tmp_path):
    path = str(make_model("llama", tmp_path / "llama"))
    budget = str(quarter_budget(path))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    one = run([sys.executable, str(script), path, budget, str(tmp_path / "one"), "4"],
              tmp_path / "one")
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(script), path, budget,
               str(tmp_path / "two"), "2"], tmp_path / "two")
    assert len(two[0]) == 3
    np.testing.assert_allclose(two[0], one[0], rtol=1e-4)
    assert one[1].keys() == two[1].keys()
    # AdamW divides by the root of the squared gradients, so where a gradient is near zero the
    # rounding of a different summation order moves an element by up to a fraction of one step
    # (lr 1e-2): compare to 1e-3.
    for name in one[1]:
        np.testing.assert_allclose(two[1][name], one[1][name], rtol=1e-3, atol=1e-3,
                                   err_msg=name)
