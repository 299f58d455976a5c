"""End-to-end decoding: memgen with memory against the same engine without it, Hugging Face
`generate`, and the reference algorithm.

Run: pytest benchmarks/test_bench_decode.py --benchmark-json=benchmarks/results/decode_cpu.json
then `python benchmarks/report.py benchmarks/results/decode_cpu.json`.

- Overhead (issue #4's first target): a Qwen2-shaped model (hidden 256, 4 layers) whose LM head
  is nudged towards delimiter tokens so that memory is woven; greedy, 256 new tokens, batch 1 and
  16. Each memory-on round is preceded by one round of the engine with memory off and one of
  Hugging Face `generate`, so `over_memory_off` and `over_hf_generate` are ratios of medians
  measured side by side, interleaved (this VM's speed drifts by 10-20% over minutes). Hugging Face
  runs on the bare reasoner (memgen's LoRA layers swapped out), as users run it without memgen.
- Against the reference (the second target): a 37M-parameter Qwen2-shaped model, `lora` trigger
  invoking at about 1 decision point in 10 (its head is set to P(invoke) = 0.1), delimiters at
  about 1 token in 8 (a logit bias), sampling, 512 new tokens, batch 1. The reference's rounds
  alternate with the engine's (`over_memgen_lora`: the reference's time over memgen's).
EOS is a token the models never emit, so every configuration decodes the same number of tokens.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from memgen import MemGenConfig, MemGenModel
from memgen.adapters import BareBase
from memgen.reference import reference_generate
from offline import chat_tokenizer, tiny_causal_lm
from test_modeling import make_batch

HIDDEN, LAYERS = 256, 4


@pytest.fixture(scope="module")
def model():
    tok = chat_tokenizer()
    reasoner = tiny_causal_lm("qwen2", len(tok), hidden_size=HIDDEN, layers=LAYERS)
    model = MemGenModel.from_reasoner(reasoner, tok, MemGenConfig(weaver_lora={"lora_dropout": 0.0},
                                                                  trigger_mode="head")).eval()
    with torch.no_grad():
        reasoner.get_output_embeddings().weight[model.delimiter_table.nonzero().flatten()] *= 1.5
    return model


def _insertions(augmentation_mask: torch.Tensor | None) -> float:
    if augmentation_mask is None:
        return 0.0
    return float((augmentation_mask == 1).sum(1).float().mean())


CASES = [(impl, batch) for batch in (1, 16) for impl in ("hf_generate", "memgen_memory_off", "memgen_always",
                                                         "memgen_head")]


@pytest.mark.parametrize("impl,batch", CASES, ids=[f"{i}-B{b}" for i, b in CASES])
def test_decode(benchmark, model, impl, batch):
    torch.set_num_threads(2)
    new_tokens = 256
    tok = model.tokenizer
    never = tok.convert_tokens_to_ids("<|im_start|>")
    input_ids, mask, _ = make_batch(model, [0] * batch, "left", seed=batch)
    bare = BareBase(model.reasoner)

    def hf_generate():  # on the bare reasoner, as users run it today (without memgen's LoRA layers)
        with bare():
            return model.reasoner.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, eos_token_id=never,
                                           pad_token_id=tok.pad_token_id)

    runs = {
        "hf_generate": hf_generate,
        "memgen_memory_off": lambda: model.generate(input_ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
                                                    memory=False, return_dict_in_generate=True),
        "memgen_always": lambda: model.generate(input_ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
                                                trigger_mode="always", return_dict_in_generate=True),
        "memgen_head": lambda: model.generate(input_ids, mask, max_new_tokens=new_tokens, eos_token_id=never,
                                              trigger_mode="head", return_dict_in_generate=True),
    }
    result = runs[impl]()
    benchmark.extra_info.update(impl=impl, batch=batch, new_tokens=new_tokens, hidden=HIDDEN, layers=LAYERS,
                                insertions_per_row=_insertions(getattr(result, "augmentation_mask", None)),
                                torch=torch.__version__)
    baselines: dict[str, list[float]] = {"memgen_memory_off": [], "hf_generate": []}

    def run_baselines():  # one round of each baseline before each measured round
        for name, times in baselines.items():
            start = time.perf_counter()
            runs[name]()
            times.append(time.perf_counter() - start)

    interleave = impl.startswith("memgen_") and impl != "memgen_memory_off"
    benchmark.pedantic(runs[impl], setup=run_baselines if interleave else None, rounds=9, iterations=1,
                       warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = batch * new_tokens / median
    if interleave:
        for name, times in baselines.items():
            benchmark.extra_info[f"over_{name.removeprefix('memgen_')}"] = median / statistics.median(times)


@pytest.fixture(scope="module")
def lora_model():
    """37M parameters; P(invoke) = 0.1 at each decision point; delimiters about 1 token in 8."""
    tok = chat_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    reasoner = Qwen2ForCausalLM(config).eval()
    model = MemGenModel.from_reasoner(reasoner, tok, MemGenConfig(
        trigger_mode="lora", weaver_lora={"lora_dropout": 0.0}, trigger_lora={"lora_dropout": 0.0})).eval()
    delimiters = model.delimiter_table.nonzero().flatten()
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(reasoner.lm_head.weight)
        head.bias.zero_()
        # near-uniform random logits: delimiters then take ~1/8 of the probability mass
        share = 1 / 8
        head.bias[delimiters] = math.log(share / (1 - share) * (config.vocab_size - len(delimiters)) / len(delimiters))
        model.trigger.output_layer.weight.zero_()
        model.trigger.output_layer.bias.copy_(torch.tensor([0.0, -math.log(9)]))
    reasoner.lm_head = head
    return model


LORA_CASES = ["memgen_lora", "reference_lora"]


@pytest.mark.parametrize("impl", LORA_CASES)
def test_lora_trigger_against_the_reference(benchmark, lora_model, impl):
    torch.set_num_threads(2)
    new_tokens = 512
    model = lora_model
    never = model.tokenizer.convert_tokens_to_ids("<|im_start|>")
    input_ids, mask, _ = make_batch(model, [0], "left", seed=1)
    kwargs = dict(max_new_tokens=new_tokens, eos_token_id=never, do_sample=True)

    def run_with(name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        if name == "memgen_lora":
            out = model.generate(input_ids, mask, generator=generator, return_dict_in_generate=True, **kwargs)
            return out.augmentation_mask
        return reference_generate(model, input_ids, mask, generator=generator, **kwargs)[1]

    def run() -> torch.Tensor:
        return run_with(impl)

    decisions = run()
    params = sum(p.numel() for p in model.reasoner.parameters())
    benchmark.extra_info.update(impl=impl, batch=1, new_tokens=new_tokens, parameters_m=round(params / 1e6, 1),
                                insertions_per_row=_insertions(decisions),
                                decision_points=int((decisions >= 0).sum()), torch=torch.__version__)
    engine_times: list[float] = []

    def run_engine():  # the reference's rounds alternate with the engine's, for a side-by-side ratio
        start = time.perf_counter()
        run_with("memgen_lora")
        engine_times.append(time.perf_counter() - start)

    reference = impl == "reference_lora"
    benchmark.pedantic(run, setup=run_engine if reference else None, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tokens_per_s"] = new_tokens / benchmark.stats.stats.median
    if reference:
        benchmark.extra_info["over_memgen_lora"] = benchmark.stats.stats.median / statistics.median(engine_times)
