"""The train suite, at batch 1 and 8 (LoRA dropout 0, so implementations compute the same thing):
- `train-B*`: one weaver SFT step (forward + backward), memgen's batched training forward against
  the row-by-row reference (`memgen.reference.reference_forward`) and against itself re-reading each
  row's prefix at every weave (`memgen_rereading`: without its weaver cache, `memgen.prefix_cache`);
- `policy-B*`: the policy-gradient forward + backward of GRPO (a weighted sum of the answer tokens'
  log-probabilities), memgen's chunked `forward(..., token_logps=True)` against the whole [B, L, V]
  logits and their log-softmax. Its point is peak memory on a large vocabulary.

Every row carries 6 points (its prompt point and 5 inference points), K = 8 latents each.
"""

from __future__ import annotations

import torch

from memgen.bench.harness import Case
from memgen.bench.workload import Workload, training_batch
from memgen.prefix_cache import rereading_prefixes
from memgen.reference import reference_forward

BATCHES = (1, 8)
POINTS = 6
IMPLS = ("memgen", "memgen_rereading", "reference", "chunked_logps", "full_logits")


def cases(workload: Workload, batches: tuple[int, ...] = BATCHES) -> list[Case]:
    model = workload.memgen_model("lora")  # the training forward weaves at every point, whatever the trigger
    if model.config.max_inference_aug_num != POINTS - 1:
        raise RuntimeError(f"train suite: expects the default budget of {POINTS - 1} inference points")
    out = []
    for batch in batches:
        input_ids, mask, labels = training_batch(workload, batch, POINTS)
        with torch.no_grad():
            points = model(input_ids, mask, labels).augmentation_points
        if not ((points != 0).sum(1) == POINTS).all():
            raise RuntimeError(f"train suite: rows must carry {POINTS} points, got {(points != 0).sum(1).tolist()}")

        def memgen(input_ids=input_ids, mask=mask, labels=labels):
            model.zero_grad(set_to_none=True)
            model(input_ids, mask, labels).loss.backward()

        def memgen_rereading(input_ids=input_ids, mask=mask, labels=labels):
            with rereading_prefixes():
                memgen(input_ids, mask, labels)

        def reference(input_ids=input_ids, mask=mask, labels=labels):
            model.zero_grad(set_to_none=True)
            reference_forward(model, input_ids, mask, labels)[0].backward()

        params = dict(batch=batch, points_per_row=POINTS, tokens=int(mask.sum()))
        out.append(Case("train", f"train-B{batch}", params,
                        {"memgen": memgen, "memgen_rereading": memgen_rereading, "reference": reference},
                        baselines=("reference", "memgen_rereading"), work=1, unit="steps"))
        out.append(_policy_case(model, input_ids, mask, labels, (points != 0).long(), params))
    return out


def _policy_case(model, input_ids, mask, labels, points, params) -> Case:
    weights = torch.linspace(-1, 1, labels.numel(), device=labels.device).view_as(labels)  # advantage-like

    def chunked():
        model.zero_grad(set_to_none=True)
        logps = model(input_ids, mask, labels, augmentation_points=points, token_logps=True).token_logps
        (logps * weights).sum().backward()

    def full_logits():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids, mask, labels, augmentation_points=points).logits
        logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        (torch.where(labels[:, 1:] != -100, logps, 0.0) * weights[:, 1:]).sum().backward()

    return Case("train", f"policy-B{params['batch']}", params, {"chunked_logps": chunked, "full_logits": full_logits},
                baselines=("full_logits",), work=1, unit="steps")
