"""The reasoner's logits from its decoder's hidden states, as its own causal-LM forward computes them.

memgen runs the reasoner's decoder itself (ragged caches, latents in the stream), so it applies the output
head itself too. Most heads are the output embedding alone, but some architectures transform its logits in
their `forward`: Gemma 2 and 3 soft-cap them (`final_logit_softcapping`), Cohere scales them (`logit_scale`)
and Granite divides them (`logits_scaling`). Without the same transform, greedy decoding would not change
(each is increasing) but sampling and the training loss would use another distribution than the model's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def logits_function(causal_lm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [..., d] -> logits [..., V] of `causal_lm` (a Hugging Face causal LM): its output embedding, then
    its architecture's transform, in the order and dtype its forward applies them."""
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(causal_lm, "logit_scale", None)  # Cohere keeps config.logit_scale on the module
    scale = scale if isinstance(scale, (int, float)) and scale != 1 else None
    divisor = getattr(config, "logits_scaling", None)
    divisor = divisor if isinstance(divisor, (int, float)) and divisor != 1 else None
    if cap is None and scale is None and divisor is None:
        return head

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        if scale is not None:
            out = out * scale
        if divisor is not None:
            out = out / divisor
        return out

    return logits
