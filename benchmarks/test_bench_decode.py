"""End-to-end decoding: memgen with memory against the same engine without it, Hugging Face
`generate`, and (at batch 1, fewer tokens) the reference algorithm.

Run: pytest benchmarks/test_bench_decode.py --benchmark-json=benchmarks/results/decode_cpu.json
The model is Qwen2-shaped (hidden 256, 4 layers), its LM head nudged towards delimiter tokens so
that memory is actually woven; `extra_info` records the insertions made per row. EOS is a token
the model never emits, so every configuration decodes the same number of tokens.
"""

from __future__ import annotations

import pytest
import torch

from memgen import MemGenConfig, MemGenModel
from memgen.reference import reference_generate
from offline import chat_tokenizer, tiny_causal_lm
from test_modeling import make_batch

HIDDEN, LAYERS = 256, 4


@pytest.fixture(scope="module")
def model():
    tok = chat_tokenizer()
    reasoner = tiny_causal_lm("qwen2", len(tok), hidden_size=HIDDEN, layers=LAYERS)
    model = MemGenModel.from_reasoner(reasoner, tok, MemGenConfig(weaver_lora={"lora_dropout": 0.0})).eval()
    with torch.no_grad():
        reasoner.get_output_embeddings().weight[model.delimiter_table.nonzero().flatten()] *= 1.5
    return model


CASES = [(impl, batch, 256) for batch in (1, 16) for impl in ("hf_generate", "memgen_memory_off", "memgen_always")]
CASES += [(impl, 1, 64) for impl in ("memgen_always", "reference_always")]


@pytest.mark.parametrize("impl,batch,new_tokens", CASES, ids=[f"{i}-B{b}-T{t}" for i, b, t in CASES])
def test_decode(benchmark, model, impl, batch, new_tokens):
    torch.set_num_threads(2)
    tok = model.tokenizer
    never = tok.convert_tokens_to_ids("<|im_start|>")
    input_ids, mask, _ = make_batch(model, [0] * batch, "left", seed=batch)
    runs = {
        "hf_generate": lambda: model.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, do_sample=False,
                                                       eos_token_id=never, pad_token_id=tok.pad_token_id),
        "memgen_memory_off": lambda: model.generate(input_ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
                                                    memory=False, return_dict_in_generate=True),
        "memgen_always": lambda: model.generate(input_ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
                                                return_dict_in_generate=True),
        "reference_always": lambda: reference_generate(model, input_ids, mask, max_new_tokens=new_tokens,
                                                       eos_token_id=never),
    }
    result = runs[impl]()
    aug = getattr(result, "augmentation_mask", None)
    if impl == "reference_always":
        aug = result[1]
    insertions = float((aug == 1).sum(1).float().mean()) if aug is not None else 0.0
    benchmark.extra_info.update(impl=impl, batch=batch, new_tokens=new_tokens, hidden=HIDDEN, layers=LAYERS,
                                insertions_per_row=insertions, torch=torch.__version__)
    benchmark.pedantic(runs[impl], rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tokens_per_s"] = batch * new_tokens / benchmark.stats.stats.median
