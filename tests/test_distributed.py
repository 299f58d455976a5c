"""Several processes: weaver SFT and GRPO under `torchrun --nproc_per_node 2` (CPU, gloo) end with the same
trained tensors on both ranks (DDP averaged their gradients; GRPO's rollouts differ per rank), and the engine
keeps the ranks of a sharded (FSDP) model in step."""

from __future__ import annotations

import json
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


def _torchrun(worker: str, *args) -> None:
    """Run tests/<worker> on two CPU processes; a hang (ranks out of step) fails by the timeout."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           str(here / worker), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_two_processes_end_with_identical_trainable_weights(tmp_path, stage):
    _torchrun("ddp_worker.py", stage, tmp_path)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    initial = make_model("qwen2", k_prompt=4, k_inference=2).stage_parameters("weaver")
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(not torch.equal(ranks[0][k], initial[k].detach()) for k in ranks[0])  # and they did train


def test_sharded_model_keeps_ranks_in_step(tmp_path):
    """FSDP (`fully_shard`, two ranks): each rank decodes rows that weave and finish at other steps than the
    other rank's (the engine's trigger modes, and GRPO's rollouts). Decoding alone, the ranks would make
    different numbers of decoder calls (and, sharded, deadlock); synced, they make the same number, and every
    rank's output equals its unsharded one. Ranks passing different settings are refused."""
    _torchrun("fsdp_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mismatch_refused"] and ranks[1]["mismatch_refused"]
    for run0, run1 in zip(ranks[0]["runs"], ranks[1]["runs"]):
        assert run0["equal"] and run1["equal"], (run0, run1)
        assert run0["synced_calls"] == run1["synced_calls"], (run0, run1)
        assert run0["alone_calls"] != run1["alone_calls"], (run0, run1)  # the ranks did diverge
        if "memory': False" not in run0["run"]:
            assert run0["weaves"] > 0 and run1["weaves"] > 0, (run0, run1)
