"""Probing latents: which of the reasoner's tokens a woven latent lies nearest to.

The weaver writes its latents into the reasoner's input space, where the token embeddings also live,
so the nearest tokens by cosine similarity are a first look at what a latent carries. They are a probe,
not a decoding: a latent need not lie near any token (the similarities say how near it is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


def nearest_tokens(model: Any, latents: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, token ids), each [..., k], best first: the k tokens whose input embeddings (the
    reasoner's, `model.reasoner`) are nearest to each latent [..., d], e.g. one of `generate(...,
    output_latents=True).latents`' tensors."""
    embeddings = model.reasoner.get_input_embeddings().weight
    vocab, width = embeddings.shape
    if not isinstance(latents, torch.Tensor) or latents.dim() < 1 or latents.shape[-1] != width:
        raise ValueError(f"latents must be a tensor [..., {width}] (the reasoner's input width), got "
                         f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary's size), got {k!r}")
    with torch.no_grad():
        similarity = F.normalize(latents.float(), dim=-1).to(embeddings.device) @ F.normalize(embeddings.float(),
                                                                                                 dim=-1).T
        return similarity.topk(k, dim=-1)
