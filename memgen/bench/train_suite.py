"""The train suite: one weaver SFT step (forward + backward), memgen's batched training forward
against the row-by-row reference (`memgen.reference.reference_forward`).

Every row carries 6 points (its prompt point and 5 inference points), K = 8 latents each, at batch
1 and 8 (LoRA dropout 0, so both implementations compute the same loss).
"""

from __future__ import annotations

import torch

from memgen.bench.harness import Case
from memgen.bench.workload import Workload, training_batch
from memgen.reference import reference_forward

BATCHES = (1, 8)
POINTS = 6


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

        def reference(input_ids=input_ids, mask=mask, labels=labels):
            model.zero_grad(set_to_none=True)
            reference_forward(model, input_ids, mask, labels)[0].backward()

        out.append(Case("train", f"train-B{batch}", dict(batch=batch, points_per_row=POINTS,
                                                         tokens=int(mask.sum())),
                        {"memgen": memgen, "reference": reference}, baselines=("reference",), work=1, unit="steps"))
    return out
