"""Shared test setup: every test seeded; Triton kernels interpreted on machines without a GPU."""

import os
import random

import pytest
import torch

# Must precede the first `import triton`: the interpreter is chosen when kernels are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield
