"""Fused trigger scoring: one call per decode step turns each row's state into a decision.

For B rows the op reads the last token ids, a per-vocabulary delimiter table, the per-row counts
of inference memories woven so far (updated in place), the budget `max_inference_aug_num`, the
finished flags and whether this is the prompt step, plus, by trigger_mode:
- `always`: nothing (every decision point invokes);
- `lora`: the trigger's two logits per row, [skip, invoke];
- `head`: hidden states and a Linear(H, 2) head, whose logits the op computes itself;
and returns decisions int8[B]: -100 no decision point, 0 SKIP, 1 INVOKE (DESIGN.md section 1).

Decision points: an unfinished row at the prompt step; else an unfinished row whose last token's
text ends with a delimiter and that has woven fewer than `budget` inference memories (the prompt
weave does not count). Greedy: INVOKE iff invoke_logit > skip_logit (ties and NaN: SKIP).
Sampling: INVOKE iff u < softmax(logits / temperature)[1], with u pre-drawn per row so that every
implementation takes the same decision from the same numbers.
"""

from __future__ import annotations

import torch

from memgen.ops import _native, selection
from memgen.ops._checks import FLOAT_DTYPES, describe

MODES = ("always", "lora", "head")
_OP = "memgen.ops.trigger_scoring"


def trigger_scoring_reference(
    last_tokens: torch.Tensor,
    delimiter_table: torch.Tensor,
    counts: torch.Tensor,
    budget: int,
    finished: torch.Tensor,
    prompt_step: bool,
    trigger_mode: str,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch semantics of the op (the fallback and the test oracle); arguments as `trigger_scoring`."""
    if prompt_step:
        point = ~finished
    else:
        point = ~finished & delimiter_table[last_tokens] & (counts.long() < budget)
    if trigger_mode == "always":
        invoke = torch.ones_like(point)
    else:
        if trigger_mode == "head":
            logits = hidden.float() @ head_weight.float().t() + head_bias.float()
        skip_logit, invoke_logit = logits.float().unbind(-1)
        if do_sample:
            p_invoke = 1.0 / (1.0 + torch.exp((skip_logit - invoke_logit) / temperature))
            invoke = uniforms < p_invoke
        else:
            invoke = invoke_logit > skip_logit
    decisions = torch.where(point, invoke.to(torch.int8), torch.full_like(invoke, -100, dtype=torch.int8))
    if not prompt_step:
        counts.add_((decisions == 1).to(counts.dtype))
    return decisions


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"{_OP}: {message}")


def _check_inputs(
    last_tokens, delimiter_table, counts, budget, finished, trigger_mode, logits, hidden, head_weight, head_bias,
    do_sample, temperature, uniforms,
) -> None:
    """Shape, dtype and device checks of the Python implementations (csrc/bindings.cpp mirrors them), before any work."""
    _expect(isinstance(last_tokens, torch.Tensor) and last_tokens.dim() == 1 and last_tokens.dtype == torch.int64,
            f"argument 'last_tokens' must be int64[B], got {describe(last_tokens)}")
    batch, device = last_tokens.shape[0], last_tokens.device

    def same(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], form: str) -> None:
        _expect(isinstance(t, torch.Tensor), f"argument '{name}' must be a tensor {form}, got {type(t).__name__}")
        _expect(t.dtype == dtype and tuple(t.shape) == shape and t.device == device,
                f"argument '{name}' must be {form} on {device}, got {describe(t)}")

    def floating(t: torch.Tensor | None, name: str, shape: tuple[int | None, ...], form: str) -> None:
        _expect(t is not None, f"argument '{name}' is required in trigger_mode {trigger_mode!r}")
        _expect(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES and t.device == device
                and t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape)),
                f"argument '{name}' must be a float32/bfloat16/float16 tensor {form} on {device}, got "
                f"{describe(t)}")

    def absent(t: torch.Tensor | None, name: str) -> None:
        _expect(t is None, f"argument '{name}' must be None in trigger_mode {trigger_mode!r}")

    _expect(isinstance(delimiter_table, torch.Tensor) and delimiter_table.dim() == 1
            and delimiter_table.dtype == torch.bool and delimiter_table.device == device,
            f"argument 'delimiter_table' must be bool[V] on {device}, got "
            f"{describe(delimiter_table)}")
    same(counts, "counts", torch.int32, (batch,), f"int32[{batch}]")
    _expect(counts.is_contiguous(), "argument 'counts' is updated in place and must be contiguous")
    _expect(isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0,
            f"argument 'budget' must be an int >= 0, got {budget!r}")
    same(finished, "finished", torch.bool, (batch,), f"bool[{batch}]")
    _expect(trigger_mode in MODES, f"argument 'trigger_mode' must be one of {MODES}, got {trigger_mode!r}")
    if trigger_mode == "lora":
        floating(logits, "logits", (batch, 2), f"[{batch}, 2]")
    else:
        absent(logits, "logits")
    if trigger_mode == "head":
        floating(hidden, "hidden", (batch, None), f"[{batch}, H]")
        floating(head_weight, "head_weight", (2, hidden.shape[1]), f"[2, {hidden.shape[1]}]")
        floating(head_bias, "head_bias", (2,), "[2]")
        _expect(head_weight.dtype == head_bias.dtype,
                f"arguments 'head_weight' and 'head_bias' must share a dtype, got {head_weight.dtype} and {head_bias.dtype}")
    else:
        absent(hidden, "hidden")
        absent(head_weight, "head_weight")
        absent(head_bias, "head_bias")
    if do_sample:
        _expect(isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf"),
                f"argument 'temperature' must be a finite number > 0 when sampling, got {temperature!r}")
    if uniforms is not None:
        same(uniforms, "uniforms", torch.float32, (batch,), f"float32[{batch}]")
    else:
        _expect(not do_sample or trigger_mode == "always",
                f"argument 'uniforms' (float32[B], pre-drawn U[0, 1)) is required when sampling in trigger_mode {trigger_mode!r}")


def _check_same_device(last_tokens: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """All tensors on the device of `last_tokens`."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != last_tokens.device:
            raise ValueError(f"{_OP}: argument '{name}' must be on {last_tokens.device} like 'last_tokens', "
                             f"got {describe(t)}")


def _check_token_range(last_tokens: torch.Tensor, vocab_size: int) -> None:
    """Every last token must index the table: raised on the CPU, asserted on the device without a sync."""
    if last_tokens.device.type == "cpu":
        bad = ((last_tokens < 0) | (last_tokens >= vocab_size)).nonzero()
        _expect(bad.numel() == 0,
                f"last_tokens[{bad[0, 0].item() if bad.numel() else 0}] = "
                f"{last_tokens[bad[0, 0]].item() if bad.numel() else 0} lies outside the delimiter table "
                f"(size {vocab_size}); build the table for the model's full vocabulary")
    else:
        torch._assert_async(((last_tokens >= 0) & (last_tokens < vocab_size)).all(),
                            f"{_OP}: a last token lies outside the delimiter table (size {vocab_size})")


def trigger_scoring(
    last_tokens: torch.Tensor,
    delimiter_table: torch.Tensor,
    counts: torch.Tensor,
    budget: int,
    finished: torch.Tensor,
    *,
    prompt_step: bool = False,
    trigger_mode: str = "always",
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    uniforms: torch.Tensor | None = None,
    backend_name: str | None = None,
) -> torch.Tensor:
    """Decide INVOKE / SKIP / no decision for every row of one decode step; updates `counts` in place.

    Args:
        last_tokens: int64[B], the token each row chose last.
        delimiter_table: bool[V], token id -> its decoded text ends with a delimiter
            (`memgen.build_delimiter_table`); V must cover every token id.
        counts: int32[B], contiguous, inference memories woven so far; INVOKE adds one (not at the prompt step).
        budget: `max_inference_aug_num`; rows with counts >= budget get no decision point.
        finished: bool[B], rows that have emitted EOS (including this step's token).
        prompt_step: step 0; every unfinished row is a decision point and counts are not touched.
        trigger_mode: `always`, `lora` (pass `logits`) or `head` (pass `hidden`, `head_weight`, `head_bias`).
        logits: float[B, 2] trigger logits [skip, invoke] (float32, bfloat16 or float16).
        hidden: float[B, H] hidden states; head_weight: float[2, H]; head_bias: float[2] (same dtype as the weight).
        do_sample: sample decisions instead of greedy argmax; temperature: > 0 when sampling.
        uniforms: float32[B] pre-drawn U[0, 1), required when sampling with logits.
        backend_name: force `native`, `triton` or `torch` for this call (default: `memgen.ops.backend()`'s choice).

    Returns:
        int8[B] decisions: -100 no decision point, 0 SKIP, 1 INVOKE.
    """
    device_type = last_tokens.device.type if isinstance(last_tokens, torch.Tensor) else "cpu"
    impl = selection.select("trigger_scoring", device_type, backend_name)
    if impl == "native":  # the C++ binding (or, for meta/fake tensors, the fake kernel) runs the same checks
        return torch.ops.memgen.trigger_scoring.default(last_tokens, delimiter_table, counts, budget, finished, prompt_step,
                                                trigger_mode, logits, hidden, head_weight, head_bias, do_sample,
                                                float(temperature), uniforms)
    _check_inputs(last_tokens, delimiter_table, counts, budget, finished, trigger_mode, logits, hidden, head_weight,
                  head_bias, do_sample, temperature, uniforms)
    _check_token_range(last_tokens, delimiter_table.shape[0])
    args = (last_tokens, delimiter_table, counts, budget, finished, prompt_step, trigger_mode, logits, hidden,
            head_weight, head_bias, do_sample, float(temperature), uniforms)
    if impl == "triton":
        from memgen.ops.triton_trigger_scoring import trigger_scoring_triton

        return trigger_scoring_triton(*args)
    return trigger_scoring_reference(*args)


if _native.load()[0]:

    @torch.library.register_fake("memgen::trigger_scoring")
    def _trigger_scoring_fake(last_tokens, delimiter_table, counts, budget, finished, prompt_step, trigger_mode,
                              logits=None, hidden=None, head_weight=None, head_bias=None, do_sample=False,
                              temperature=1.0, uniforms=None):
        # Real kernels check devices in C++; a mix with meta tensors dispatches here instead.
        _check_same_device(last_tokens, delimiter_table=delimiter_table, counts=counts, finished=finished,
                           logits=logits, hidden=hidden, head_weight=head_weight, head_bias=head_bias,
                           uniforms=uniforms)
        return last_tokens.new_empty(last_tokens.shape, dtype=torch.int8)
