"""The installed package: where its pieces are, peft's round trip, what the model keeps of
transformers (buffers, ties, names), torch.compile, and one clear exception per bad input."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from hf_models import VOCAB, import_installed_lema, make_model, quarter_budget

lema = import_installed_lema()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(make_model("llama", tmp_path_factory.mktemp("hf") / "llama"))


def plain(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path)


IDS = torch.tensor([[1, 40, 41, 42, 43, 7, 9]])


def test_the_installed_package_has_its_library_and_the_lema_command(llama):
    here = os.path.dirname(lema.__file__)
    assert os.path.isfile(os.path.join(here, "liblema_torch_ops.so"))
    assert "LEMA_TORCH_OPS" not in os.environ
    scripts = sysconfig.get_path("scripts")
    for command in ("lema", "lema-trainer"):
        assert os.access(os.path.join(scripts, command), os.X_OK), command
    proc = subprocess.run([sys.executable, "-m", "lema", "inspect", llama, "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "model.embed_tokens.weight" in proc.stdout


def refused_for_another_torch(proc):
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lema.TorchVersionError: "), proc.stderr
    assert "built against torch 2.0.1+cpu" in last and f"torch {torch.__version__}" in last
    assert "undefined symbol" not in proc.stderr


def test_a_library_built_for_another_torch_is_refused_in_one_line(tmp_path):
    # An installed package whose library was built for another torch: refused at import.
    shutil.copytree(os.path.dirname(lema.__file__), tmp_path / "lema")
    (tmp_path / "lema" / "lema_torch_ops.torch_version").write_text("2.0.1+cpu\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    refused_for_another_torch(subprocess.run([sys.executable, "-c", "import lema"], env=env,
                                             capture_output=True, text=True, cwd=tmp_path))
    # A library loaded by path: refused when loaded.
    (tmp_path / "lib").mkdir()
    shutil.copy(tmp_path / "lema" / "liblema_torch_ops.so", tmp_path / "lib")
    (tmp_path / "lib" / "lema_torch_ops.torch_version").write_text("2.0.1+cpu\n")
    code = f"import lema; lema.load_library({str(tmp_path / 'lib' / 'liblema_torch_ops.so')!r})"
    refused_for_another_torch(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                             text=True))


def test_buffers_names_and_ties_are_transformers_own(tmp_path, llama):
    ours = lema.from_pretrained(llama, budget="unlimited")
    ref = plain(llama)
    ours_buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert ours_buffers.keys() == ref_buffers.keys() and ours_buffers
    for name, b in ref_buffers.items():
        assert torch.equal(ours_buffers[name], b), name
    assert ours.name_or_path == llama and ours.config._name_or_path == llama
    tied = lema.from_pretrained(make_model("qwen2", tmp_path / "qwen2"), budget="unlimited")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.stats()["bytes_read"] == 0


def test_peft_adapters_save_load_and_merge_like_plain_weights(tmp_path, llama):
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(lema.from_pretrained(llama, budget=quarter_budget(llama)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == llama
    with torch.no_grad():
        on_plain = PeftModel.from_pretrained(plain(llama), tmp_path / "adapter")
        assert torch.equal(on_plain(IDS).logits, want)
        on_lema = PeftModel.from_pretrained(lema.from_pretrained(llama, budget="unlimited"),
                                            tmp_path / "adapter")
        assert torch.equal(on_lema(IDS).logits, want)
        merged = on_lema.merge_and_unload()
        reference = on_plain.merge_and_unload()
        assert torch.equal(merged(IDS).logits, reference(IDS).logits)


def test_torch_compile_on_cpu_gives_the_eager_logits(llama):
    ours = lema.from_pretrained(llama, budget=quarter_budget(llama))
    compiled = torch.compile(ours)
    with torch.no_grad():
        got = compiled(IDS).logits
        want = plain(llama)(IDS).logits
    # Inductor fuses and reorders float arithmetic: not bitwise, as for a plain model.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def one_line(error):
    text = str(error.value)
    assert "\n" not in text.strip() and text.startswith("lema: "), text
    return text


def test_a_path_that_is_not_a_checkpoint_is_refused(tmp_path, llama):
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(lema.errors.NotACheckpointError) as e:
            lema.from_pretrained(bad, budget="8MiB")
        assert str(bad) in one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(lema.errors.NotACheckpointError, match="no .safetensors"):
        lema.from_pretrained(tmp_path, budget="8MiB")


def copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_an_architecture_transformers_does_not_know_is_refused(tmp_path, llama):
    path = copy_with_config(llama, tmp_path / "m", model_type="nonesuch")
    with pytest.raises(lema.errors.UnknownArchitectureError) as e:
        lema.from_pretrained(path, budget="8MiB")
    assert "'nonesuch'" in one_line(e)


def test_remote_code_is_refused_unless_trusted(tmp_path, llama):
    path = copy_with_config(llama, tmp_path / "m", model_type="my_own",
                            auto_map={"AutoConfig": "my_code.MyConfig",
                                      "AutoModelForCausalLM": "my_code.MyModel"})
    with pytest.raises(lema.errors.RemoteCodeError) as e:
        lema.from_pretrained(path, budget="8MiB")
    assert "trust_remote_code=True" in one_line(e) and "my_code.MyModel" in str(e.value)


def test_a_budget_below_one_op_names_the_smallest_that_works(llama):
    import re
    with pytest.raises(lema.errors.BudgetTooSmallError) as e:
        lema.from_pretrained(llama, budget="1MiB")
    text = one_line(e)
    assert "budget='1MiB'" in text, text
    m = re.search(r"the smallest budget that works is budget='(\d+)MiB' \((\d+) bytes\)", text)
    assert m, text
    smallest = int(m.group(2))
    # That budget runs a training step; one page less is refused at load.
    model = lema.from_pretrained(llama, budget=smallest)
    model.model.embed_tokens.weight.requires_grad_(False)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.stats()["peak_resident_bytes"] <= smallest
    with pytest.raises(lema.errors.BudgetTooSmallError):
        lema.from_pretrained(llama, budget=smallest - (2 << 20))


def test_a_dtype_other_than_the_checkpoints_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM
    path = make_model("llama", tmp_path / "f32")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    with pytest.raises(lema.errors.DtypeError) as e:
        lema.from_pretrained(tmp_path / "bf16", budget="unlimited", dtype=torch.float32)
    assert "bfloat16" in one_line(e) and "float32" in str(e.value)
    for asked in ({}, {"dtype": "auto"}, {"torch_dtype": torch.bfloat16}):
        model = lema.from_pretrained(tmp_path / "bf16", budget="unlimited", **asked)
        assert model.dtype == torch.bfloat16 and model.stats()["bytes_read"] == 0
        with torch.no_grad():
            assert torch.equal(model(IDS).logits,
                               AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")(IDS).logits)


def test_a_paged_mixture_of_experts_saves_as_transformers_does(tmp_path):
    from transformers import AutoModelForCausalLM
    path = make_model("mixtral", tmp_path / "mixtral")
    ours = lema.from_pretrained(path, budget=quarter_budget(path))
    assert not any(k.startswith("lema_") or ".lema_" in k for k in ours.state_dict())
    ours.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open
    names = [set(safe_open(p / "model.safetensors", "pt").keys())
             for p in (path, tmp_path / "saved")]
    assert names[0] == names[1]
    with torch.no_grad():
        want = plain(path)(IDS).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(IDS).logits,
                           want)


def test_a_checkpoint_that_lacks_weights_of_its_class_is_refused(tmp_path, llama):
    path = copy_with_config(llama, tmp_path / "m", num_hidden_layers=7)
    with pytest.raises(lema.errors.NotACheckpointError) as e:
        lema.from_pretrained(path, budget="unlimited")
    assert "model.layers.6.mlp.down_proj.weight" in one_line(e)
