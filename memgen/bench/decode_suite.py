"""The decode suite: end-to-end generation, memgen against vanilla decoding and the reference.

Per batch size, one case whose implementations run side by side, sampling (temperature 1, a
seeded generator) `new_tokens` tokens per row from ragged, left-padded prompts:
- `hf_generate`: Hugging Face `generate` on the bare reasoner (memgen's LoRA layers swapped out),
  as users decode today;
- `memory_off`: memgen's engine with memory off (the same engine, no weaving);
- `always`: memory on with the `always` trigger and the default 1 + 5 budget;
- `prompt_only`: one prompt weave and no inference weaves (how QA tasks use MemGen);
- `head`, `lora`: the two learned triggers, invoking with probability 0.1 per decision point;
- `reference`: `memgen.reference.reference_generate` with the `always` trigger, the reference
  algorithm (recomputes every prefix); slow, so at most `REFERENCE_ROUNDS` of its rounds are timed.
Ratios over `memory_off`, `hf_generate` and `reference` come from these medians.
"""

from __future__ import annotations

from typing import Any

import torch

from memgen.adapters import BareBase
from memgen.bench.harness import Case
from memgen.bench.workload import Workload, prompt_batch
from memgen.generation import weaves_in_reasoner_calls
from memgen.reference import reference_generate

BATCHES = (1, 16)
NEW_TOKENS = 256
REFERENCE_ROUNDS = 3
IMPLS = ("hf_generate", "memory_off", "always", "prompt_only", "head", "lora", "reference")


def weaving_steps(augmentation_mask: torch.Tensor, trigger_mode: str, device_type: str = "cpu",
                  in_step: bool = False, joint: bool | None = None) -> int:
    """The engine's steps at which some row's weaver read (in a call of its own, or in the reasoner's call:
    `memgen.generation.JOINT_WEAVER_MODES`), from a run's augmentation mask [B, T] on a device of `device_type`,
    the weaver an adapter on the reasoner's base. in_step: rows kept in step (a streamer, synced ranks); joint:
    whether the weaver read in the reasoner's calls running ahead (None: as the device's table says).

    Prompt weaves read at step -1. An inference weave before token c of a row whose j earlier inference weaves
    each held it back `lag` steps reads at step c - 1 + j * lag, a step later when the decision that asks for it
    comes after the row's read (`head`, `lora`) and the weaver reads in the reasoner's calls. Running ahead, a
    `head` or `lora` row is held back a step per weave when its weaver has calls of its own (it reads the latents
    in the next step's call), two when the weaver reads in the reasoner's calls (then the latents); an `always`
    row one when its weaver reads in the reasoner's calls (beside its token; the latents next step), none
    otherwise (token and latents in one call after the weaver's)."""
    joint = _joint(augmentation_mask, trigger_mode, device_type, in_step, joint)
    learned = trigger_mode in ("head", "lora")
    lag = 0 if in_step else (2 if joint else 1) if learned else (1 if joint else 0)
    woven = (augmentation_mask == 1).cpu()
    step = torch.arange(woven.shape[1]).expand_as(woven) - 1
    inference = woven.long()
    inference[:, 0] = 0
    step = step + (inference.cumsum(1) - inference) * lag + inference * int(joint and learned)
    return int(step[woven].unique().numel())


def weaver_calls(augmentation_mask: torch.Tensor, trigger_mode: str, device_type: str = "cpu",
                 in_step: bool = False, joint: bool | None = None) -> int:
    """The weaver's calls of its own among `weaving_steps` (same arguments): all of them, or only the prompt's
    when its inference reads go in the reasoner's calls."""
    if _joint(augmentation_mask, trigger_mode, device_type, in_step, joint):
        return int((augmentation_mask[:, 0] == 1).any())
    return weaving_steps(augmentation_mask, trigger_mode, device_type, in_step, joint)


def _joint(augmentation_mask: torch.Tensor, trigger_mode: str, device_type: str, in_step: bool,
           joint: bool | None) -> bool:
    """Whether the weaver read in the reasoner's calls (`weaving_steps`' arguments), as the engine decides."""
    if in_step:
        return False
    if joint is None:
        return weaves_in_reasoner_calls(trigger_mode, device_type, augmentation_mask.shape[0])
    return joint


def _facts(impl: str, result: Any) -> dict[str, float]:
    """Insertions and decision points per row, and the steps at which some row's weaver read (in a batch,
    what memory costs scales with these), from the run's augmentation mask (none for HF)."""
    mask = result[1] if isinstance(result, tuple) else getattr(result, "augmentation_mask", None)
    if mask is None:
        return {"insertions_per_row": 0.0, "decision_points_per_row": 0.0, "weaving_steps": 0.0}
    return {"insertions_per_row": float((mask == 1).sum(1).float().mean()),
            "decision_points_per_row": float((mask >= 0).sum(1).float().mean()),
            "weaving_steps": float(weaving_steps(mask, impl if impl in ("head", "lora") else "always",
                                                 mask.device.type))}


def cases(workload: Workload, batches: tuple[int, ...] = BATCHES, new_tokens: int = NEW_TOKENS) -> list[Case]:
    lora, head = workload.memgen_model("lora"), workload.memgen_model("head")
    eos = workload.tokenizer.eos_token_id
    bare = BareBase(lora.reasoner)
    device = workload.device
    out = []
    for batch in batches:
        input_ids, mask = prompt_batch(workload, batch)

        def memgen(model, input_ids=input_ids, mask=mask, **kwargs):
            generator = torch.Generator(device=device).manual_seed(0)
            return model.generate(input_ids, mask, max_new_tokens=new_tokens, do_sample=True, generator=generator,
                                  eos_token_id=eos, return_dict_in_generate=True, **kwargs)

        def hf_generate(input_ids=input_ids, mask=mask):
            torch.manual_seed(0)
            with bare():
                return lora.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                              repetition_penalty=1.0,  # over any the model's generation_config sets
                                              eos_token_id=eos, pad_token_id=workload.tokenizer.pad_token_id)

        def reference(input_ids=input_ids, mask=mask):
            generator = torch.Generator(device=device).manual_seed(0)
            return reference_generate(lora, input_ids, mask, max_new_tokens=new_tokens, do_sample=True,
                                      generator=generator, eos_token_id=eos, trigger_mode="always")

        impls = {
            "hf_generate": hf_generate,
            "memory_off": lambda m=memgen: m(lora, memory=False),
            "always": lambda m=memgen: m(lora, trigger_mode="always"),
            "prompt_only": lambda m=memgen: m(lora, trigger_mode="always", max_inference_aug_num=0),
            "head": lambda m=memgen: m(head, trigger_mode="head"),
            "lora": lambda m=memgen: m(lora, trigger_mode="lora"),
            "reference": reference,
        }
        out.append(Case("decode", f"decode-B{batch}", dict(batch=batch, new_tokens=new_tokens), impls,
                        baselines=("memory_off", "hf_generate", "reference"), work=batch * new_tokens,
                        unit="tokens", describe=_facts,
                        max_rounds={"reference": REFERENCE_ROUNDS}))
    return out
