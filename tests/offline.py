"""Offline building blocks for the tests: tokenizers trained on a small corpus, tiny random models."""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?\nNatalia sold 48/2 = 24 clips in May.",
    "First, compute the total. Then, subtract 3.5 from it, giving 12.25.\n\nSo the answer is 8.",
    "Émile paid 3,000 € for the café; naïve estimates said 2.5k.\n",
    "def f(x):\n    return x, x + 1.\n",
    "Überraschung! 东京 is a city, 大阪 too. Ψ, ω and ∑ appear, then a newline.\n",
    "Step 1: read. Step 2: think, carefully, about it.\nStep 3: answer.",
] * 4


# The split pattern of Qwen2's tokenizer: punctuation runs keep their trailing newlines, so merged
# tokens such as ".\n" exist.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """Qwen2 style: regex split, byte-level pre-tokenizer and decoder, merges learned on the corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """Llama style: '▁' for spaces, BPE with byte fallback (<0x0A> for newline), Strip decoder."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json_model(learner)
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def json_model(tok: Tokenizer) -> dict:
    return json.loads(tok.to_str())["model"]




@functools.lru_cache(maxsize=1)
def _chat_tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose pad token is not its EOS (a fresh copy: tests may change it)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_chat_tokenizer().backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|pad|>")
    return tok


ARCHITECTURES = ("qwen2", "qwen3", "llama")


def tiny_causal_lm(arch: str, vocab_size: int, hidden_size: int = 64, seed: int = 0, layers: int = 2):
    """A random tiny causal LM of a supported architecture (float32, eval mode)."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden_size // 4, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def save_base(model, path) -> None:
    """Save a MemGen model's reasoner and tokenizer as a base loadable by name: its bare weights, under the names it
    was loaded with (saved as it is, PEFT's LoRA layers inside it would give `base_layer` names, which a fresh load
    does not take: it would initialise those projections anew)."""
    from memgen.adapters import BareBase

    with BareBase(model.reasoner)():
        model.reasoner.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
