"""Augmentation points of a teacher-forced batch: where latents are woven, and of which kind.

A point at position j means "weave before token j". The prompt point is the first answer token
(the prompt/answer boundary; exactly one per single-turn row). Inference points are answer
positions j whose previous token is also an answer token and ends the text with a delimiter: the
first `max_inference_aug_num` of them. Generation records the same points (GRPO passes them back
explicitly), so training forwards see what rollouts saw.

Points are returned as int64 [B, L]: 0 none, 1 prompt point, 2 inference point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NO_POINT, PROMPT_POINT, INFERENCE_POINT = 0, 1, 2


def answer_boundaries(real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: answer tokens whose previous real position is not an answer token."""
    is_label = (labels != -100) & real
    before = torch.zeros_like(is_label)
    before[:, 1:] = is_label[:, :-1]
    return is_label & ~before


def check_labels(real: torch.Tensor, labels: torch.Tensor, single_turn: bool = True) -> torch.Tensor:
    """Validate labels and return each row's first prompt/answer boundary (int64 [B]).

    With `single_turn`, a row with several answer spans (a conversation) is an error.
    """
    if ((labels != -100) & ~real).any():
        raise ValueError("labels must be -100 at padding positions (attention_mask == 0)")
    boundaries = answer_boundaries(real, labels)
    per_row = boundaries.sum(1)
    if (per_row == 0).any():
        rows = (per_row == 0).nonzero().flatten().tolist()
        raise ValueError(f"labels of rows {rows} have no answer tokens (every label is -100); each row needs an "
                         "answer span to train on")
    if single_turn and (per_row > 1).any():
        rows = (per_row > 1).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have several answer spans (a conversation), which explicit "
                         "augmentation_points do not support; pass single-turn rows")
    boundary = boundaries.long().argmax(1)
    first_real = real.long().argmax(1)
    if (boundary == first_real).any():
        rows = (boundary == first_real).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} start with an answer token: the answer must follow at least one prompt token")
    return boundary


def answer_spans(real: torch.Tensor, labels: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's answer spans [start, end) in order (one per assistant turn)."""
    is_label = ((labels != -100) & real).tolist()
    spans = []
    for row in is_label:
        row_spans, start = [], None
        for j, flag in enumerate(row + [False]):
            if flag and start is None:
                start = j
            elif not flag and start is not None:
                row_spans.append((start, j))
                start = None
        spans.append(row_spans)
    return spans


def prompt_turns(n_turns: int, max_prompt_aug_num: int, generator: torch.Generator | None = None) -> set[int]:
    """The turns of a conversation that get a prompt weave: all of them, or a random `max_prompt_aug_num`."""
    if n_turns <= max_prompt_aug_num:
        return set(range(n_turns))
    return set(torch.randperm(n_turns, generator=generator)[:max_prompt_aug_num].tolist())


def default_points(input_ids: torch.Tensor, real: torch.Tensor, labels: torch.Tensor,
                   delimiter_table: torch.Tensor, max_prompt_aug_num: int,
                   max_inference_aug_num: int) -> torch.Tensor:
    """DESIGN.md's points for single-turn rows (see the module docstring)."""
    boundary = check_labels(real, labels, single_turn=True)
    batch, length = input_ids.shape
    points = torch.zeros(batch, length, dtype=torch.long, device=input_ids.device)
    is_label = (labels != -100) & real
    prev_label = torch.zeros_like(is_label)
    prev_label[:, 1:] = is_label[:, :-1]
    prev_delimiter = torch.zeros_like(is_label)
    prev_delimiter[:, 1:] = delimiter_table[input_ids[:, :-1]]
    candidates = is_label & prev_label & prev_delimiter
    keep = candidates & (candidates.long().cumsum(1) <= max_inference_aug_num)
    points[keep] = INFERENCE_POINT
    if max_prompt_aug_num > 0:
        points[torch.arange(batch, device=points.device), boundary] = PROMPT_POINT
    return points


def explicit_points(given: torch.Tensor | Sequence[Sequence[int]], real: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Points from the caller: an int [B, L] mask (1 = weave before token j; 0 and -100 = not), as
    `generate` records it, or one list of positions per row. The point at a row's answer boundary
    is its prompt point, every other an inference point; each must be an answer position."""
    boundary = check_labels(real, labels)
    batch, length = real.shape
    if isinstance(given, torch.Tensor):
        if given.shape != (batch, length):
            raise ValueError(f"augmentation_points must be [B, L] = [{batch}, {length}] like input_ids, got "
                             f"{list(given.shape)}")
        if not ((given == 1) | (given == 0) | (given == -100)).all():
            raise ValueError("augmentation_points mask values must be 1 (weave), 0 or -100 (no weave)")
        mask = (given == 1).to(real.device)
    else:
        if len(given) != batch:
            raise ValueError(f"augmentation_points must hold one list of positions per row ({batch}), got {len(given)}")
        mask = torch.zeros(batch, length, dtype=torch.bool, device=real.device)
        for row, positions in enumerate(given):
            for j in positions:
                if not isinstance(j, int) or not 0 <= j < length:
                    raise ValueError(f"augmentation_points[{row}] has position {j!r} outside [0, {length})")
                mask[row, j] = True
    is_label = (labels != -100) & real
    if (mask & ~is_label).any():
        row, j = (mask & ~is_label).nonzero()[0].tolist()
        raise ValueError(f"augmentation point ({row}, {j}) is not an answer position: latents are woven before "
                         "answer tokens only")
    points = torch.where(mask, INFERENCE_POINT, NO_POINT)
    rows = torch.arange(batch, device=real.device)
    points[rows, boundary] = torch.where(mask[rows, boundary], PROMPT_POINT, NO_POINT)
    return points
