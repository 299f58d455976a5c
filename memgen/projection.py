"""The linear layers memgen trains beside its bases (the weaver's projections, the trigger's output layer).

They are float32 under a bfloat16 base, and their inputs (a base's hidden states) are cast to float32
for them. A model cast whole to another dtype (DeepSpeed's bf16 and fp16 modes do this; FSDP's mixed
precision does it for each forward) makes them bfloat16 too: a float32 input then fails the matrix
product. So they cast their input to their own weights' dtype inside their forward, where a sharded
or mixed-precision weight already has the dtype it computes in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Projection(nn.Linear):
    """nn.Linear computing in its weights' dtype, whatever its input's; made float32 whatever torch's default dtype
    (a program that set it to bfloat16 would otherwise train these in bfloat16). Its initial values are drawn on the
    CPU, so that a seed gives the same layer on every device, and then moved to `device`."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, dtype=torch.float32)
        if device is not None:
            self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
