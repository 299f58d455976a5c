"""Several processes: weaver SFT and GRPO under `torchrun --nproc_per_node 2` (CPU, gloo) end with the same
trained tensors on both ranks (DDP averaged their gradients; GRPO's rollouts differ per rank), the engine
keeps the ranks of a sharded (FSDP) model in step, and the three training stages under DeepSpeed ZeRO-2 and
ZeRO-3 train as they do under DDP."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

from test_modeling import make_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(worker: str, *args) -> subprocess.CompletedProcess:
    """Run tests/<worker> on two CPU processes; a hang (ranks out of step) fails by the timeout. A worker that
    crashes prints where (faulthandler), at the start of stderr, before torchrun's own report."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           str(here / worker), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[:4000] + "\n...\n" + done.stderr[-2000:]
    return done


@pytest.mark.parametrize("stage", ["sft", "grpo", "sft-streamed", "grpo-streamed"])
def test_two_processes_end_with_identical_trainable_weights(tmp_path, stage):
    _torchrun("ddp_worker.py", stage, tmp_path)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    initial = make_model("qwen2", k_prompt=4, k_inference=2).stage_parameters("weaver")
    assert ranks[0].keys() == ranks[1].keys() == initial.keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(not torch.equal(ranks[0][k], initial[k].detach()) for k in ranks[0])  # and they did train


