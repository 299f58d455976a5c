"""The memory weaver: a LoRA adapter on a causal LM plus two learnable query sets.

Weave(stream, kind) runs the weaver's decoder on [reasoner_to_weaver(stream items); queries]
with positions continuing the stream's and returns its final-norm hidden states at the K query
positions (MemGenModel maps them to the reasoner's space with `weaver_to_reasoner`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from memgen.adapters import active_adapter
from memgen.attention import attention_implementation, mask_attention
from memgen.layer_stack import cache_keyword, input_device, text_config
from memgen.prefix_cache import kept_under_checkpointing

PROMPT, INFERENCE = "prompt", "inference"


class MemGenWeaver(nn.Module):
    """Queries (`Q_prompt` K_p x d, `Q_infer` K_i x d), their LayerNorms and scales, and the adapted base."""

    adapter_name = "weaver"

    def __init__(self, base: nn.Module, prompt_latents_len: int, inference_latents_len: int) -> None:
        super().__init__()
        self.model = base  # may be the reasoner itself: one copy of the weights
        hidden = text_config(base).hidden_size
        # Trained: float32 whatever torch's default dtype, as the adapters are. Drawn on the CPU (one seed, the same
        # queries on every device), then placed beside the base's embeddings, where the weaver's inputs are.
        f32, device = torch.float32, input_device(base)
        self.prompt_query_latents = nn.Parameter(torch.randn(prompt_latents_len, hidden, dtype=f32).to(device))
        self.inference_query_latents = nn.Parameter(torch.randn(inference_latents_len, hidden, dtype=f32).to(device))
        self.prompt_latent_ln = nn.LayerNorm(hidden, dtype=f32, device=device)
        self.inference_latent_ln = nn.LayerNorm(hidden, dtype=f32, device=device)
        self.prompt_latent_scale = nn.Parameter(torch.ones(1, dtype=f32, device=device))
        self.inference_latent_scale = nn.Parameter(torch.ones(1, dtype=f32, device=device))

    @property
    def hidden_size(self) -> int:
        return self.prompt_query_latents.shape[1]

    def num_latents(self, kind: str) -> int:
        return (self.prompt_query_latents if kind == PROMPT else self.inference_query_latents).shape[0]

    def queries(self, kind: str) -> torch.Tensor:
        """LayerNorm(Q_kind) * scale_kind: float32 [K, d_W]."""
        if kind == PROMPT:
            return self.prompt_latent_ln(self.prompt_query_latents) * self.prompt_latent_scale
        return self.inference_latent_ln(self.inference_query_latents) * self.inference_latent_scale

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d_W] of the adapted decoder over `inputs_embeds` [B, T, d_W].

        attention_mask: [B, T] (1: a real item); with `cache` (a call's view of the items' rows' earlier items,
        `memgen.prefix_cache.PrefixCache.prepare`), the additive [B, 1, T, seen + T] of
        `memgen.prefix_cache.prefix_mask`, which runs under an attention that applies it.
        """
        decoder = self.model.get_decoder()
        if cache is None:
            with active_adapter(self.model, self.adapter_name):
                return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        with active_adapter(self.model, self.adapter_name), kept_under_checkpointing(decoder), \
                attention_implementation(decoder.config, mask_attention(decoder)):
            return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **{cache_keyword(type(decoder)): cache}).last_hidden_state
