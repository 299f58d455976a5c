"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: the engine on a model sharded with
FSDP (`fully_shard`, CPU, gloo). Each rank decodes its own batch, whose rows weave at other steps and finish
at other times than the other rank's; it writes to OUT/rank<r>.json whether its sharded outputs equal its
unsharded ones, and how many decoder-layer calls each run made. Then `GRPOTrainer.rollouts` on a sharded
model (the trainer's own rollout path) against the same rollouts unsharded, and a training forward and
backward whose ranks weave and score different numbers of times against the same step unsharded."""

import json
import os
import sys

import torch
from safetensors.torch import load_file
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from memgen import adapters
from memgen.layer_stack import direct_call
from memgen.sharding import whole
from memgen.training.grpo import GRPOConfig, GRPOTrainer
from test_grpo import _prompts
from test_modeling import make_batch, make_model
from test_reference_generation import chatty_model
from worker_exit import end_worker

# sampling at temperature 0.1: the ranks' rows still reach decision points, weave and finish at other steps
RUNS = [("always", {"max_prompt_aug_num": 0}), ("lora", {}), ("head", {}), ("lora", {"do_sample": True, "temperature": 0.1}),
        ("always", {"memory": False})]


def build(trigger_mode: str):
    model = chatty_model("qwen2", trigger_mode, boost=2.0)
    with torch.no_grad():  # rows end at different steps
        model.reasoner.get_output_embeddings().weight[model.tokenizer.eos_token_id] *= 3
    return model


def decode(model, input_ids, mask, kwargs):
    """(sequences, augmentation mask, decoder-layer calls, shared LoRA products made) of one generate call."""
    calls, shared = [], []
    hook = model.reasoner.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    original = adapters._Siblings.update

    def counted(group, member, x, *rest):
        shared.append(group.x is not x)
        return original(group, member, x, *rest)

    adapters._Siblings.update = counted
    try:
        generator = torch.Generator().manual_seed(7)
        out = model.generate(input_ids, mask, max_new_tokens=24, generator=generator, return_dict_in_generate=True,
                             **kwargs)
    finally:
        hook.remove()
        adapters._Siblings.update = original
    return out.sequences, out.augmentation_mask, len(calls), sum(shared)


def grpo_rollouts(out_dir: str, rank: int) -> dict:
    model = build("always")
    args = GRPOConfig(output_dir=out_dir, use_cpu=True, report_to=[], group_size=3, max_new_tokens=20, seed=0,
                      ddp_backend="gloo", disable_tqdm=True, log_level="error")
    rows = _prompts(3 if rank == 0 else 2)
    calls = []
    model.reasoner.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    want = GRPOTrainer(model, args, rows, reward=lambda text, target: 0.0).rollouts(rows)
    alone_calls = len(calls)
    for layer in model.reasoner.model.layers:
        fully_shard(layer)
    fully_shard(model)
    got = GRPOTrainer(model, args, rows, reward=lambda text, target: 0.0).rollouts(rows)
    return {"run": "GRPOTrainer.rollouts", "equal": torch.equal(got.input_ids, want.input_ids) and
            torch.equal(got.points, want.points), "alone_calls": alone_calls, "synced_calls": len(calls) - alone_calls,
            "weaves": int((want.points == 1).sum())}


def training_step(out_dir: str, rank: int) -> dict:
    """Rank 0 weaves once (its prompt) and scores 2 LM-head chunks, rank 1 weaves up to 5 times per row and
    scores more chunks; sharded, every layer call is a collective, so the ranks must agree on the calls. The
    sharded step's token log-probabilities must equal the unsharded ones, and its gradients (FSDP averages
    them over the ranks) the ranks' mean of the unsharded gradients; `save_pretrained` then writes whole tensors."""
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    model.set_trainable("weaver")
    input_ids, mask, labels = make_batch(model, [0] if rank == 0 else [4, 2, 3], "left", seed=5 + rank)

    def step():
        logps = model(input_ids, mask, labels, token_logps=True, logps_chunk_size=4).token_logps
        logps.sum().backward()
        grads = {k: p.grad for k, p in model.stage_parameters("weaver").items()}  # sharding replaces them
        model.zero_grad(set_to_none=True)
        return logps.detach(), grads

    want_logps, want = step()
    assert all(g is not None for g in want.values())  # every trained tensor gets a gradient, zero if unused
    for g in want.values():
        dist.all_reduce(g)
        g /= 2
    for layer in model.reasoner.model.layers:
        fully_shard(layer)
    fully_shard(model)
    got_logps, got = step()
    gathered = {k: whole(g) for k, g in got.items()}
    worst = max(((gathered[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-12)).item() for k in want)
    # saving from the sharded model (every rank gathers, rank 0 writes) gives the whole, untouched tensors
    saved = os.path.join(out_dir, "sharded-checkpoint")
    model.save_pretrained(saved, is_main_process=rank == 0)
    dist.barrier()
    initial = make_model("qwen2", k_prompt=4, k_inference=2).stage_parameters("weaver")
    written = load_file(os.path.join(saved, "memgen.safetensors"))
    return {"run": "training step", "equal": bool(torch.allclose(got_logps, want_logps, rtol=1e-5, atol=1e-6))
            and worst < 1e-4 and written.keys() == initial.keys()
            and all(torch.equal(written[k], initial[k].detach()) for k in initial), "worst_grad_rel_err": worst}


def mismatch_refused(rank: int) -> bool:
    """Ranks asking for different max_new_tokens get a clear error (on both), not a hang."""
    model = build("always")
    input_ids, mask, _ = make_batch(model, [0], "left", seed=rank)
    try:
        model.generate(input_ids, mask, max_new_tokens=5 + rank, synced_ranks=True)
    except ValueError as err:
        return "max_new_tokens" in str(err)
    return False


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = []
    for trigger_mode, kwargs in RUNS:
        model = build(trigger_mode)
        input_ids, mask, _ = make_batch(model, [0] * (3 if rank == 0 else 2), "left", seed=11 + 5 * rank)
        want_seq, want_mask, alone_calls, _ = decode(model, input_ids, mask, kwargs)
        for layer in model.reasoner.model.layers:
            fully_shard(layer)
        fully_shard(model)
        got_seq, got_mask, synced_calls, shared_products = decode(model, input_ids, mask, kwargs)
        # unsharded, the engine drove the layers directly; sharded, it goes through the decoder's forward
        report.append({"run": f"{trigger_mode} {kwargs}", "equal": torch.equal(got_seq, want_seq) and
                       torch.equal(got_mask, want_mask) and direct_call(model.reasoner.get_decoder()) is None, "alone_calls": alone_calls, "synced_calls": synced_calls, "shared_products": shared_products,
                       "weaves": int((want_mask == 1).sum())})
    report.append(grpo_rollouts(out_dir, rank))
    report.append(training_step(out_dir, rank))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"runs": report, "mismatch_refused": mismatch_refused(rank)}, f)
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
