"""The README's quick start runs as written, on a tiny offline base instead of the hub model it names.

Each substitution below is the whole difference from the README's text; a quick start that no longer matches one
fails here, so the substitutions stay few and the README stays true.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from offline import save_base
from test_modeling import make_model
from test_tasks import ROWS

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_MODEL = '"Qwen/Qwen2.5-1.5B-Instruct"'
# (README text, what the test runs instead): the tiny base, a trigger the second stage can train, short rollouts
SUBSTITUTIONS = [
    (f"name = {HUB_MODEL}", "name = BASE"),
    ("MemGenConfig())  # weaver trains", 'MemGenConfig(trigger_mode="lora"))  # weaver trains'),
    ("max_new_tokens=512)", "max_new_tokens=8)"),
    ('TriggerConfig("runs/trigger", invoke_penalty=0.1)',
     'TriggerConfig("runs/trigger", invoke_penalty=0.1, max_new_tokens=8)'),
]


def quick_start_blocks() -> list[str]:
    """The Python code blocks of the README's "Quick start" section, in order."""
    text = README.read_text()
    section = text[text.index("\n## Quick start\n"):text.index("\n## API\n")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_quick_start_runs_as_written(tmp_path, monkeypatch):
    blocks = quick_start_blocks()
    assert len(blocks) == 3, "the quick start's code blocks changed: update this test with them"
    code = "\n".join(blocks)
    for old, new in SUBSTITUTIONS:
        assert code.count(old) == 1, f"the quick start no longer reads {old!r}: update SUBSTITUTIONS"
        code = code.replace(old, new)
    base = make_model("qwen2")
    save_base(base, tmp_path / "base")
    (tmp_path / "gsm8k_train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS["gsm8k"] * 2))
    monkeypatch.chdir(tmp_path)
    namespace = {"BASE": str(tmp_path / "base")}
    exec(compile(code, str(README), "exec"), namespace)
    # what the comments promise
    assert namespace["decisions"].tolist() == [1, -100, -100] and namespace["counts"].tolist() == [1, 0, 0]
    model = namespace["model"]
    assert model.config.reasoner_name_or_path == str(tmp_path / "base")
    for stage in ("sft", "grpo", "trigger"):
        assert (tmp_path / "runs" / stage).is_dir(), stage
    assert (tmp_path / "ckpt" / "memgen.safetensors").is_file()
    assert isinstance(namespace["out"].augmentation_mask, torch.Tensor)
