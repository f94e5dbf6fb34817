"""The README's "In Python" example, exactly as printed: its shell lines (but the install, done
already) with the installed `lema` command, then its Python block. The adapter it saves, loaded
by peft on the plain weights, gives the logits of the model it trained."""
import os
import re
import subprocess
import sysconfig
from pathlib import Path

import torch

from hf_models import import_installed_lema

lema = import_installed_lema()
README = Path(__file__).resolve().parents[2] / "README.md"


def example():
    text = README.read_text()
    section = text.split("## In Python\n", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in shell.splitlines()]
    return [c for c in commands if c and not c.startswith("pip ")], python


def test_the_readme_python_example_trains_and_saves_an_adapter_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    commands, code = example()
    assert commands and all(c.startswith("lema ") for c in commands), commands
    scripts = sysconfig.get_path("scripts")
    for command in commands:
        argv = command.split()
        subprocess.run([os.path.join(scripts, argv[0]), *argv[1:]], cwd=tmp_path, check=True,
                       capture_output=True)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {"__name__": "__main__"}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(here)
    trained = namespace["model"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert lema.stats(trained)["peak_resident_bytes"] <= 8 << 20
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)
