"""The memory trigger: decides INVOKE or SKIP at a decision point.

- `lora` (the reference behaviour): a LoRA adapter on a causal LM reads the token ids generated so
  far; `output_layer` (Linear(d, 2)) on the final-norm hidden state of the last position gives
  [SKIP, INVOKE] logits.
- `head`: `output_layer` (Linear(d_R, 2)) on the reasoner's own final-norm hidden state of the
  delimiter token; no extra forward pass.
- `always`: no module (every decision point invokes).
"""

from __future__ import annotations

import torch
from torch import nn

from memgen.adapters import active_adapter
from memgen.projection import Projection


class MemGenTrigger(nn.Module):
    adapter_name = "trigger"

    def __init__(self, mode: str, hidden_size: int, base: nn.Module | None = None,
                 device: torch.device | str | None = None) -> None:
        """`device`: where the output layer goes (the `lora` base's or the reasoner's hidden states' device)."""
        super().__init__()
        self.mode = mode
        if mode == "lora":
            if base is None:
                raise ValueError("a `lora` trigger needs a base model")
            self.model = base
        self.output_layer = Projection(hidden_size, 2, device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """`lora` mode: [SKIP, INVOKE] logits (in the output layer's dtype, float32 unless cast) at every position of `input_ids` [B, T]."""
        if self.mode != "lora":
            raise RuntimeError(f"the trigger's forward over token ids exists in mode 'lora', not {self.mode!r}")
        with active_adapter(self.model, self.adapter_name):
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False).last_hidden_state
        return self.output_layer(hidden)

    def head_logits(self, reasoner_hidden: torch.Tensor) -> torch.Tensor:
        """`head` mode: [SKIP, INVOKE] logits (the output layer's dtype) from reasoner hidden states [..., d_R]."""
        return self.output_layer(reasoner_hidden)
