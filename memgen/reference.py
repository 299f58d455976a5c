"""The plain, obviously-correct semantics of MemGen (DESIGN.md section 1): the test oracle.

One row at a time, full recomputation, no caches, no padding tricks: each weave runs the weaver
on exactly the row's stream so far plus the queries; the reasoner reads exactly the row's stream.
It shares only building blocks with `MemGenModel` (the modules and their parameters), never the
orchestration, so that the fast paths can be checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memgen.weaver import INFERENCE, PROMPT


def reference_points(input_ids: list[int], labels: list[int], delimiter_table: torch.Tensor,
                     max_prompt_aug_num: int, max_inference_aug_num: int) -> dict[int, str]:
    """Points of one unpadded single-turn row: {position: kind}, by DESIGN.md's rule."""
    answer = [label != -100 for label in labels]
    boundaries = [j for j in range(len(answer)) if answer[j] and (j == 0 or not answer[j - 1])]
    if len(boundaries) != 1 or boundaries[0] == 0:
        raise ValueError(f"expected one answer span after a prompt, got boundaries {boundaries}")
    points: dict[int, str] = {}
    if max_prompt_aug_num > 0:
        points[boundaries[0]] = PROMPT
    inference = [j for j in range(1, len(answer))
                 if answer[j] and answer[j - 1] and bool(delimiter_table[input_ids[j - 1]])]
    for j in inference[:max_inference_aug_num]:
        points[j] = INFERENCE
    return points


def _weave(model, stream: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
    """Weave(stream, kind): K latents [d_R] from the weaver over the stream items plus the queries."""
    weaver = model.weaver
    items = torch.stack(stream)  # [T, d_R]
    queries = weaver.queries(kind)
    dtype = weaver.model.get_input_embeddings().weight.dtype
    inputs = torch.cat([model.reasoner_to_weaver(items.float()), queries]).to(dtype)[None]
    n = inputs.shape[1]
    hidden = weaver(inputs, torch.ones(1, n, dtype=torch.long, device=inputs.device),
                    torch.arange(n, device=inputs.device)[None])
    latents = model.weaver_to_reasoner(hidden[0, -queries.shape[0]:].float())
    return list(latents.to(items.dtype))


def reference_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, points: list[dict[int, str]] | None = None,
                      memory: bool = True):
    """Row-by-row teacher-forced forward: (loss, logits [B, L, V]) as `MemGenModel.forward` defines them.

    `points` gives each row's {position: kind} in padded coordinates; by default DESIGN.md's rule.
    """
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embed = model.reasoner.get_input_embeddings()
    vocab = model.reasoner.get_output_embeddings().weight.shape[0]
    logits = torch.zeros(batch, length, vocab, device=input_ids.device)
    for b in range(batch):
        columns = [j for j in range(length) if attention_mask[b, j]]
        ids = [int(input_ids[b, j]) for j in columns]
        if not memory:
            row_points = {}
        elif points is not None:
            row_points = {columns.index(j): kind for j, kind in points[b].items()}
        else:
            row_labels = [int(labels[b, j]) for j in columns]
            row_points = reference_points(ids, row_labels, model.delimiter_table, model.config.max_prompt_aug_num,
                                          model.config.max_inference_aug_num)
        stream: list[torch.Tensor] = []
        token_item: list[int] = []  # stream index of each token
        for j, token in enumerate(ids):
            if j in row_points:
                stream.extend(_weave(model, stream, row_points[j]))
            token_item.append(len(stream))
            stream.append(embed(torch.tensor(token, device=input_ids.device)))
        items = torch.stack(stream)[None]
        n = items.shape[1]
        hidden = model.reasoner.get_decoder()(inputs_embeds=items, attention_mask=torch.ones(1, n, dtype=torch.long,
                                              device=items.device),
                                              position_ids=torch.arange(n, device=items.device)[None],
                                              use_cache=False).last_hidden_state[0]
        for j, column in enumerate(columns):
            # the item just before token j + 1: the last latent woven there, else token j itself
            read = token_item[j + 1] - 1 if j + 1 < len(ids) else token_item[j]
            logits[b, column] = model.reasoner.get_output_embeddings()(hidden[read]).float()
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss, logits
