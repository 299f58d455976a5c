"""MemGenModel: the frozen reasoner, the weaver and the trigger, the fast training forward, checkpoints.

The training forward is batched: all rows at once, ragged points per row. The weaver runs in
rounds (round r weaves every row's r-th point, its queries transient); a round reads only the
stream items since each row's previous weave where a weaver cache across rounds gives the same
result (`memgen.prefix_cache`), otherwise each row's whole prefix. The reasoner reads the padded,
interleaved batch once.
`memgen.reference` holds the row-by-row version it must equal.

On a sharded model (FSDP, DeepSpeed ZeRO-3) under several processes every module call gathers its
parameters, a collective, so every rank must make the same calls: the ranks agree on the weaving
rounds and on the LM-head chunks, and a rank with nothing to weave or score in one runs it on a dummy
input whose output is added to its result times zero (so backward makes the same calls too). Training
under several processes, the weaver also runs for each kind of point at least once per forward, so
that every trainable tensor gets a gradient on every rank (zero where unused), as DeepSpeed needs.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, StopStringCriteria
from transformers.utils import ModelOutput

from memgen import checkpoints, prefix_cache
from memgen.adapters import adapter_names, adapter_parameters, adapter_state_context, add_lora_adapter, tuner_layers
from memgen.compatibility import TESTED_DECODERS, check_engine_support
from memgen.config import MemGenConfig
from memgen.delimiters import build_delimiter_table
from memgen.layer_stack import applies_windows, input_device, sliding_window, text_config
from memgen.logits import logits_function
from memgen.modes import checkpointing_paused, evaluating, exclusive
from memgen.points import (INFERENCE_POINT, PROMPT_POINT, answer_boundaries, answer_spans, check_labels,
                           default_points, explicit_points, prompt_turns)
from memgen.prefix_cache import PrefixCache, prefix_mask
from memgen.projection import Projection
from memgen.sharding import distributed, ranks_max, root_gathered, sharding_of, zero3_decodable
from memgen.trigger import MemGenTrigger
from memgen.weaver import INFERENCE, PROMPT, MemGenWeaver

STAGES = ("weaver", "trigger")


@dataclass
class MemGenOutput(ModelOutput):
    """Output of `MemGenModel.forward`.

    loss: mean cross-entropy over answer tokens (when labels are given).
    logits: [B, L, V]; logits[:, i] predicts token i + 1 (zeros at padding positions).
    augmentation_points: int64 [B, L]; 1 prompt point, 2 inference point (latents before token j), 0 none.
    trigger_logits: float32 [B, L, 2] (only with `forward(..., trigger_logits=True)`): the trigger's
        [SKIP, INVOKE] logits after reading the tokens through position j, as generation computes them.
    token_logps: float32 [B, L] (only with `forward(..., token_logps=True)`): log p(token j | the stream
        before it) for each labelled token (labels != -100), 0 elsewhere.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    augmentation_points: torch.Tensor | None = None
    trigger_logits: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index: a bare 'cuda' (as in `torch.Generator(device="cuda")`) is the current
    device (index 0 for a backend that has no notion of a current one)."""
    if device.index is None and device.type not in ("cpu", "meta"):
        current = getattr(getattr(torch, device.type, None), "current_device", lambda: 0)
        return torch.device(device.type, current())
    return device


def _load_causal_lm(model_or_name: PreTrainedModel | str, what: str,
                    model_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """`model_or_name` checked, or loaded by name with `AutoModelForCausalLM.from_pretrained(name, **model_kwargs)`."""
    if isinstance(model_or_name, str):
        return AutoModelForCausalLM.from_pretrained(model_or_name, **(model_kwargs or {}))
    if isinstance(model_or_name, PeftModel):
        raise ValueError(f"{what} is a PEFT model ({type(model_or_name).__name__}): memgen runs it as a frozen "
                         f"base, beside adapters of its own; merge yours into its weights first "
                         f"({what}.merge_and_unload())")
    if not isinstance(model_or_name, PreTrainedModel) or not hasattr(model_or_name, "get_decoder"):
        raise ValueError(f"{what} must be a Hugging Face causal LM or its name/path, got {type(model_or_name).__name__}")
    return model_or_name


_NARROW_INTEGERS = (torch.int32, torch.int16, torch.int8, torch.uint8)


def _token_ids(value: Any) -> Any:
    """An integer tensor of token ids (int32 from numpy or ONNX pipelines, say) widened to int64, the index type
    every op takes; anything else as given, for the checks to refuse."""
    if isinstance(value, torch.Tensor) and value.dtype in _NARROW_INTEGERS:
        return value.long()
    return value


def _is_integer(value: Any) -> bool:
    """Whether `value` is an integer (Python's, numpy's), not a bool: what a token id may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_finite(value: Any) -> bool:
    """Whether `value` is a real number in (0, inf): what a temperature or a repetition penalty may be."""
    return isinstance(value, (int, float)) and 0 < value < float("inf")


def eos_id_list(value: Any) -> list[int] | None:
    """`eos_token_id` as a list of ints (from an int, a list or tuple of them, or an integer tensor of at most one
    dimension, as Hugging Face's generation config holds it); None where it is none of those."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        value = value.tolist()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(_is_integer(e) for e in items):
        return None
    return [int(e) for e in items]


# The loading arguments that say where and which version of a repository to read: a tokenizer loaded beside a base
# model takes them too, so that both come from the same revision and place.
_LOCATION_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "force_download",
                    "proxies")


def load_tokenizer(name: str, **location: Any) -> Any:
    """The tokenizer saved with `name`, with its EOS as pad token where it names none (Llama's and Mistral's do not):
    pads only fill masked positions and what follows a finished row's EOS. Tokenizers memgen is handed are the
    caller's to set up; this is for those it loads itself (a reasoner, or a checkpoint's base, given by name).
    `location`: `AutoTokenizer.from_pretrained`'s revision, token, cache_dir, ... as the base was loaded with."""
    tokenizer = AutoTokenizer.from_pretrained(name, **location)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_adapters(model: PreTrainedModel, what: str) -> None:
    """Raise if `model` carries adapters other than memgen's: memgen runs a base bare (the reasoner) or with one of
    its own adapters active, so another adapter would be silently left out of every forward. Warn where it already
    carries memgen's: another MemGenModel was built on it, and this one's fresh adapters replace them in the shared
    layers, so that model now runs this one's."""
    names = adapter_names(model)
    memgen_names = {MemGenWeaver.adapter_name, MemGenTrigger.adapter_name}
    foreign = sorted(names - memgen_names)
    if foreign:
        raise ValueError(f"{what} carries adapters of its own ({', '.join(foreign)}): memgen runs it as a frozen base "
                         "without them, so they would be silently left out. Merge them into its weights first "
                         "(load it as a peft.PeftModel and call merge_and_unload())")
    ours = sorted(names & memgen_names)
    if ours:
        warnings.warn(f"the {what} already carries memgen's {' and '.join(ours)} adapter{'s' * (len(ours) > 1)}: "
                      "another MemGenModel was built on it. This one's fresh adapters replace them, so that model now "
                      "runs this one's; build each MemGenModel on a base of its own (or drop the old model)",
                      stacklevel=4)


