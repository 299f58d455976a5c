"""Driving a Hugging Face decoder's layers directly, for the decoding engine's many small calls.

A decoder's `forward` (e.g. `Qwen2Model.forward`) wraps its layer loop in decorators that merge
config defaults and set up output capturing, and builds the attention mask. The engine passes a
ready 4D mask and explicit positions and wants only the last hidden state, so for the decoders whose
`forward` is exactly "rotary embedding, each layer, final norm" it calls those modules itself. The
layers are the model's own modules (LoRA wrappers, attention implementation and cache included),
so the result is the same tensor, without the wrappers' fixed cost on every call (see the decode
benchmark). Any other decoder, or one with hooks or sharded units, goes through its `forward`.

Sliding-window layers need a mask of their own. A call's mask is then a dict {layer kind: 4D mask}
(`FULL`, `SLIDING`): direct calls give each layer its kind's mask; through a forward, decoders that
take such a dict (`MASK_DICT_DECODERS`) get it whole, and decoders whose every layer slides get the
sliding one (Hugging Face uses a ready 4D mask as it is).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

# Decoders whose forward, given inputs_embeds, a 4D mask per layer kind and position ids, is rotary embedding ->
# layers -> norm (each checked against its forward in the tests).
DIRECT_DECODERS = ("CohereModel", "Exaone4Model", "Glm4Model", "HeliumModel", "LlamaModel", "MistralModel", "OlmoModel",
                   "Olmo2Model", "Phi3Model", "Qwen2Model", "Qwen2MoeModel", "Qwen3Model", "Qwen3MoeModel", "SeedOssModel",
                   "SmolLM3Model")

# Decoders whose forward takes a dict {layer kind: 4D mask} as its attention mask (in transformers 5.4 and later).
MASK_DICT_DECODERS = ("Cohere2Model", "Exaone4Model", "Gemma2Model", "Gemma3TextModel", "GptOssModel", "MinistralModel",
                      "Qwen2Model", "Qwen2MoeModel", "Qwen3Model", "SmolLM3Model")

FULL, SLIDING = "full_attention", "sliding_attention"  # layer kinds, as Hugging Face's `layer_types` names them

Call = Callable[..., torch.Tensor]  # (items, mask, positions, cache, **attention keyword arguments) -> hidden
Mask = torch.Tensor | dict[str, torch.Tensor] | None  # one additive 4D mask for every layer, or one per layer kind


def sliding_window(config) -> int | None:
    """The attention window of `config`'s sliding-window layers (a query sees the keys less than a window
    before it), None when every layer attends to all positions."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window


def text_config(model: nn.Module):
    """The config of `model`'s language part: its own, or a multimodal model's text config (Gemma 3's
    `Gemma3ForConditionalGeneration`), whose decoder memgen drives."""
    return model.config.get_text_config()


def input_device(model: nn.Module) -> torch.device:
    """Where `model` reads its inputs: its token embeddings' device."""
    return model.get_input_embeddings().weight.device


def layer_kinds(config) -> tuple[str, ...]:
    """Each layer's kind (`FULL`, `SLIDING` or another that Hugging Face names, e.g. chunked attention)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return tuple(layer_types[: config.num_hidden_layers])
    return (SLIDING if sliding_window(config) is not None else FULL,) * config.num_hidden_layers


def applies_windows(decoder: nn.Module) -> bool:
    """Whether the engine's calls of `decoder` apply its sliding windows (a mask per layer kind): every layer is
    `FULL` or `SLIDING`, and the layers are driven directly (`direct_call`), or the forward takes a mask dict, or
    every layer slides (or none does)."""
    kinds = set(layer_kinds(decoder.config))
    if not kinds <= {FULL, SLIDING}:
        return False
    return len(kinds) == 1 or _takes_mask_dict(decoder) or direct_call(decoder) is not None


def _takes_mask_dict(decoder: nn.Module) -> bool:
    return type(decoder).__name__ in MASK_DICT_DECODERS and type(decoder).__module__.startswith("transformers.")


@functools.lru_cache(maxsize=None)
def cache_keyword(cls: type) -> str:
    """The keyword under which a decoder's (or its layer's) class takes the KV cache in `forward`: `cache` from
    transformers 5.24 on, where `past_key_values` is deprecated (to be removed in 5.40), else `past_key_values`.
    The first class in the method resolution order whose `forward` declares either name decides, so a subclass
    whose `forward` passes `**kwargs` on to its parent's gets the parent's name."""
    for klass in cls.__mro__:
        forward = klass.__dict__.get("forward")
        if forward is None:
            continue
        parameters = inspect.signature(forward).parameters
        for keyword in ("cache", "past_key_values"):
            if keyword in parameters:
                return keyword
    return "past_key_values"


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None))


def direct_call(decoder: nn.Module) -> Call | None:
    """(items, mask, positions, cache, ragged=None) -> last hidden state, through `decoder`'s layers directly
    (mask: a `Mask`; ragged: the `memgen.attention` groups of a call of one item per batch row, a dict of them per
    layer kind where the mask is one); None when `decoder` must run through its own forward (unknown class, hooks
    on the decoder, sharded units)."""
    config = decoder.config
    if type(decoder).__name__ not in DIRECT_DECODERS or not type(decoder).__module__.startswith("transformers.") \
            or _hooked(decoder):
        return None
    layers = list(decoder.layers[: config.num_hidden_layers])
    if any(isinstance(layer, (FSDPModule, FullyShardedDataParallel)) for layer in layers):
        return None  # the sharded layers' collectives stay under the decoder's forward, as FSDP arranged them
    rotary, norm, kinds = decoder.rotary_emb, decoder.norm, layer_kinds(config)
    keyword = cache_keyword(type(layers[0]))

    def call(items: torch.Tensor, mask: Mask, positions: torch.Tensor, cache, ragged=None) -> torch.Tensor:
        hidden = items
        position_embeddings = rotary(hidden, positions)
        if not isinstance(mask, dict):
            extra = {keyword: cache} if ragged is None else {keyword: cache, "ragged": ragged}
            for layer in layers:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                               position_ids=positions, use_cache=True, **extra)
            return norm(hidden)
        for layer, kind in zip(layers, kinds):
            extra = {keyword: cache} if ragged is None else {keyword: cache, "ragged": ragged[kind]}
            hidden = layer(hidden, attention_mask=mask[kind], position_embeddings=position_embeddings,
                           position_ids=positions, use_cache=True, **extra)
        return norm(hidden)

    return call


def forward_call(decoder: nn.Module) -> Call:
    """The same signature (without `ragged`) through `decoder`'s own forward (any decoder; a mask dict only where
    `applies_windows`)."""
    takes_dict = _takes_mask_dict(decoder)
    keyword = cache_keyword(type(decoder))

    def call(items: torch.Tensor, mask: Mask, positions: torch.Tensor, cache) -> torch.Tensor:
        if isinstance(mask, dict) and not takes_dict:
            mask = mask[SLIDING]  # every layer slides
        return decoder(inputs_embeds=items, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{keyword: cache}).last_hidden_state

    return call