def test_evaluate_splits_rows_across_ranks(tmp_path):
    """Under torchrun each rank decodes and scores its share of the rows (4 and 3 of 7), and both return the whole
    evaluation: the same as one rank decoding every row, samples in the rows' order."""
    _torchrun("eval_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["mine"] for r in ranks] == [4, 3]
    for r in ranks:
        assert r["split"] == r["whole"] == ranks[0]["whole"] and r["split"]["rows"] == 7
        assert [s["prompt"] for s in r["split"]["samples"]] == [s["prompt"] for s in r["whole"]["samples"]]
    sampled = [r["sampled"] for r in ranks]
    assert sampled[0] == sampled[1] and len(sampled[0]["samples"]) == 14  # gathered whole on both ranks
    assert [s["sample"] for s in sampled[0]["samples"]] == [0, 1] * 7


def test_memgen_eval_under_torchrun_reports_once_what_one_process_reports(tmp_path):
    from memgen.cli import main
    from offline import save_base
    from test_tasks import ROWS, _write_jsonl

    model = make_model("qwen2")
    save_base(model, tmp_path / "base")
    model.config.reasoner_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "ckpt")
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", ROWS["gsm8k"] * 3)
    command = ["eval", "--memgen", str(tmp_path / "ckpt"), "--task", "gsm8k", "--data", str(data), "--limit", "5",
               "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu"]
    done = _torchrun("eval_cli_worker.py", *command, "--out", tmp_path / "ranks.json", "--samples",
                     tmp_path / "ranks.jsonl")
    assert done.stdout.count("| with memory |") == 1  # rank 0 reports
    assert main(command + ["--out", str(tmp_path / "one.json"), "--samples", str(tmp_path / "one.jsonl")]) == 0
    assert json.loads((tmp_path / "ranks.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert (tmp_path / "ranks.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


# FSDP2 on CPU processes (gloo) before torch 2.9: 2.6 cannot gather a sharded module's parameters on the CPU
# (`unshard` records a CUDA-style stream event), and 2.7 and 2.8 sum the ranks' gradients where they should
# average them (pytorch/pytorch#162338).
@pytest.mark.skipif(Version(torch.__version__).release < (2, 9), reason="FSDP2 on gloo is incomplete before torch 2.9")
def test_sharded_model_keeps_ranks_in_step(tmp_path):
    """FSDP (`fully_shard`, two ranks): each rank decodes rows that weave and finish at other steps than the
    other rank's (the engine's trigger modes, and GRPO's rollouts). Decoding alone, the ranks would make
    different numbers of decoder calls (and, sharded, deadlock); synced, they make the same number, and every
    rank's output equals its unsharded one (for `lora`, with its trigger's LoRA layers sharing their products).
    Ranks passing different settings are refused. A training step whose ranks weave different numbers of times
    gives the unsharded log-probabilities and mean gradients."""
    _torchrun("fsdp_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mismatch_refused"] and ranks[1]["mismatch_refused"]
    assert [run["run"] for run in ranks[0]["runs"]][-2:] == ["GRPOTrainer.rollouts", "training step"]
    for run0, run1 in zip(ranks[0]["runs"], ranks[1]["runs"]):
        assert run0["equal"] and run1["equal"], (run0, run1)
        if run0["run"] == "training step":
            continue
        assert run0["synced_calls"] == run1["synced_calls"], (run0, run1)
        assert run0["alone_calls"] != run1["alone_calls"], (run0, run1)  # the ranks did diverge
        if "memory': False" not in run0["run"]:
            assert run0["weaves"] > 0 and run1["weaves"] > 0, (run0, run1)
        if run0["run"].startswith("lora"):  # the trigger's q and v share products, the sharded weights whole
            assert run0["shared_products"] > 0 and run1["shared_products"] > 0, (run0, run1)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero_stages_train_as_ddp_does(tmp_path):
    """Weaver SFT, weaver GRPO and trigger RL (`lora` and `head`) through Trainer under ZeRO-2 and ZeRO-3 (rollouts with the whole
    model gathered; the ranks weave different numbers of times, so ZeRO-3's gathers must stay in step): the same
    rollouts and, after three steps, the same trained tensors as DDP on both ranks, and a checkpoint holding
    them whole; decoding the trained model gives DDP's tokens."""
    from trainer_worker import STAGES, model_for

    for mode in ("ddp", "zero2", "zero3"):
        _torchrun("trainer_worker.py", mode, tmp_path / mode)
    for stage in STAGES:
        want = load_file(tmp_path / "ddp" / f"{stage}.rank0.safetensors")
        initial = model_for(stage).stage_parameters("trigger" if stage.startswith("trigger") else "weaver")
        assert want.keys() - {"rewards", "logged", "sequences"} == initial.keys()
        assert any(not torch.equal(want[k], initial[k].detach()) for k in initial), stage  # they did train
        if stage != "sft":
            assert want["rewards"].numel() == 3 * 2 * 4 and want["rewards"].unique().numel() == 2, stage
            # each step logs the mean reward of both ranks' rollouts, on both (it logged rank 0's alone)
            both = torch.stack([load_file(tmp_path / "ddp" / f"{stage}.rank{r}.safetensors")["rewards"].view(3, 8)
                                for r in (0, 1)], 1).double().mean((1, 2))
            assert not torch.equal(both, want["rewards"].view(3, 8).double().mean(1)), stage  # the ranks differ
            torch.testing.assert_close(want["logged"], both, msg=stage)
        for mode in ("zero2", "zero3"):
            ranks = [load_file(tmp_path / mode / f"{stage}.rank{r}.safetensors") for r in (0, 1)]
            saved = load_file(tmp_path / mode / f"{stage}.saved" / "memgen.safetensors")
            assert torch.equal(ranks[0]["rewards"], want["rewards"]), (mode, stage)  # the same rollouts
            assert torch.equal(ranks[0]["sequences"], want["sequences"]), (mode, stage)  # decoded after training
            assert torch.equal(ranks[0]["logged"], ranks[1]["logged"]), (mode, stage)  # both ranks' mean
            for key in initial:
                assert torch.equal(ranks[0][key], ranks[1][key]), (mode, stage, key)
                assert torch.equal(saved[key], ranks[0][key]), (mode, stage, key)
                torch.testing.assert_close(ranks[0][key], want[key], rtol=1e-5, atol=1e-6, msg=f"{mode} {stage} {key}")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_resuming_grpo_under_zero3_continues_exactly(tmp_path):
    """A ZeRO-3 GRPO run resumed at step 2 samples the same rollouts for steps 3-4 and ends with the tensors of
    the uninterrupted run."""
    _torchrun("trainer_worker.py", "resume", tmp_path)
    for rank in (0, 1):
        full, resumed = (load_file(tmp_path / f"{run}.rank{rank}.safetensors") for run in ("full", "resumed"))
        # steps 3-4 sampled again (1-2 come back from the trainer state rank 0 saved)
        assert full["rewards"].numel() == 4 and torch.equal(resumed["rewards"][2:], full["rewards"][2:])
        for key in full.keys() - {"rewards"}:
            torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6, msg=key)
