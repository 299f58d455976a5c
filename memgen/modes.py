"""Train/eval modes scoped to a block of code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


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
