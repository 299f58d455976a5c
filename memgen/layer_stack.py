"""Driving a Hugging Face decoder's layers directly, for the decoding engine's many small calls.

A decoder's `forward` (e.g. `Qwen2Model.forward`) wraps its layer loop in decorators that merge
config defaults and set up output capturing, and builds the attention mask. The engine passes a
ready 4D mask and explicit positions and wants only the last hidden state, so for the decoders whose
`forward` is exactly "rotary embedding, each layer, final norm" it calls those modules itself. The
layers are the model's own modules (LoRA wrappers, attention implementation and cache included),
so the result is the same tensor, without the wrappers' fixed cost on every call (see the decode
benchmark). Any other decoder, or one with hooks or sharded units, goes through its `forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

# Decoders whose forward, given inputs_embeds, a 4D mask and position ids, is rotary embedding ->
# layers -> norm when no layer's sliding window binds (each checked against its forward in the tests).
DIRECT_DECODERS = ("CohereModel", "Exaone4Model", "Glm4Model", "HeliumModel", "LlamaModel", "MistralModel", "OlmoModel",
                   "Olmo2Model", "Phi3Model", "Qwen2Model", "Qwen2MoeModel", "Qwen3Model", "Qwen3MoeModel", "SeedOssModel",
                   "SmolLM3Model")

Call = Callable[..., torch.Tensor]  # (items, mask, positions, cache, **attention keyword arguments) -> hidden


def sliding_window(config) -> int | None:
    """The attention window of `config`'s sliding-window layers, None when every layer attends to all
    positions. The engine's explicit 4D masks do not apply a window (Hugging Face builds the sliding mask
    only from a 2D one), so generation refuses sequences longer than it."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None))


def direct_call(decoder: nn.Module, longest: int | None = None) -> Call | None:
    """(items, mask, positions, cache, **attention) -> last hidden state, through `decoder`'s layers directly
    (`attention`: keyword arguments for the attention function); None when `decoder` must run through its own
    forward (unknown class, sliding-window layers whose window may bind, hooks on the decoder, sharded units).

    longest: the most positions any sequence of the calls spans. A window at least that long never binds (a
    query sees the keys less than a window before it): every layer then takes the one causal mask. None: any
    window may bind.
    """
    config = decoder.config
    window = sliding_window(config)
    if (type(decoder).__name__ not in DIRECT_DECODERS or not type(decoder).__module__.startswith("transformers.")
            or (window is not None and (longest is None or longest > window)) or _hooked(decoder)):
        return None
    layers = list(decoder.layers[: config.num_hidden_layers])
    if any(isinstance(layer, (FSDPModule, FullyShardedDataParallel)) for layer in layers):
        return None  # the sharded layers' collectives stay under the decoder's forward, as FSDP arranged them
    rotary, norm = decoder.rotary_emb, decoder.norm

    def call(items: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, **attention) -> torch.Tensor:
        hidden = items
        position_embeddings = rotary(hidden, positions)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=positions, past_key_values=cache, use_cache=True, **attention)
        return norm(hidden)

    return call


def forward_call(decoder: nn.Module) -> Call:
    """The same signature through `decoder`'s own forward (any decoder)."""
    def call(items: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return decoder(inputs_embeds=items, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).last_hidden_state

    return call
