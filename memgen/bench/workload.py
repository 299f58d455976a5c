"""What `memgen bench` measures on: a reasoner (a preset or a Hugging Face model), memgen models
around it, and the prompts and training rows of the suites.

Two adjustments make every configuration do comparable, real work:
- the reasoner's EOS logit is pushed to -1e9 (a forward hook on its output embeddings, seen by the
  engine, the reference and Hugging Face `generate` alike), so every row decodes exactly the
  requested number of tokens;
- a random-weight preset (`small`, the Qwen2.5 shapes) would almost never emit a delimiter, so the
  same hook adds a bias that gives delimiter tokens about 1/8 of the probability mass when sampling
  from its near-uniform logits, and memory really is woven. The trained `tiny` preset and real
  models are left as they are.
Triggers (`lora`, `head`) get an output layer that invokes with probability 0.1 at each decision
point (decisions are sampled, like the tokens), the rate the engine issue's speed target names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from memgen import presets
from memgen.config import MemGenConfig
from memgen.delimiters import build_delimiter_table
from memgen.modeling import MemGenModel
from memgen.training.data import MemGenCollator

INVOKE_PROBABILITY = 0.1
DELIMITER_SHARE = 1 / 8
_NEVER = -1e9


@dataclass
class Workload:
    """A reasoner source and where to run it. Weights load only when a suite builds a model.

    name: the preset's name or the model path. synthetic: random weights (delimiters need a bias).
    """

    name: str
    config: PretrainedConfig
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    synthetic: bool
    _models: dict[tuple[str, int | None], MemGenModel] = field(default_factory=dict, repr=False)

    def load_reasoner(self) -> torch.nn.Module:
        """A freshly loaded reasoner in eval mode on the workload's device and dtype, with the logit hook."""
        if self.name in presets.PRESETS:
            model, _ = presets.load_preset(self.name, self.device, self.dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.name, dtype=self.dtype).to(self.device).eval()
        _install_logit_bias(model, self._logit_bias(model))
        return model

    def _logit_bias(self, model: torch.nn.Module) -> torch.Tensor:
        vocab = model.get_output_embeddings().weight.shape[0]
        bias = torch.zeros(vocab, device=self.device)
        bias[self.tokenizer.eos_token_id] = _NEVER
        if self.synthetic:
            table = build_delimiter_table(self.tokenizer, vocab_size=vocab).to(self.device)
            table[self.tokenizer.eos_token_id] = False
            n, others = int(table.sum()), int(((bias == 0) & ~table).sum())
            # near-uniform logits: a bias b on n tokens gives them n e^b / (n e^b + others) of the mass
            bias[table] = math.log(DELIMITER_SHARE / (1 - DELIMITER_SHARE) * others / n)
        return bias

    def memgen_model(self, trigger_mode: str, sliding_window: int | None = None) -> MemGenModel:
        """The workload's MemGen model with this trigger (built once, on its own reasoner: a base takes
        one set of adapters). LoRA dropout is 0; the trigger invokes with probability 0.1. Its fresh
        weights are drawn from a fixed seed (the global generator is left as it was), so every run of a
        benchmark decodes the same tokens and weaves at the same steps. sliding_window: a window of that many
        positions on every other layer of the reasoner (its config's `layer_types`; same weights)."""
        key = (trigger_mode, sliding_window)
        if key not in self._models:
            config = MemGenConfig(trigger_mode=trigger_mode, weaver_lora={"lora_dropout": 0.0},
                                  trigger_lora={"lora_dropout": 0.0})
            reasoner = self.load_reasoner()
            if sliding_window is not None:
                layers = reasoner.config.num_hidden_layers
                reasoner.config.sliding_window, reasoner.config.use_sliding_window = sliding_window, True
                reasoner.config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                               for i in range(layers)]
            with presets.fixed_seed(torch.device("cpu")):  # built on the CPU, then moved
                model = MemGenModel.from_reasoner(reasoner, self.tokenizer, config)
            model = model.to(self.device).eval()
            if model.trigger is not None:
                with torch.no_grad():
                    model.trigger.output_layer.weight.zero_()
                    logit = math.log(INVOKE_PROBABILITY / (1 - INVOKE_PROBABILITY))
                    model.trigger.output_layer.bias.copy_(torch.tensor([0.0, logit]))
            self._models[key] = model
        return self._models[key]


def _install_logit_bias(model: torch.nn.Module, bias: torch.Tensor) -> None:
    head = model.get_output_embeddings()

    def add_bias(module, args, output):
        return output + bias.to(output.dtype)

    head.register_forward_hook(add_bias)


def load_workload(preset: str | None = "tiny", model_path: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Workload:
    """A preset (random weights unless `tiny`, built offline) or a Hugging Face model directory or name."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but this torch sees no CUDA device")
    if model_path is not None:
        config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model_path {model_path!r}: its tokenizer has no EOS token")
        return Workload(str(model_path), config, tokenizer, device, dtype, synthetic=False)
    if preset not in presets.PRESETS:
        raise ValueError(f"preset must be one of {presets.PRESETS}, got {preset!r}")
    return Workload(preset, presets.preset_config(preset), presets.preset_tokenizer(), device, dtype,
                    synthetic=preset != "tiny")


def prompt_batch(workload: Workload, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` left-padded prompts of synthetic prose with different lengths (8 to 39 tokens)."""
    text_ids = workload.tokenizer(presets.synthetic_text(40, seed=batch))["input_ids"]
    rows = [text_ids[7 * b % 50:][: 8 + (13 * b) % 32] for b in range(batch)]
    padded = MemGenCollator(workload.tokenizer.pad_token_id)([{"input_ids": r, "labels": r} for r in rows])
    return padded["input_ids"].to(workload.device), padded["attention_mask"].to(workload.device)


def training_batch(workload: Workload, batch: int, points: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels) of `batch` prompt/answer rows, each answer with at least
    `points - 1` delimiters (the prompt point plus that many inference points)."""
    tok = workload.tokenizer
    table = build_delimiter_table(tok, vocab_size=workload.config.vocab_size)
    rows = []
    for b in range(batch):
        ids = tok(presets.synthetic_text(12, seed=100 + b))["input_ids"]
        prompt_len = 10 + 3 * b % 7
        answer = ids[prompt_len:]
        delimiters = table[torch.tensor(answer[:-1])].nonzero().flatten()
        if len(delimiters) < points - 1:
            raise ValueError(f"the training text has {len(delimiters)} delimiters, fewer than {points - 1}")
        answer = answer[: int(delimiters[points - 2]) + 1 + 8]  # 8 tokens past the last inference point
        rows.append({"input_ids": ids[:prompt_len] + answer, "labels": [-100] * prompt_len + answer})
    padded = MemGenCollator(tok.pad_token_id)(rows)
    return tuple(padded[k].to(workload.device) for k in ("input_ids", "attention_mask", "labels"))

