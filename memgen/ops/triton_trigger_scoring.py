"""Triton kernel of fused trigger scoring (kernel and launcher only; semantics in trigger_scoring.py).

Each program takes BLOCK_B rows; in `head` mode it walks the hidden dimension in BLOCK_H chunks,
accumulating both logits in float32. The hidden size is a compile-time constant (a model has one): the
loop's bound is then static, which Triton's CPU interpreter in 3.2 and 3.3 also needs (it cannot take
a runtime scalar as a range bound under NumPy 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MODE = {"always": 0, "lora": 1, "head": 2}


@triton.jit
def _trigger_scoring_kernel(
    last_tokens, table, counts, finished, logits, hidden, weight, bias, uniforms, decisions,
    batch, budget, temperature,
    PROMPT_STEP: tl.constexpr, MODE: tl.constexpr, DO_SAMPLE: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = rows < batch
    count = tl.load(counts + rows, mask=in_batch, other=0)
    done = tl.load(finished + rows, mask=in_batch, other=1) != 0
    if PROMPT_STEP:
        point = in_batch & (done == 0)
    else:
        token = tl.load(last_tokens + rows, mask=in_batch, other=0)
        at_delimiter = tl.load(table + token, mask=in_batch, other=0) != 0
        point = in_batch & (done == 0) & at_delimiter & (count.to(tl.int64) < budget)
    if MODE == 0:
        invoke = point
    else:
        if MODE == 1:
            skip_logit = tl.load(logits + 2 * rows, mask=point, other=0.0).to(tl.float32)
            invoke_logit = tl.load(logits + 2 * rows + 1, mask=point, other=0.0).to(tl.float32)
        else:
            acc_skip = tl.zeros((BLOCK_B,), dtype=tl.float32)
            acc_invoke = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for start in range(0, HIDDEN, BLOCK_H):
                cols = start + tl.arange(0, BLOCK_H)
                in_cols = cols < HIDDEN
                h = tl.load(hidden + rows[:, None] * HIDDEN + cols[None, :],
                            mask=point[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
                w_skip = tl.load(weight + cols, mask=in_cols, other=0.0).to(tl.float32)
                w_invoke = tl.load(weight + HIDDEN + cols, mask=in_cols, other=0.0).to(tl.float32)
                acc_skip += tl.sum(h * w_skip[None, :], axis=1)
                acc_invoke += tl.sum(h * w_invoke[None, :], axis=1)
            skip_logit = acc_skip + tl.load(bias).to(tl.float32)
            invoke_logit = acc_invoke + tl.load(bias + 1).to(tl.float32)
        if DO_SAMPLE:
            u = tl.load(uniforms + rows, mask=point, other=1.0)
            p_invoke = 1.0 / (1.0 + tl.exp((skip_logit - invoke_logit) / temperature))
            invoke = point & (u < p_invoke)
        else:
            invoke = point & (invoke_logit > skip_logit)
    decision = tl.where(point, invoke.to(tl.int8), -100).to(tl.int8)
    tl.store(decisions + rows, decision, mask=in_batch)
    if not PROMPT_STEP:
        tl.store(counts + rows, count + invoke.to(tl.int32), mask=in_batch)


def trigger_scoring_triton(
    last_tokens, delimiter_table, counts, budget, finished, prompt_step, trigger_mode, logits=None, hidden=None,
    head_weight=None, head_bias=None, do_sample=False, temperature=1.0, uniforms=None,
) -> torch.Tensor:
    """Launch the kernel; inputs already checked by `memgen.ops.trigger_scoring`."""
    batch = last_tokens.shape[0]
    decisions = torch.empty(batch, dtype=torch.int8, device=last_tokens.device)
    if batch == 0:
        return decisions
    placeholder = last_tokens  # any tensor: the pointers a mode does not read are never dereferenced
    hidden_size = hidden.shape[1] if hidden is not None else 0
    block_b = 16
    grid = (triton.cdiv(batch, block_b),)
    _trigger_scoring_kernel[grid](
        last_tokens.contiguous(), delimiter_table.contiguous(), counts, finished.contiguous(),
        logits.contiguous() if logits is not None else placeholder,
        hidden.contiguous() if hidden is not None else placeholder,
        head_weight.contiguous() if head_weight is not None else placeholder,
        head_bias.contiguous() if head_bias is not None else placeholder,
        uniforms.contiguous() if uniforms is not None else placeholder,
        decisions, batch, budget, float(temperature),
        PROMPT_STEP=bool(prompt_step), MODE=_MODE[trigger_mode], DO_SAMPLE=bool(do_sample) and trigger_mode != "always",
        HIDDEN=hidden_size, BLOCK_B=block_b, BLOCK_H=128,
    )
    return decisions
