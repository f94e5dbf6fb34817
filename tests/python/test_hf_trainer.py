"""transformers' Trainer and TRL's SFTTrainer over lema.from_pretrained under a quarter budget,
each against its plain twin: the same logged losses and adapter bytes. The Trainer runs with
gradient checkpointing, and lema.hf.LemaCallback adds the paging figures to its logs."""
import torch

from hf_models import (VOCAB, import_installed_lema, make_model, make_tokenizer, quarter_budget,
                       sentences)

lema = import_installed_lema()
STEPS = 4


def losses(state):
    return [(h["loss"], h["grad_norm"]) for h in state.log_history if "loss" in h]


def trainer_run(model, out, callbacks):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, VOCAB, (16,), generator=g) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             seed=0, save_strategy="no", disable_tqdm=True,
                             gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    model.save_pretrained(out / "adapter")
    return trainer.state


def test_a_trainer_run_equals_its_plain_twin_and_logs_paging(tmp_path):
    from transformers import AutoModelForCausalLM
    path = str(make_model("llama", tmp_path / "llama"))
    budget = quarter_budget(path)
    plain = trainer_run(AutoModelForCausalLM.from_pretrained(path), tmp_path / "plain", [])
    ours = trainer_run(lema.from_pretrained(path, budget=budget), tmp_path / "lema",
                       [lema.hf.LemaCallback()])
    assert losses(ours) == losses(plain) and len(losses(ours)) == STEPS
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "lema" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    logged = [h for h in ours.log_history if "loss" in h]
    for h in logged:
        for key in ("faults", "bytes_read", "stall_s", "resident_bytes", "budget_bytes",
                    "prefetches_issued", "prefetches_used", "prefetch_hit_rate"):
            assert f"lema/{key}" in h, (key, h)
        assert 0 < h["lema/resident_bytes"] <= h["lema/budget_bytes"] <= budget
    assert sum(h["lema/bytes_read"] for h in logged) > 0


def sft_run(model, path, out, callbacks):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_dict({"text": sentences(8)})
    args = SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                     save_strategy="no", disable_tqdm=True, max_length=32,
                     dataset_text_field="text")
    torch.manual_seed(0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8,
                                                target_modules=["q_proj", "v_proj"]),
                         callbacks=callbacks)
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    return trainer.state


def test_an_sft_trainer_run_equals_its_plain_twin(tmp_path):
    from transformers import AutoModelForCausalLM
    path = str(make_model("qwen2", tmp_path / "qwen2"))
    make_tokenizer(path)
    budget = quarter_budget(path)
    plain = sft_run(AutoModelForCausalLM.from_pretrained(path), path, tmp_path / "plain", [])
    ours = sft_run(lema.from_pretrained(path, budget=budget), path, tmp_path / "lema",
                   [lema.hf.LemaCallback()])
    assert losses(ours) == losses(plain) and len(losses(ours)) == STEPS
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "lema" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
