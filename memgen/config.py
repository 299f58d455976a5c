"""MemGenConfig: every setting of the method, validated at construction."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

from memgen.delimiters import DEFAULT_DELIMITERS

TRIGGER_MODES = ("always", "lora", "head")
DEFAULT_LORA: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": ["q_proj", "v_proj"],
    "lora_dropout": 0.1,
}
# LoraConfig fields memgen passes on to PEFT (anything else is refused rather than ignored).
_LORA_KEYS = {"r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "init_lora_weights",
              "layers_to_transform", "fan_in_fan_out"}
# LoraConfig fields that do not change the adapter (a LoraConfig passed whole may set them).
_LORA_INERT = {"task_type", "peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
               "auto_mapping", "runtime_config"}

# The torch dtypes the command line and run descriptions accept for a base model's weights, by name.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_settings(fields: dict[str, Any]) -> dict[str, Any]:
    """The settings of a PEFT LoraConfig's fields (`LoraConfig.to_dict()`, a saved adapter_config.json) that
    MemGenConfig takes: those it passes on, and any other that changes the adapter from PEFT's default, so that
    MemGenConfig refuses it by name rather than drop it (DoRA, extra trained modules, per-layer ranks)."""
    import peft

    defaults = peft.LoraConfig().to_dict()
    kept, unknown = {}, []
    for key, value in fields.items():
        if key in _LORA_KEYS and value is not None:
            kept[key] = sorted(value) if isinstance(value, set) else value  # (LoraConfig keeps its targets as a set)
        elif key in _LORA_KEYS or key in _LORA_INERT or value in (None, False, "", [], {}):
            continue
        elif key not in defaults:  # written by another PEFT release
            unknown.append(key)
        elif value != defaults[key]:
            kept[key] = value
    if unknown:  # PEFT itself ignores them too, with a warning, when it loads such a config
        warnings.warn(f"LoRA settings unknown to the installed PEFT {peft.__version__} are ignored: {sorted(unknown)}",
                      stacklevel=3)
    return kept


def _check_lora(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return dict(DEFAULT_LORA)
    if hasattr(value, "to_dict"):  # a peft.LoraConfig
        value = lora_settings(value.to_dict())
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of PEFT LoraConfig settings (e.g. {DEFAULT_LORA}), got {value!r}")
    unknown = set(value) - _LORA_KEYS
    if unknown:
        raise ValueError(f"{name} has unsupported LoRA settings {sorted(unknown)}; supported: {sorted(_LORA_KEYS)}")
    merged = {**DEFAULT_LORA, **value}
    if not isinstance(merged["r"], int) or merged["r"] < 1:
        raise ValueError(f"{name}['r'] must be an int >= 1, got {merged['r']!r}")
    if not isinstance(merged["lora_alpha"], (int, float)) or merged["lora_alpha"] <= 0:
        raise ValueError(f"{name}['lora_alpha'] must be > 0, got {merged['lora_alpha']!r}")
    if not (isinstance(merged["lora_dropout"], (int, float)) and 0 <= merged["lora_dropout"] < 1):
        raise ValueError(f"{name}['lora_dropout'] must be in [0, 1), got {merged['lora_dropout']!r}")
    targets = merged["target_modules"]
    if isinstance(targets, str):  # PEFT's meaning: a regular expression over module paths, or "all-linear"
        if not targets:
            raise ValueError(f"{name}['target_modules'] must not be empty")
        return merged
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{name}['target_modules'] must be a non-empty list of module names, a regular expression "
                         f"or 'all-linear', got {targets!r}")
    merged["target_modules"] = list(targets)
    return merged


class MemGenConfig(PretrainedConfig):
    """Settings of a MemGen model (DESIGN.md section 1).

    Args:
        prompt_latents_len: K of the prompt weave (latents appended after the prompt).
        inference_latents_len: K of each inference weave (latents woven at delimiters).
        max_prompt_aug_num: prompt weaves per row (0 disables the prompt weave).
        max_inference_aug_num: inference weaves per row (0 disables them).
        delimiters: strings whose appearance at the end of the text makes a decision point.
        weaver_lora, trigger_lora: PEFT LoraConfig settings (default r=16, lora_alpha=32,
            target_modules q_proj/v_proj, lora_dropout=0.1).
        trigger_mode: `always` (invoke at every decision point), `lora` (a LoRA trigger over the
            token ids) or `head` (a linear head on the reasoner's hidden state at the delimiter).
        reasoner_name_or_path: the base model, recorded so `from_pretrained` can load it.
    """

    model_type = "memgen"

    def __init__(
        self,
        prompt_latents_len: int = 8,
        inference_latents_len: int = 8,
        max_prompt_aug_num: int = 1,
        max_inference_aug_num: int = 5,
        delimiters: Sequence[str] = DEFAULT_DELIMITERS,
        weaver_lora: dict[str, Any] | None = None,
        trigger_lora: dict[str, Any] | None = None,
        trigger_mode: str = "always",
        reasoner_name_or_path: str | None = None,
        weaver_name_or_path: str | None = None,
        trigger_name_or_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value, low in (("prompt_latents_len", prompt_latents_len, 1),
                                 ("inference_latents_len", inference_latents_len, 1),
                                 ("max_prompt_aug_num", max_prompt_aug_num, 0),
                                 ("max_inference_aug_num", max_inference_aug_num, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(delimiters, str) or not isinstance(delimiters, Sequence) or not delimiters \
                or not all(isinstance(d, str) and d for d in delimiters):
            raise ValueError(f"delimiters must be a non-empty sequence of non-empty strings, got {delimiters!r}")
        if trigger_mode not in TRIGGER_MODES:
            raise ValueError(f"trigger_mode must be one of {TRIGGER_MODES}, got {trigger_mode!r}")
        self.prompt_latents_len = prompt_latents_len
        self.inference_latents_len = inference_latents_len
        self.max_prompt_aug_num = max_prompt_aug_num
        self.max_inference_aug_num = max_inference_aug_num
        self.delimiters = list(delimiters)
        self.weaver_lora = _check_lora("weaver_lora", weaver_lora)
        self.trigger_lora = _check_lora("trigger_lora", trigger_lora)
        self.trigger_mode = trigger_mode
        self.reasoner_name_or_path = reasoner_name_or_path
        self.weaver_name_or_path = weaver_name_or_path
        self.trigger_name_or_path = trigger_name_or_path
        super().__init__(**kwargs)
