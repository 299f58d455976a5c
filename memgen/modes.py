"""Module modes scoped to a block of code: eval mode, activation checkpointing paused, one caller at a time."""

from __future__ import annotations

import contextlib
import threading
import weakref
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


def checkpointed(module: nn.Module) -> bool:
    """Whether Hugging Face's activation checkpointing recomputes `module` (a decoder layer) in backward."""
    return isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing and module.training


@contextlib.contextmanager
def checkpointing_paused(module: nn.Module) -> Iterator[None]:
    """Within: Hugging Face's activation checkpointing off in `module`'s layers; each gets its setting back after.
    Decoding computes no gradients, so checkpointing would recompute nothing, while a checkpointed layer in train
    mode drops the KV cache it is passed (transformers before 5.24, which names it `past_key_values`): the decoding
    engine's calls would then attend to their own items only."""
    layers = [sub for sub in module.modules() if checkpointed(sub)]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


@contextlib.contextmanager
def exclusive(*modules: nn.Module) -> Iterator[None]:
    """Within: the calling thread alone runs code under `exclusive` for any of `modules` (a thread that asks for
    one of them meanwhile waits; the same thread may nest). Decoding swaps layers and attention settings on the
    model it runs for the call, so two threads decoding one model at once would run each other's settings."""
    with _LOCKS_LOCK:
        locks = [_LOCKS.setdefault(module, threading.RLock()) for module in {id(m): m for m in modules}.values()]
    locks.sort(key=id)  # one order for every caller: no two threads wait on each other
    with contextlib.ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        yield
