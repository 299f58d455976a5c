"""Module modes scoped to a block of code: eval mode, activation checkpointing paused."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Within: `module` and its submodules in eval mode; each gets its own mode back after (`train(was_training)`
    would instead give every submodule the top module's mode, undoing a user's frozen, eval-mode parts)."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


@contextlib.contextmanager
def checkpointing_paused(module: nn.Module) -> Iterator[None]:
    """Within: Hugging Face's activation checkpointing off in `module`'s layers; each gets its setting back after.
    Decoding computes no gradients, so checkpointing would recompute nothing, while a checkpointed layer in train
    mode drops the KV cache it is passed (transformers before 5.24, which names it `past_key_values`): the decoding
    engine's calls would then attend to their own items only."""
    layers = [sub for sub in module.modules()
              if isinstance(sub, GradientCheckpointingLayer) and sub.gradient_checkpointing]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True