def _check_has_values(model: PreTrainedModel, what: str) -> None:
    """Raise unless every parameter of `model` holds values: one on the meta device has none (accelerate leaves an
    offloaded module's weights there), the adapters PEFT adds beside it would have none either, and a matrix product
    with such a weight returns uninitialised memory instead of raising."""
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(
            f"{what} has {len(empty)} parameters on the meta device, without values (e.g. {', '.join(empty[:3])}). "
            "accelerate leaves a module's weights there when a device_map offloads it ('cpu' beside an accelerator, "
            "or 'disk'); memgen's adapters on such layers would hold no values. Load the model with every module on "
            "a device (e.g. device_map={'': 0}), or shard it across processes with FSDP or DeepSpeed ZeRO-3")


def _checkpointing_method(base: PreTrainedModel, action: str) -> Callable[..., None]:
    """`base`'s activation_checkpointing_{action} (transformers >= 5.23), else its gradient_checkpointing_{action}:
    the same method under the name older releases give it."""
    method = getattr(base, f"activation_checkpointing_{action}", None)
    return method if method is not None else getattr(base, f"gradient_checkpointing_{action}")


def _differentiable(output: torch.Tensor) -> torch.Tensor:
    """`output`, part of autograd's graph while gradients are on. A batch with no insertion point (or
    `memory=False`) never calls the weaver, so nothing trainable produced its outputs and a training step's
    backward would fail ("does not require grad"). Such a batch teaches the weaver nothing: backward then runs
    and leaves every gradient as it was (None for this batch), and the optimizer skips the step's update
    as it does for any unused parameter."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_()
    return output


def _predicting_items(real: torch.Tensor, item_index: torch.Tensor, n_latents: torch.Tensor) -> torch.Tensor:
    """[B, L] the stream index of the item whose hidden state predicts token j + 1: token j itself, or the
    last latent woven between tokens j and j + 1 (0 at padding)."""
    next_latents = torch.zeros_like(n_latents)
    next_latents[:, :-1] = n_latents[:, 1:]
    return torch.where(real, item_index + next_latents, 0)


class MemGenModel(nn.Module):
    """A frozen reasoner with a memory weaver and a memory trigger (DESIGN.md section 1).

    Build with `from_reasoner` or `from_pretrained`. By default the weaver and the `lora` trigger
    are LoRA adapters on the reasoner's own weights (one copy in memory).
    """

    def __init__(self, config: MemGenConfig, reasoner: PreTrainedModel, tokenizer: Any,
                 weaver_base: PreTrainedModel | None = None, trigger_base: PreTrainedModel | None = None) -> None:
        super().__init__()
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("the tokenizer has no pad token; set one before building MemGen, e.g. "
                             "`tokenizer.pad_token = tokenizer.eos_token`")
        for what, base in (("reasoner", reasoner), ("weaver_base", weaver_base), ("trigger_base", trigger_base)):
            if base is not None:
                _check_has_values(base, what)
                _check_adapters(base, what)
        if config.trigger_mode == "lora" and trigger_base is not None:
            rows = trigger_base.get_input_embeddings().num_embeddings
            if rows < len(tokenizer):
                raise ValueError(f"the lora trigger reads the reasoner's token ids, so trigger_base must share the "
                                 f"reasoner's tokenizer: its embedding has {rows} rows, the tokenizer {len(tokenizer)} "
                                 "ids")
        self.config = config
        self.tokenizer = tokenizer
        self.reasoner = reasoner
        reasoner.requires_grad_(False)
        weaver_base = reasoner if weaver_base is None else weaver_base
        trigger_base = reasoner if trigger_base is None else trigger_base
        for base in {id(weaver_base): weaver_base, id(trigger_base): trigger_base}.values():
            base.requires_grad_(False)
        add_lora_adapter(weaver_base, MemGenWeaver.adapter_name, config.weaver_lora)
        self.weaver = MemGenWeaver(weaver_base, config.prompt_latents_len, config.inference_latents_len)
        # memgen's own modules sit where their outputs are read: a reasoner loaded onto a GPU gives a model there
        d_reasoner, d_weaver = text_config(reasoner).hidden_size, text_config(weaver_base).hidden_size
        device = input_device(reasoner)
        self.reasoner_to_weaver = Projection(d_reasoner, d_weaver, input_device(weaver_base))
        self.weaver_to_reasoner = Projection(d_weaver, d_reasoner, device)
        if config.trigger_mode == "lora":
            add_lora_adapter(trigger_base, MemGenTrigger.adapter_name, config.trigger_lora)
            self.trigger = MemGenTrigger("lora", text_config(trigger_base).hidden_size, trigger_base,
                                         input_device(trigger_base))
        elif config.trigger_mode == "head":
            self.trigger = MemGenTrigger("head", d_reasoner, device=device)
        else:
            self.trigger = None
        vocab = reasoner.get_input_embeddings().num_embeddings
        table = build_delimiter_table(tokenizer, config.delimiters, vocab_size=vocab)
        self.register_buffer("delimiter_table", table.to(device), persistent=False)
        self.set_trainable("weaver")
        self.weaver_trained = False  # set by loading a checkpoint or by a weaver training run; trigger RL checks it

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_reasoner(cls, reasoner: PreTrainedModel | str, tokenizer: Any = None,
                      config: MemGenConfig | None = None, weaver_base: PreTrainedModel | str | None = None,
                      trigger_base: PreTrainedModel | str | None = None, **model_kwargs: Any) -> "MemGenModel":
        """Build MemGen around `reasoner` (a loaded causal LM or a name/path), with fresh weaver and trigger. Without
        `tokenizer`, the reasoner's is loaded by its name (`load_tokenizer`: its EOS pads where it names no pad).

        `model_kwargs` (dtype, device_map, attn_implementation, quantization_config, ...) go to
        `AutoModelForCausalLM.from_pretrained` for every base given by name, and those that locate a repository
        (revision, token, cache_dir, local_files_only, trust_remote_code, ...) to the tokenizer loaded by the
        reasoner's name; with no base given by name they are refused, as they would change nothing. memgen's own
        modules are placed beside the bases (a reasoner on a GPU gives a model there)."""
        config = MemGenConfig() if config is None else config
        if not isinstance(config, MemGenConfig):
            raise ValueError(f"config must be a MemGenConfig, got {type(config).__name__}")
        if model_kwargs and not any(isinstance(base, str) for base in (reasoner, weaver_base, trigger_base)):
            raise ValueError(f"{sorted(model_kwargs)} would load a base by name, but every base is given loaded: "
                             "load it with them yourself, or pass its name")
        name = reasoner if isinstance(reasoner, str) else getattr(reasoner, "name_or_path", None)
        reasoner = _load_causal_lm(reasoner, "reasoner", model_kwargs)
        if tokenizer is None:
            if not name:
                raise ValueError("pass the tokenizer: the reasoner has no name to load one from")
            tokenizer = load_tokenizer(name, **{k: v for k, v in model_kwargs.items() if k in _LOCATION_KWARGS})
        weaver_base = None if weaver_base is None else _load_causal_lm(weaver_base, "weaver_base", model_kwargs)
        trigger_base = None if trigger_base is None else _load_causal_lm(trigger_base, "trigger_base", model_kwargs)
        config.reasoner_name_or_path = config.reasoner_name_or_path or name
        if weaver_base is not None:
            config.weaver_name_or_path = getattr(weaver_base, "name_or_path", None)
        if trigger_base is not None:
            config.trigger_name_or_path = getattr(trigger_base, "name_or_path", None)
        return cls(config, reasoner, tokenizer, weaver_base, trigger_base)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, reasoner: PreTrainedModel | str | None = None,
                        tokenizer: Any = None, **kwargs: Any) -> "MemGenModel":
        """Load a memgen checkpoint, or either checkpoint format of the reference implementation, from a local
        directory or a Hugging Face Hub repository id (downloaded, or taken from the Hub's cache).

        The base model comes from `reasoner` or, when not given, from the name recorded in the checkpoint.
        Keyword arguments: config, weaver_base, trigger_base, revision (the checkpoint's: a Hub repository's branch,
        tag or commit), check_base_weights (default True): where the checkpoint carries its frozen base weights (the
        reference's `model.safetensors`), raise unless they are the bases' own; any other goes to
        `AutoModelForCausalLM.from_pretrained` for the bases loaded by name (dtype, device_map, ...), as in
        `from_reasoner`.
        """
        return checkpoints.load(cls, str(path), reasoner, tokenizer, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, is_main_process: bool = True) -> None:
        """Write the config and what is trained (adapters, queries, norms, scales, projections, trigger) as
        safetensors. Under several processes call it on every rank (a model sharded by FSDP or partitioned by
        DeepSpeed ZeRO-3 gathers those tensors, a collective) with `is_main_process` True on the one that writes."""
        checkpoints.save(self, str(path), is_main_process=is_main_process)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    is_main_process: bool = True) -> Any:
        """Upload the checkpoint `save_pretrained` writes to the Hugging Face Hub repository `repo_id` (created if
        missing), as one commit; `from_pretrained(repo_id)` loads it back. Returns the commit's info
        (`huggingface_hub.CommitInfo`). Under several processes call it on every rank, with `is_main_process`
        True on the one that uploads, as for `save_pretrained`."""
        return checkpoints.push(self, repo_id, commit_message=commit_message, private=private, token=token,
                                revision=revision, create_pr=create_pr, is_main_process=is_main_process)

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs (the reasoner's embeddings' device), as Hugging Face's `model.device`:
        `model.generate(**batch.to(model.device))`."""
        return self.delimiter_table.device

    @property
    def dtype(self) -> torch.dtype:
        """The reasoner's dtype, as Hugging Face's `model.dtype` (memgen's own trained tensors are float32 unless
        the whole model is cast)."""
        return self.reasoner.dtype

    def get_input_embeddings(self) -> nn.Module:
        """The reasoner's token embedding module, which embeds every token the model reads (the weaver reads the
        reasoner's embeddings through its projection). Hugging Face's NEFTune (`TrainingArguments(
        neftune_noise_alpha=...)`) hooks it."""
        return self.reasoner.get_input_embeddings()

    # ------------------------------------------------------------------ memory

    def _bases(self) -> list[PreTrainedModel]:
        """The distinct base models (the reasoner, and a separate weaver or trigger base if any)."""
        bases = [self.reasoner, self.weaver.model]
        if self.trigger is not None and self.trigger.mode == "lora":
            bases.append(self.trigger.model)
        return list({id(b): b for b in bases}.values())

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the bases' layer activations in the backward pass instead of keeping them (what
        `TrainingArguments(activation_checkpointing=True)` calls): the weaver's and the reasoner's passes of a
        training forward then hold one layer's activations at a time. Only in train mode, as in Hugging Face."""
        kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        if kwargs.get("use_reentrant", False):
            raise ValueError("activation_checkpointing_kwargs: use_reentrant must be False (the recomputation has to "
                             "restore which adapter ran, which only non-reentrant checkpointing allows)")
        kwargs.update(use_reentrant=False,
                      context_fn=adapter_state_context([layer for b in self._bases() for layer in tuner_layers(b)]))
        spread = {} if every_n_layers == 1 and not offload else {"every_n_layers": every_n_layers, "offload": offload}
        enables = [_checkpointing_method(base, "enable") for base in self._bases()]
        if spread and any("every_n_layers" not in inspect.signature(enable).parameters for enable in enables):
            raise ValueError(f"every_n_layers={every_n_layers}, offload={offload}: checkpointing only some layers or "
                             f"offloading needs transformers >= 5.17 (installed: {transformers.__version__})")
        for enable in enables:
            enable(kwargs, **spread)

    def activation_checkpointing_disable(self) -> None:
        for base in self._bases():
            _checkpointing_method(base, "disable")()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """`activation_checkpointing_enable` under its former name, the one `Trainer` calls in transformers < 5.23
        (`TrainingArguments(gradient_checkpointing=True)`)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    # ------------------------------------------------------------------ what trains

    def stage_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """The parameters a training stage owns, under their checkpoint names."""
        if stage == "weaver":
            params = {f"weaver.{n}": p for n, p in self.weaver.named_parameters() if not n.startswith("model.")}
            params.update({f"weaver.model.{n}": p for n, p in adapter_parameters(self.weaver.model, "weaver").items()})
            params.update({f"reasoner_to_weaver.{n}": p for n, p in self.reasoner_to_weaver.named_parameters()})
            params.update({f"weaver_to_reasoner.{n}": p for n, p in self.weaver_to_reasoner.named_parameters()})
            return params
        if stage == "trigger":
            if self.trigger is None:
                return {}
            params = {f"trigger.output_layer.{n}": p for n, p in self.trigger.output_layer.named_parameters()}
            if self.trigger.mode == "lora":
                params.update({f"trigger.model.{n}": p
                               for n, p in adapter_parameters(self.trigger.model, "trigger").items()})
            return params
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        """The parameters of `stage` ('weaver' or 'trigger'), e.g. for an optimizer."""
        return list(self.stage_parameters(stage).values())

    def set_trainable(self, stage: str | None) -> None:
        """Train `stage` ('weaver', 'trigger') and freeze everything else; None freezes all. The reasoner never trains."""
        if stage is not None and stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
        self.requires_grad_(False)
        if stage is not None:
            for p in self.stage_parameters(stage).values():
                p.requires_grad_(True)

    # ------------------------------------------------------------------ training forward

    def _check_token_batch(self, input_ids, attention_mask) -> torch.Tensor:
        """Checks shared by forward and generate; returns the bool [B, L] mask of real tokens."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = (f"{input_ids.dtype} of shape {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor [B, L], got {got}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must not be empty (an empty batch or no columns), got shape "
                             f"{list(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must match input_ids {list(input_ids.shape)}, got {list(attention_mask.shape)}")
        device = self.device
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but the model is on {device}")
        real = attention_mask.bool()
        if not real.any(1).all():
            raise ValueError("every row needs at least one token with attention_mask == 1")
        vocab = self.delimiter_table.shape[0]
        if (input_ids[real] < 0).any() or (input_ids[real] >= vocab).any():
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the reasoner's vocabulary)")
        return real

    def _check_forward_inputs(self, input_ids, attention_mask, labels) -> torch.Tensor:
        real = self._check_token_batch(input_ids, attention_mask)
        if labels is not None and not (isinstance(labels, torch.Tensor) and labels.shape == input_ids.shape
                                       and labels.dtype == torch.long):
            got = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor)
                   else type(labels).__name__)
            raise ValueError(f"labels must be an integer tensor {list(input_ids.shape)} like input_ids, got {got}")
        return real

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, augmentation_points: Any = None,
                memory: bool = True, generator: torch.Generator | None = None,
                trigger_logits: bool = False, token_logps: bool = False,
                logps_chunk_size: int = 1024, logps_temperature: float = 1.0) -> MemGenOutput:
        """Teacher-forced forward with latents woven at the augmentation points.

        Args:
            input_ids: integer [B, L] (narrower types are widened to int64), left- or right-padded.
            attention_mask: [B, L], 1 for tokens, 0 for padding (default: all ones).
            labels: integer [B, L], -100 outside the answer. Required unless `augmentation_points`
                is given with memory, or `memory=False`.
            augmentation_points: explicit points overriding DESIGN.md's rule: an int [B, L] mask
                (1 = weave before token j) or one list of positions per row (single-turn rows).
            memory: False runs the bare reasoner through the same code path (a fair baseline).
            generator: draws which turns of a conversation get a prompt weave when a row has more
                than `max_prompt_aug_num` assistant turns.
            trigger_logits: return the trigger's logits after each token instead of the reasoner's (see
                MemGenOutput): the `lora` trigger reads the token ids alone; the `head` trigger reads the
                reasoner's hidden states, which needs labels and `augmentation_points`. Trigger RL takes its
                decisions' log-probabilities from them (through forward, so that DDP synchronises the
                trigger's gradients).
            token_logps: return only the labelled tokens' log-probabilities (see MemGenOutput), for policy
                gradients. The LM head runs on `logps_chunk_size` tokens at a time and backward recomputes
                each chunk's logits, so neither the [B, L, V] logits nor their float32 log-softmax is
                ever held whole (with a 150k vocabulary they are a step's largest tensors). Single-turn
                rows or explicit `augmentation_points` only.
            logps_temperature: with `token_logps`, score the tokens under the logits divided by it: the
                distribution that sampling at that temperature draws from (GRPO passes its sampling temperature).

        Rows with several answer spans are conversations: each assistant turn is a single-turn
        forward over the prefix ending at that turn (earlier turns' latents are invisible to it);
        logits[:, j] come from the forward of the turn that contains token j + 1.
        """
        input_ids, labels = _token_ids(input_ids), _token_ids(labels)
        real = self._check_forward_inputs(input_ids, attention_mask, labels)
        if token_logps and (labels is None or not isinstance(logps_chunk_size, int) or logps_chunk_size < 1):
            raise ValueError(f"token_logps=True needs labels (the tokens to score) and logps_chunk_size an int >= 1, "
                             f"got labels={'None' if labels is None else 'given'}, logps_chunk_size={logps_chunk_size!r}")
        if token_logps and not _positive_finite(logps_temperature):
            raise ValueError(f"logps_temperature must be a finite number > 0, got {logps_temperature!r}")
        if token_logps and trigger_logits:
            raise ValueError("pass token_logps=True or trigger_logits=True, not both: they are different outputs")
        if trigger_logits:
            return MemGenOutput(trigger_logits=self._trigger_logits(input_ids, real, labels, augmentation_points))
        if not memory:
            points = torch.zeros_like(input_ids)
        elif labels is None:
            raise ValueError("labels are required to place augmentation points (or pass memory=False)")
        elif augmentation_points is not None:
            points = explicit_points(augmentation_points, real, labels)
        else:
            check_labels(real, labels, single_turn=False)
            if (answer_boundaries(real, labels).sum(1) > 1).any():
                if token_logps:
                    raise ValueError("token_logps=True takes single-turn rows or explicit augmentation_points")
                logits, points = self._conversation_logits(input_ids, real, labels, generator)
                return self._output(logits, labels, points)
            points = default_points(input_ids, real, labels, self.delimiter_table, self.config.max_prompt_aug_num,
                                    self.config.max_inference_aug_num)
        if token_logps:
            return MemGenOutput(augmentation_points=points, token_logps=_differentiable(self._token_logps(
                input_ids, real, points, labels, logps_chunk_size, float(logps_temperature))))
        return self._output(self._interleaved_logits(input_ids, real, points), labels, points)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 256,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | list[int] | None = None, return_dict_in_generate: bool = False,
                 num_return_sequences: int = 1, memory: bool = True, trigger_mode: str | None = None,
                 max_prompt_aug_num: int | None = None, max_inference_aug_num: int | None = None,
                 repetition_penalty: float = 1.0, streamer: Any = None, stop_strings: str | list[str] | None = None,
                 synced_ranks: bool | None = None, pad_token_id: int | None = None, output_latents: bool = False,
                 min_new_tokens: int = 0, min_p: float | None = None):
        """Generate with latent memory (DESIGN.md section 1) through the ragged-cache engine.

        Args:
            input_ids: integer [B, L] prompts (narrower types are widened to int64), left- or right-padded;
                attention_mask [B, L] marks tokens.
            max_new_tokens: >= 1. min_new_tokens: EOS is barred before this many new tokens (0: never), as Hugging
                Face's `min_new_tokens`. do_sample / temperature (> 0) / top_k / top_p / min_p / generator: token
                sampling (top_k 0, as None, filters nothing, as in Hugging Face; min_p in [0, 1] drops the tokens
                less likely than min_p times the likeliest, after top_p, as Hugging Face does); the trigger samples
                its decisions with the same temperature.
            eos_token_id: one id or several: an int, a list or tuple, or an integer tensor (default: the
                tokenizer's EOS).
            pad_token_id: the token that fills each row after its EOS (default: the tokenizer's pad token).
            return_dict_in_generate: return `MemGenGenerateOutput(sequences, augmentation_mask, latent_norms,
                completion_mask)` instead of the sequences alone.
            output_latents: also return the latents woven into each row (`MemGenGenerateOutput.latents`: per row,
                one [K, d] tensor a weave, in stream order), to study what the weaver writes; needs
                return_dict_in_generate, as Hugging Face's output_* flags do.
            num_return_sequences: samples per prompt (> 1 needs do_sample, as in Hugging Face): the output's
                rows are each prompt's samples in turn, B * num_return_sequences in all (GRPO's groups).
            memory: False decodes the bare reasoner with the same engine (a fair baseline).
            trigger_mode, max_prompt_aug_num, max_inference_aug_num: per-call overrides of the config.
            repetition_penalty: Hugging Face's penalty (> 0; 1.0 = none) on tokens already in the row.
            streamer: an object with `put(tokens)` and `end()` (e.g. `transformers.TextStreamer`):
                receives the prompts, then each step's new tokens [B].
            stop_strings: a row also finishes once its generated text ends with one of these strings
                (matched on token ids by `transformers.StopStringCriteria`; no text decoding in the loop).
            synced_ranks: keep every rank of the default process group making the same model calls until all
                ranks are done (each step they agree on whether any still decodes, consults its trigger and
                weaves; one all-reduce each). Required for a model sharded by FSDP, whose every forward is a
                collective; None (default) turns it on exactly then. Every rank must pass the same
                max_new_tokens, trigger mode and budgets. A model that is itself an FSDP root
                (`fully_shard`) gathers its own parameters for the call; under FSDP1 wrap the call in
                `FullyShardedDataParallel.summon_full_params(wrapper, recurse=False)`. A model partitioned
                by DeepSpeed ZeRO-3 decodes inside `memgen.sharding.gathered_for_decoding(engine)`, whole
                on each rank, with no collective calls.

        Returns sequences [N, L + T] (N = B * num_return_sequences; pad after each row's EOS), or the output
        with the augmentation mask [N, T]: -100 no decision point, 0 SKIP, 1 INVOKE before each new token.
        """
        from memgen.generation import generate as run_engine

        sharding = sharding_of(self)
        if sharding == "zero3" and not zero3_decodable(self):
            raise ValueError("this model's parameters are partitioned by DeepSpeed ZeRO-3: decode inside "
                             "`with memgen.sharding.gathered_for_decoding(engine):` (engine: the DeepSpeed engine, "
                             "Trainer.model_wrapped), which gathers them whole for the call")
        if synced_ranks is None:
            synced_ranks = sharding == "fsdp" and distributed()
        elif synced_ranks and not distributed():
            raise ValueError("synced_ranks=True needs an initialised torch.distributed process group of more than "
                             "one rank")
        mode = self.config.trigger_mode if trigger_mode is None else trigger_mode
        if mode not in ("always", "lora", "head"):
            raise ValueError(f"trigger_mode must be 'always', 'lora' or 'head', got {mode!r}")
        if mode != "always" and (self.trigger is None or self.trigger.mode != mode):
            raise ValueError(f"trigger_mode {mode!r} needs a model built with MemGenConfig(trigger_mode={mode!r})")
        budgets = {"max_prompt_aug_num": max_prompt_aug_num, "max_inference_aug_num": max_inference_aug_num}
        for name, value in budgets.items():
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        prompt_budget = self.config.max_prompt_aug_num if max_prompt_aug_num is None else max_prompt_aug_num
        budget = self.config.max_inference_aug_num if max_inference_aug_num is None else max_inference_aug_num
        if not memory:
            prompt_budget = budget = 0
        latents = (self.config.prompt_latents_len if prompt_budget else 0) + self.config.inference_latents_len * budget
        input_ids = _token_ids(input_ids)
        real = self._check_generate_inputs(input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                           top_k, top_p, generator, latents, min_p)
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
        if not isinstance(output_latents, bool) or (output_latents and not return_dict_in_generate):
            raise ValueError(f"output_latents must be a bool, and True needs return_dict_in_generate=True (the "
                             f"sequences alone have no place for them), got output_latents={output_latents!r}")
        if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1, got {num_return_sequences!r}")
        if num_return_sequences > 1 and not do_sample:
            raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy decoding "
                             "returns the same sequence for every copy of a prompt")
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = eos_id_list(eos)
        vocab = self.delimiter_table.shape[0]
        if eos_ids is None or not all(0 <= e < vocab for e in eos_ids):
            unset = " (the tokenizer names no EOS token: pass eos_token_id)" if eos is None else ""
            raise ValueError(f"eos_token_id must be token ids in [0, {vocab}), got {eos!r}{unset}")
        pad = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        if not _is_integer(pad) or not 0 <= pad < vocab:
            raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad!r}")
        if not _positive_finite(repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")
        if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise ValueError("streamer must have put(tokens) and end() methods, like transformers.TextStreamer")
        stop = None
        if stop_strings is not None:
            strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
            if not (isinstance(strings, (list, tuple)) and strings and all(isinstance(x, str) and x for x in strings)):
                raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
            stop = functools.partial(StopStringCriteria(self.tokenizer, list(strings)), scores=None)  # (new tokens)
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            real = real.repeat_interleave(num_return_sequences, dim=0)
        with exclusive(*self._bases()), root_gathered(self), checkpointing_paused(self):
            for role, base in self._decoding_bases(mode if prompt_budget or budget else None).items():
                check_engine_support(base, role)
            out = run_engine(self, input_ids, real.long(), max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_k=top_k or None, top_p=top_p, generator=generator,
                             eos_ids=eos_ids, trigger_mode=mode, prompt_budget=prompt_budget, budget=budget,
                             repetition_penalty=float(repetition_penalty), streamer=streamer, stop=stop,
                             synced_ranks=bool(synced_ranks), pad_id=int(pad), output_latents=output_latents,
                             min_new_tokens=min_new_tokens, min_p=float(min_p) if min_p else None)
        return out if return_dict_in_generate else out.sequences

    def _decoding_bases(self, mode: str | None) -> dict[str, PreTrainedModel]:
        """The distinct base models a generate call with trigger mode `mode` (None: memory off) runs, by role."""
        bases = {"reasoner": self.reasoner}
        if mode is not None:
            bases["weaver's base"] = self.weaver.model
        if mode == "lora":
            bases["trigger's base"] = self.trigger.model
        distinct = {}
        for role, base in bases.items():
            if all(base is not other for other in distinct.values()):
                distinct[role] = base
        return distinct

    def _check_generate_inputs(self, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                               top_p, generator, latents: int, min_p: Any = None) -> torch.Tensor:
        """The real-token mask [B, L], after checking every argument; `latents`: the most a row can weave."""
        real = self._check_token_batch(input_ids, attention_mask)
        device = self.device
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and _indexed(generator.device) != device:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}")
        counts = real.sum(1)
        positions = torch.arange(real.shape[1], device=device)
        first = torch.where(real, positions, real.shape[1]).min(1).values
        if not torch.equal(real, (positions >= first[:, None]) & (positions < (first + counts)[:, None])):
            raise ValueError("each row's tokens must be contiguous (left or right padding only)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if do_sample and not _positive_finite(temperature):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0 or None: no top-k filtering, as in Hugging Face), got "
                             f"{top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float))
                                  or not 0 <= min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] (or None), got {min_p!r}")
        settings = (("temperature", temperature, (1.0,)), ("top_k", top_k, (None, 0)), ("top_p", top_p, (None, 1.0)),
                    ("min_p", min_p, (None, 0, 0.0)))
        unused = {name: value for name, value, no_op in settings if value not in no_op}
        if not do_sample and unused:  # as Hugging Face's generate warns: the caller may have meant to sample
            warnings.warn(f"do_sample=False decodes greedily, so {unused} are not used; pass do_sample=True to sample "
                          "with them", UserWarning, stacklevel=3)
        limits = [("the reasoner's context", getattr(text_config(self.reasoner), "max_position_embeddings", None), "")]
        for part, lm in (("reasoner", self.reasoner), ("weaver", self.weaver.model),
                         ("trigger", getattr(self.trigger, "model", None))):
            if lm is not None and not applies_windows(lm.get_decoder()):
                limits.append((f"the {part}'s sliding attention window", sliding_window(text_config(lm)),
                               f", which the decoding engine cannot apply to {type(lm.get_decoder()).__name__}"))
        for what, limit, why in limits:
            if limit is not None and int(counts.max()) + max_new_tokens + latents > limit:
                raise ValueError(f"prompt ({int(counts.max())} tokens) + max_new_tokens ({max_new_tokens}) + latents "
                                 f"({latents}) exceed {what} of {limit} positions{why}")
        return real

    @staticmethod
    def _output(logits: torch.Tensor, labels: torch.Tensor | None, points: torch.Tensor) -> MemGenOutput:
        logits = _differentiable(logits)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return MemGenOutput(loss=loss, logits=logits, augmentation_points=points)

    def _conversation_logits(self, input_ids: torch.Tensor, real: torch.Tensor, labels: torch.Tensor,
                             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One single-turn sub-row per assistant turn, all run as one batch, then merged back."""
        batch, length = input_ids.shape
        device = input_ids.device
        columns = torch.arange(length, device=device)
        sub_rows, sub_ends, sub_spans, sub_prompt = [], [], [], []
        source = torch.zeros(batch, length, dtype=torch.long, device=device)  # sub-row giving logits[b, j]
        for b, spans in enumerate(answer_spans(real, labels)):
            with_prompt = prompt_turns(len(spans), self.config.max_prompt_aug_num, generator)
            start = 0
            for t, (span_start, span_end) in enumerate(spans):
                last = t == len(spans) - 1
                stop = length if last else span_end - 1  # logits[j] predict token j + 1
                source[b, start:stop] = len(sub_rows)
                start = stop
                sub_rows.append(b)
                sub_ends.append(length if last else span_end)
                sub_spans.append((span_start, span_end))
                sub_prompt.append(t in with_prompt)
        rows = torch.tensor(sub_rows, device=device)
        sub_real = real[rows] & (columns[None, :] < torch.tensor(sub_ends, device=device)[:, None])
        span_bounds = torch.tensor(sub_spans, device=device)
        in_span = (columns[None, :] >= span_bounds[:, :1]) & (columns[None, :] < span_bounds[:, 1:])
        sub_labels = torch.where(in_span, labels[rows], -100)
        points = default_points(input_ids[rows], sub_real, sub_labels, self.delimiter_table, 1,
                                self.config.max_inference_aug_num)
        no_prompt = ~torch.tensor(sub_prompt, device=device)
        points[no_prompt[:, None] & (points == PROMPT_POINT)] = 0
        sub_logits = self._interleaved_logits(input_ids[rows], sub_real, points)
        logits = sub_logits[source, columns[None, :]] * real[..., None].to(sub_logits.dtype)
        merged_points = torch.zeros_like(input_ids)
        for n, b in enumerate(sub_rows):
            merged_points[b] = torch.where(in_span[n], points[n], merged_points[b])
        return logits, merged_points

    def _trigger_logits(self, input_ids: torch.Tensor, real: torch.Tensor, labels: torch.Tensor | None,
                        augmentation_points: Any) -> torch.Tensor:
        """[B, L, 2] float32: the trigger's [SKIP, INVOKE] logits after reading token j, as generation computes
        them. `lora`: its adapted model over the token ids alone, positions from each row's first token.
        `head`: its head on the reasoner's hidden state of token j in the stream with the latents woven at
        `augmentation_points` (which generation recorded); only the head takes gradients. That stream is woven in
        eval mode, as generation weaves it: in training mode the frozen weaver's LoRA dropout would otherwise
        give the head other hidden states than the ones its decisions were sampled from."""
        if self.trigger is None:
            raise ValueError("trigger_logits=True needs a model built with MemGenConfig(trigger_mode='lora' or 'head')")
        if self.trigger.mode == "lora":
            positions = (real.long().cumsum(1) - 1).clamp(min=0)
            return self.trigger(input_ids, real.long(), positions)
        if labels is None or augmentation_points is None:
            raise ValueError("the `head` trigger's logits need labels and the augmentation_points generation recorded "
                             "(its hidden states depend on the latents woven before each token)")
        points = explicit_points(augmentation_points, real, labels)
        with torch.no_grad(), evaluating(self):  # the frozen weaver weaves as in generation: no LoRA dropout
            hidden, item_index, _ = self._interleaved_hidden(input_ids, real, points)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        token_hidden = hidden[rows[:, None], torch.where(real, item_index, 0)]
        return self.trigger.head_logits(token_hidden) * real[..., None]

    def _latents_per_point(self, points: torch.Tensor) -> torch.Tensor:
        k_prompt, k_inference = self.config.prompt_latents_len, self.config.inference_latents_len
        return torch.where(points == PROMPT_POINT, k_prompt, torch.where(points == INFERENCE_POINT, k_inference, 0))

    def _interleaved_logits(self, input_ids: torch.Tensor, real: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        hidden, item_index, n_latents = self._interleaved_hidden(input_ids, real, points)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = logits_function(self.reasoner)(hidden[rows[:, None], _predicting_items(real, item_index, n_latents)])
        return logits * real[..., None].to(logits.dtype)

    def _token_logps(self, input_ids: torch.Tensor, real: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                     chunk_size: int, temperature: float) -> torch.Tensor:
        """[B, L] float32 log-probabilities of the labelled tokens under the logits / `temperature`, the LM head run
        chunk by chunk."""
        hidden, item_index, n_latents = self._interleaved_hidden(input_ids, real, points)
        read_at = _predicting_items(real, item_index, n_latents)
        scored = torch.zeros_like(real)
        scored[:, 1:] = (labels[:, 1:] != -100) & real[:, 1:]
        rows, cols = scored.nonzero(as_tuple=True)
        states, targets = hidden[rows, read_at[rows, cols - 1]], input_ids[rows, cols]
        head = logits_function(self.reasoner)

        def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(head(h).float() / temperature, -1).gather(-1, t[:, None]).squeeze(-1)

        def run(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():  # keep only h: backward recomputes this chunk's logits
                return recompute_in_backward(chunk_logps, h, t, use_reentrant=False)
            return chunk_logps(h, t)

        starts = range(0, targets.shape[0], chunk_size)
        pieces = [run(states[i:i + chunk_size], targets[i:i + chunk_size]) for i in starts]
        logps = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
        logps = logps.index_put((rows, cols), torch.cat(pieces) if pieces else logps.new_zeros(0))
        if self._ranks_in_step():  # as many LM-head calls as the rank with the most chunks
            for _ in range(ranks_max([len(pieces)], real.device)[0] - len(pieces)):
                logps = logps + 0 * run(hidden[:1, 0], targets.new_zeros(1)).sum()
        return logps

    def _interleaved_hidden(self, input_ids: torch.Tensor, real: torch.Tensor,
                            points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reasoner's final hidden states [B, S, d_R] over the interleaved stream (tokens and the latents
        woven at `points`), each token's index in it [B, L], and the latents woven before each token [B, L]."""
        batch, length = input_ids.shape
        device = input_ids.device
        rows = torch.arange(batch, device=device)
        tokens = self.reasoner.get_input_embeddings()(input_ids)  # [B, L, d_R]
        n_latents = self._latents_per_point(points)  # latents woven before token j
        # stream index of each token: its rank among the row's tokens plus the latents before it
        item_index = real.long().cumsum(1) - 1 + n_latents.cumsum(1)
        stream_len = real.sum(1) + n_latents.sum(1)
        stream = tokens.new_zeros(batch, int(stream_len.max()), tokens.shape[-1])
        tok_b, tok_j = real.nonzero(as_tuple=True)
        stream = stream.index_put((tok_b, item_index[tok_b, tok_j]), tokens[tok_b, tok_j])

        has_point = points != 0
        point_rank = has_point.long().cumsum(1) - 1
        kinds = ((PROMPT, PROMPT_POINT), (INFERENCE, INFERENCE_POINT))
        called = self._weaver_calls(points, point_rank)
        prefixes = self._prefix_cache(stream) if called.shape[0] else None
        for round_ in range(called.shape[0]):
            at_round = has_point & (point_rank == round_)
            for kind_index, (kind, code) in enumerate(kinds):
                pb, pj = (at_round & (points == code)).nonzero(as_tuple=True)
                if pb.numel() == 0:
                    if called[round_, kind_index]:  # another rank weaves here: the same calls, on a dummy
                        dummy = self._weave(stream, rows[:1], torch.ones_like(stream_len[:1]), kind)
                        stream = stream + 0 * dummy.sum().to(stream.dtype)
                    continue
                k = self.weaver.num_latents(kind)
                prefix_len = item_index[pb, pj] - k  # items before this weave's latents
                latents = self._weave(stream, pb, prefix_len, kind, prefixes)
                slots = prefix_len[:, None] + torch.arange(k, device=device)
                stream = stream.index_put((pb[:, None].expand(-1, k), slots), latents.to(stream.dtype))

        positions = torch.arange(stream.shape[1], device=device).expand(batch, -1)
        stream_mask = positions < stream_len[:, None]
        hidden = self.reasoner.get_decoder()(inputs_embeds=stream, attention_mask=stream_mask.long(),
                                             position_ids=positions, use_cache=False).last_hidden_state
        return hidden, item_index, n_latents

    def _ranks_in_step(self) -> bool:
        """Whether every rank must make the same module calls: a sharded model under several processes
        (the cheap check first: a single process never walks the model's parameters)."""
        return distributed() and sharding_of(self) is not None

    def _weaver_calls(self, points: torch.Tensor, point_rank: torch.Tensor) -> torch.Tensor:
        """bool [rounds, 2]: whether weaving round r calls the weaver for prompt (0) / inference (1) points;
        over all ranks when they must keep in step. Training under several processes, round 0 calls it for
        both kinds: every trainable tensor then gets a gradient on every rank, zero where it was not used,
        as DeepSpeed needs (ZeRO-1/2 reduce gradients in buckets that must match across ranks, ZeRO-3
        would apply the previous step's gradient to a tensor that got none)."""
        has_point = points != 0
        rounds = int(has_point.sum(1).max()) if points.numel() else 0
        in_step, every_kind = self._ranks_in_step(), torch.is_grad_enabled() and distributed()
        if in_step:
            rounds = ranks_max([rounds], points.device)[0]
        rounds = max(rounds, int(every_kind))
        called = torch.zeros(rounds, 2, dtype=torch.bool)
        kind = (points[has_point] == INFERENCE_POINT).long().cpu()
        called[point_rank[has_point].cpu(), kind] = True
        if in_step and rounds:
            called = torch.tensor(ranks_max(called.long().flatten().tolist(), points.device)).view(rounds, 2).bool()
        if every_kind:
            called[0] = True
        return called

    def _weave(self, stream: torch.Tensor, rows: torch.Tensor, prefix_len: torch.Tensor, kind: str,
               prefixes: PrefixCache | None = None) -> torch.Tensor:
        """Latents [G, K, d_R] for stream rows `rows`, each reading its first `prefix_len` items: those
        `prefixes` has not kept (all of them without it), then the queries.

        The items are left-padded to a common width so that every row's queries sit at the end.
        """
        k = self.weaver.num_latents(kind)
        start = prefixes.seen[rows] if prefixes is not None else torch.zeros_like(prefix_len)
        width = int((prefix_len - start).max())
        offsets = torch.arange(width, device=stream.device)
        source = prefix_len[:, None] - width + offsets[None, :]  # stream index of each item slot
        valid = source >= start[:, None]
        source = source.clamp(min=0)
        items = stream[rows[:, None], source]  # [G, width, d_R]
        weaver_dtype = self.weaver.model.get_input_embeddings().weight.dtype
        projected = self.reasoner_to_weaver(items) * valid[..., None]
        queries = self.weaver.queries(kind).expand(rows.shape[0], -1, -1)
        inputs = torch.cat([projected, queries], dim=1).to(weaver_dtype)
        mask = torch.cat([valid, valid.new_ones(rows.shape[0], k)], dim=1)
        positions = torch.cat([source, prefix_len[:, None] + torch.arange(k, device=stream.device)], dim=1)
        if prefixes is None:
            hidden = self.weaver(inputs, mask.long(), positions)
        else:
            call, visible = prefixes.prepare(rows)
            hidden = self.weaver(inputs, prefix_mask(start, visible, mask, inputs.dtype), positions, cache=call)
            prefixes.keep(call, torch.cat([valid, valid.new_zeros(rows.shape[0], k)], dim=1), prefix_len)
        return self.weaver_to_reasoner(hidden[:, -k:])

    def _prefix_cache(self, stream: torch.Tensor) -> PrefixCache | None:
        """A weaver cache across this forward's rounds (`memgen.prefix_cache`) where it gives what re-reading each
        prefix gives; None where it may not: the weaver's LoRA dropout active (re-reading draws new masks for the
        prefix at every weave), activation checkpointing in its base that cannot keep a cache
        (`prefix_cache.cache_survives_checkpointing`), a sliding window that may bind, a decoder class the tests do
        not cover, or `rereading_prefixes()`."""
        if not prefix_cache.enabled():
            return None
        base = self.weaver.model
        decoder = base.get_decoder()
        if type(decoder).__name__ not in TESTED_DECODERS or not type(decoder).__module__.startswith("transformers."):
            return None
        window = sliding_window(decoder.config)
        longest = stream.shape[1] + max(self.weaver.num_latents(PROMPT), self.weaver.num_latents(INFERENCE))
        if window is not None and longest > window:
            return None
        if not prefix_cache.cache_survives_checkpointing(decoder):
            return None
        adapter = self.weaver.adapter_name
        for layer in tuner_layers(base):
            dropouts = getattr(layer, "lora_dropout", {})
            dropout = dropouts[adapter] if adapter in dropouts else None
            if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                return None
        return PrefixCache(text_config(base).num_hidden_layers, stream.shape[0], stream.shape[1], stream.device)
