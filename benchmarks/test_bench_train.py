"""Training forward + backward: memgen's batched forward against the row-by-row reference.

Run: pytest benchmarks/test_bench_train.py --benchmark-json=benchmarks/results/train_cpu.json
Every row carries 6 points (the prompt point and 5 inference points), K = 8 latents each.
"""

from __future__ import annotations

import pytest
import torch

from memgen import MemGenConfig, MemGenModel
from memgen.reference import reference_forward
from offline import chat_tokenizer, tiny_causal_lm
from test_modeling import make_batch

HIDDEN, LAYERS = 256, 4


@pytest.fixture(scope="module")
def model():
    tok = chat_tokenizer()
    reasoner = tiny_causal_lm("qwen2", len(tok), hidden_size=HIDDEN, layers=LAYERS)
    config = MemGenConfig(max_inference_aug_num=5, weaver_lora={"lora_dropout": 0.0})
    return MemGenModel.from_reasoner(reasoner, tok, config).eval()


@pytest.mark.parametrize("impl", ["memgen", "reference"])
@pytest.mark.parametrize("batch", [1, 8])
def test_forward_backward(benchmark, model, impl, batch):
    torch.set_num_threads(2)
    input_ids, mask, labels = make_batch(model, [7] * batch, "left", seed=batch)
    points = model(input_ids, mask, labels).augmentation_points
    assert ((points != 0).sum(1) == 6).all()

    def step():
        model.zero_grad(set_to_none=True)
        if impl == "memgen":
            loss = model(input_ids, mask, labels).loss
        else:
            loss, _ = reference_forward(model, input_ids, mask, labels)
        loss.backward()

    step()
    benchmark.extra_info.update(impl=impl, batch=batch, points_per_row=6, hidden=HIDDEN, layers=LAYERS,
                                tokens=int(mask.sum()), torch=torch.__version__)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
