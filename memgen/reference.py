"""The plain, obviously-correct semantics of MemGen (DESIGN.md section 1): the test oracle.

One row at a time, full recomputation, no caches, no padding tricks: each weave runs the weaver
on exactly the row's stream so far plus the queries; the reasoner reads exactly the row's stream.
It shares only building blocks with `MemGenModel` (the modules and their parameters), never the
orchestration, so that the fast paths can be checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memgen.logits import logits_function
from memgen.points import prompt_turns
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
    inputs = torch.cat([model.reasoner_to_weaver(items), queries]).to(dtype)[None]
    n = inputs.shape[1]
    hidden = weaver(inputs, torch.ones(1, n, dtype=torch.long, device=inputs.device),
                    torch.arange(n, device=inputs.device)[None])
    latents = model.weaver_to_reasoner(hidden[0, -queries.shape[0]:])
    return list(latents.to(items.dtype))


def _row_logits(model, ids: list[int], row_points: dict[int, str]) -> torch.Tensor:
    """Float logits [n, V] of one unpadded row: position j predicts token j + 1."""
    device = model.device
    embed = model.reasoner.get_input_embeddings()
    stream: list[torch.Tensor] = []
    token_item: list[int] = []  # stream index of each token
    for j, token in enumerate(ids):
        if j in row_points:
            stream.extend(_weave(model, stream, row_points[j]))
        token_item.append(len(stream))
        stream.append(embed(torch.tensor(token, device=device)))
    items = torch.stack(stream)[None]
    n = items.shape[1]
    hidden = model.reasoner.get_decoder()(inputs_embeds=items,
                                          attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                                          position_ids=torch.arange(n, device=device)[None],
                                          use_cache=False).last_hidden_state[0]
    # the item just before token j + 1: the last latent woven there, else token j itself
    read = [token_item[j + 1] - 1 if j + 1 < len(ids) else token_item[j] for j in range(len(ids))]
    return logits_function(model.reasoner)(hidden[read]).float()


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for j, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = j
        elif label == -100 and start is not None:
            spans.append((start, j))
            start = None
    return spans


def reference_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, points: list[dict[int, str]] | None = None,
                      memory: bool = True, generator: torch.Generator | None = None):
    """Row-by-row teacher-forced forward: (loss, logits [B, L, V]) as `MemGenModel.forward` defines them.

    `points` gives each row's {position: kind} in padded coordinates; by default DESIGN.md's rule.
    A row with several answer spans is a conversation: one single-turn forward per assistant turn.
    """
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vocab = model.reasoner.get_output_embeddings().weight.shape[0]
    config = model.config
    logits = torch.zeros(batch, length, vocab, dtype=torch.float32, device=input_ids.device)
    for b in range(batch):
        columns = [j for j in range(length) if attention_mask[b, j]]
        ids = [int(input_ids[b, j]) for j in columns]
        if not memory:
            row = _row_logits(model, ids, {})
        elif points is not None:
            row = _row_logits(model, ids, {columns.index(j): kind for j, kind in points[b].items()})
        else:
            row_labels = [int(labels[b, j]) for j in columns]
            spans = _spans(row_labels)
            with_prompt = prompt_turns(len(spans), config.max_prompt_aug_num, generator)
            row = torch.zeros(len(ids), vocab, dtype=torch.float32, device=input_ids.device)
            start = 0
            for t, (span_start, span_end) in enumerate(spans):
                last = t == len(spans) - 1
                end = len(ids) if last else span_end
                turn_labels = [label if span_start <= j < span_end else -100 for j, label in enumerate(row_labels)]
                turn_points = reference_points(ids[:end], turn_labels[:end], model.delimiter_table,
                                               config.max_prompt_aug_num if t in with_prompt else 0,
                                               config.max_inference_aug_num)
                stop = len(ids) if last else span_end - 1
                row[start:stop] = _row_logits(model, ids[:end], turn_points)[start:stop]
                start = stop
        logits[b, columns] = row
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss, logits


def reference_penalize(logits: torch.Tensor, ids: list[int], penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty: the logit of every token already in `ids` is divided by
    `penalty` when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    seen = torch.tensor(sorted(set(ids)), device=logits.device)
    values = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def reference_choose_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                           top_p: float | None, generator: torch.Generator | None, min_p: float | None = None) -> int:
    """Next token from float logits [V]: argmax (first maximum), or a draw after temperature, top-k, top-p and
    min-p."""
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits.float() / temperature
    if top_k and top_k < scores.numel():  # (0, as None: no filtering)
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, -1) >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p:
        probs = torch.softmax(scores, -1)
        scores = scores.masked_fill(probs < min_p * probs.max(), float("-inf"))
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _decide(logits: torch.Tensor | None, do_sample: bool, temperature: float,
            generator: torch.Generator | None) -> int:
    """INVOKE (1) or SKIP (0) from [skip, invoke] logits; None (mode `always`) invokes."""
    if logits is None:
        return 1
    skip, invoke = float(logits[0]), float(logits[1])
    if not do_sample:
        return int(invoke > skip)
    u = float(torch.rand((), generator=generator, dtype=torch.float32))
    p_invoke = float(torch.softmax(logits.float() / temperature, -1)[1])
    return int(u < p_invoke)


@torch.no_grad()
def reference_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None, eos_token_id: int | list[int] | None = None,
                       trigger_mode: str | None = None, max_prompt_aug_num: int | None = None,
                       max_inference_aug_num: int | None = None, memory: bool = True,
                       repetition_penalty: float = 1.0, min_p: float | None = None):
    """Row-by-row MemGen generation (DESIGN.md section 1), recomputing everything at every step.

    Returns (sequences [B, L + T], augmentation_mask [B, T]) with T the number of steps run:
    new tokens follow each (left-padded) prompt, padding follows a row's EOS; the mask holds, for
    the position of each new token, the decision taken just before it (-100 no decision point,
    0 SKIP, 1 INVOKE). Sampling draws from `generator`, row by row, each step the token first and
    then the trigger's uniform.
    """
    config = model.config
    mode = trigger_mode or config.trigger_mode
    prompt_budget = config.max_prompt_aug_num if max_prompt_aug_num is None else max_prompt_aug_num
    budget = config.max_inference_aug_num if max_inference_aug_num is None else max_inference_aug_num
    if not memory:
        prompt_budget = budget = 0
    eos = eos_token_id if eos_token_id is not None else model.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    pad = model.tokenizer.pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = input_ids.device
    embed = model.reasoner.get_input_embeddings()
    head = logits_function(model.reasoner)

    def reasoner_hidden(stream: list[torch.Tensor]) -> torch.Tensor:
        items = torch.stack(stream)[None]
        n = items.shape[1]
        return model.reasoner.get_decoder()(
            inputs_embeds=items, attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
            position_ids=torch.arange(n, device=device)[None], use_cache=False).last_hidden_state[0, -1]

    def trigger_logits(ids: list[int], stream: list[torch.Tensor]) -> torch.Tensor | None:
        if mode == "always":
            return None
        if mode == "head":
            return model.trigger.head_logits(reasoner_hidden(stream))
        t = torch.tensor(ids, device=device)[None]
        n = t.shape[1]
        return model.trigger(t, torch.ones_like(t), torch.arange(n, device=device)[None])[0, -1]

    rows_tokens, rows_masks = [], []
    for b in range(input_ids.shape[0]):
        ids = [int(t) for t, m in zip(input_ids[b], attention_mask[b]) if m]
        stream = [embed(torch.tensor(t, device=device)) for t in ids]
        new_tokens: list[int] = []
        decisions: list[int] = []
        decision = -100
        if prompt_budget > 0:
            decision = _decide(trigger_logits(ids, stream), do_sample, temperature, generator)
            if decision == 1:
                stream.extend(_weave(model, stream, PROMPT))
        woven = 0
        for step in range(max_new_tokens):
            decisions.append(decision)
            logits = reference_penalize(head(reasoner_hidden(stream)).float(), ids, repetition_penalty)
            token = reference_choose_token(logits, do_sample, temperature, top_k, top_p, generator, min_p)
            new_tokens.append(token)
            ids.append(token)
            stream.append(embed(torch.tensor(token, device=device)))
            if token in eos_ids:
                break
            decision = -100
            if step + 1 < max_new_tokens and woven < budget and bool(model.delimiter_table[token]):
                decision = _decide(trigger_logits(ids, stream), do_sample, temperature, generator)
                if decision == 1:
                    stream.extend(_weave(model, stream, INFERENCE))
                    woven += 1
        rows_tokens.append(new_tokens)
        rows_masks.append(decisions)
    steps = max(len(t) for t in rows_tokens)
    new = torch.full((input_ids.shape[0], steps), pad, dtype=torch.long, device=device)
    mask = torch.full((input_ids.shape[0], steps), -100, dtype=torch.long, device=device)
    for b, (tokens, decisions) in enumerate(zip(rows_tokens, rows_masks)):
        new[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[b, :len(decisions)] = torch.tensor(decisions, dtype=torch.long)
    return torch.cat([input_ids, new], dim=1), mask
