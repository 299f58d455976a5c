"""Model presets for benchmarks and demos: real architecture shapes, built offline.

- `tiny`: a 2-layer Qwen2-shaped model with its own byte-level BPE tokenizer, trained for a few
  seconds on punctuated synthetic text so that it emits delimiters at a realistic rate (about one
  token in 5 to 20) and memory really is woven. Built once per machine and cached (in
  `$MEMGEN_CACHE`, default `~/.cache/memgen`); the build is deterministic.
- `small`: Qwen2-shaped, hidden 512, 16 layers (37M parameters), random weights, the tiny tokenizer.
- `qwen2.5-0.5b`, `qwen2.5-1.5b`, `qwen2.5-7b`: those models' published shapes (hidden size, layers,
  heads, KV heads, MLP width, vocabulary), random weights: GPU numbers for a real shape without a
  download. Their vocabulary is the real one; token ids are drawn by the caller.

`load_preset(name, device, dtype)` returns (reasoner, tokenizer); `tokenizer` is None for the
shape-only presets.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

TINY_VERSION = "1"  # bump when the recipe below changes: the cache key
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_QWEN25 = {  # published configs of Qwen2.5 (shapes only)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False),
}
PRESETS = ("tiny", "small", *_QWEN25)

_SUBJECTS = ["the model", "a reader", "the weaver", "our agent", "the memory", "each step", "the answer", "a user"]
_VERBS = ["reads", "writes", "checks", "keeps", "finds", "adds", "weaves", "recalls", "solves", "counts"]
_OBJECTS = ["the plan", "two numbers", "a short note", "the last line", "every token", "the sum", "a clue",
            "the next step", "its state", "the question"]
_TAILS = ["", " again", " first", " with care", " in order", " at once", " for now"]


def cache_dir() -> Path:
    return Path(os.environ.get("MEMGEN_CACHE", Path.home() / ".cache" / "memgen"))


def synthetic_text(n_sentences: int, seed: int = 0) -> str:
    """Punctuated synthetic prose: clauses joined by commas, sentences ended by periods, paragraphs by newlines."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        clauses = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
                   for _ in range(rng.randint(1, 3))]
        sentence = ", ".join(clauses)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    paragraphs, i = [], 0
    while i < len(sentences):
        k = rng.randint(2, 4)
        paragraphs.append(" ".join(sentences[i:i + k]))
        i += k
    return "\n".join(paragraphs)


def _train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)


def _tiny_config(vocab_size: int, **overrides) -> Qwen2Config:
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    shape.update(overrides)
    return Qwen2Config(vocab_size=vocab_size, **shape)


def _train_tiny(steps: int = 300, seed: int = 0) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A few seconds of next-token training on the synthetic text (AdamW, batches of 16 x 64 tokens). The
    caller's global generator is left as it was (the first `load_preset` on a machine trains this)."""
    text = synthetic_text(3000, seed)
    tokenizer = _train_tokenizer(text)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    with fixed_seed(torch.device("cpu"), seed):
        model = Qwen2ForCausalLM(_tiny_config(len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="training the tiny preset (once; cached)", unit="step", leave=False):
        starts = torch.randint(0, ids.numel() - 65, (16,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), tokenizer


def tiny_path() -> Path:
    return cache_dir() / f"tiny-v{TINY_VERSION}"


def build_tiny(path: Path | None = None) -> Path:
    """Train the tiny preset (a few seconds on a CPU) and save it (model + tokenizer) at `path`; returns the path."""
    path = tiny_path() if path is None else Path(path)
    model, tokenizer = _train_tiny()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")  # written whole, then renamed into place
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first: theirs is the same model
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _tiny_files() -> Path:
    """The cached tiny preset's directory, trained first if this machine has not built it yet."""
    path = tiny_path()
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(path)
    return path


def preset_tokenizer() -> PreTrainedTokenizerFast:
    """The presets' tokenizer (the tiny preset's byte-level BPE), also used with the shape-only presets."""
    return PreTrainedTokenizerFast.from_pretrained(_tiny_files())


def preset_config(name: str) -> Qwen2Config:
    """The preset's model config (shapes), without building its weights."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if name == "tiny":
        return Qwen2Config.from_pretrained(_tiny_files())
    if name == "small":
        return _tiny_config(len(preset_tokenizer()), hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                            num_attention_heads=8)
    return Qwen2Config(vocab_size=151_936, max_position_embeddings=32_768, **_QWEN25[name])


def load_preset(name: str, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast | None]:
    """The preset's reasoner (eval mode, on `device` in `dtype`) and tokenizer (None for shape-only presets)."""
    config = preset_config(name)
    if name == "tiny":
        model = Qwen2ForCausalLM.from_pretrained(_tiny_files(), dtype=dtype)
        return model.to(device).eval(), preset_tokenizer()
    device = torch.device(device)
    with fixed_seed(device), device:  # the same weights on every call
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval(), (preset_tokenizer() if name == "small" else None)


@contextlib.contextmanager
def fixed_seed(device: torch.device, seed: int = 0) -> Iterator[None]:
    """Random draws inside (on the CPU and on `device`) come from generators seeded with `seed`, forked off
    the caller's, which are left as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
