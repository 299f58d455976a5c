"""Several processes: weaver SFT and GRPO under `torchrun --nproc_per_node 2` (CPU, gloo) end with the same
trained tensors on both ranks (DDP averaged their gradients; GRPO's rollouts differ per rank)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_modeling import make_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_two_processes_end_with_identical_trainable_weights(tmp_path, stage):
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           str(here / "ddp_worker.py"), stage, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    initial = make_model("qwen2", k_prompt=4, k_inference=2).stage_parameters("weaver")
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(not torch.equal(ranks[0][k], initial[k].detach()) for k in ranks[0])  # and they did train
