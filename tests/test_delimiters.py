"""The delimiter table agrees with the text rule on tokenizers built offline.

Text rule: a prefix is a decision point when `tokenizer.decode(prefix, skip_special_tokens=False)`
ends with a delimiter. The table decides it from the prefix's last token alone.

Random sequences mix random vocabulary tokens with encodings of random multilingual strings. One
kind of token is kept out of the free draw: a SentencePiece byte-fallback token (`<0x2E>`) right
after an incomplete multi-byte run, where the decoder turns the whole malformed run, the delimiter
byte included, into U+FFFD. Such runs only arise from malformed byte sequences; the table counts
the delimiter byte as a delimiter (see memgen/delimiters.py).
"""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memgen import DEFAULT_DELIMITERS, build_delimiter_table

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
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>"],
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
    import json

    return json.loads(tok.to_str())["model"]


TOKENIZERS = {"byte_level_bpe": byte_level_bpe, "sentencepiece_style": sentencepiece_style}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def text_rule(tokenizer, prefix: list[int], delimiters) -> bool:
    return tokenizer.decode(prefix, skip_special_tokens=False).endswith(tuple(delimiters))


def test_tokenizers_exercise_the_interesting_cases(tokenizer):
    vocab = tokenizer.get_vocab()
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    merged = [t for t in texts if len(t) > 1 and t.endswith(DEFAULT_DELIMITERS)]
    assert merged, "the tokenizer should have merged tokens that end with a delimiter (e.g. '.\\n', ' 2.')"
    assert any("\ufffd" in t for t in texts), "partial multi-byte tokens should exist"
    if "<0x0A>" in vocab:
        assert texts[vocab["<0x0A>"]] == "\n"


ALPHABET = list("abcxyz ,.;!\n\t0123456789") + ["é", "ü", "€", "东", "京", "∑", "ω", ".\n", ", ", "  "]


def random_sequence(tokenizer, rng: random.Random, delimiter_ids: list[int], free_ids: list[int]) -> list[int]:
    seq: list[int] = []
    while len(seq) < 24:
        draw = rng.random()
        if draw < 0.35:
            seq.append(rng.choice(delimiter_ids))
        elif draw < 0.7:
            seq.append(rng.choice(free_ids))
        else:
            text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))
            seq.extend(tokenizer.encode(text, add_special_tokens=False))
    return seq[: rng.randint(1, 24)]


@pytest.mark.parametrize("delimiters", [DEFAULT_DELIMITERS, (".",), ("\n", ";", "!")])
def test_table_agrees_with_text_rule_on_random_sequences(tokenizer, delimiters):
    table = build_delimiter_table(tokenizer, delimiters)
    assert table.dtype == torch.bool and table.shape == (len(tokenizer),)
    byte_fallback = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<0x") and len(t) == 6}
    free_ids = [i for i in range(len(tokenizer)) if i not in byte_fallback]
    delimiter_ids = [i for i in table.nonzero().flatten().tolist() if i not in byte_fallback]
    rng = random.Random(1234)
    checked = positives = 0
    for _ in range(200):
        seq = random_sequence(tokenizer, rng, delimiter_ids, free_ids)
        for end in range(1, len(seq) + 1):
            prefix = seq[:end]
            expected = text_rule(tokenizer, prefix, delimiters)
            assert bool(table[prefix[-1]]) == expected, (
                f"table says {bool(table[prefix[-1]])} for token {prefix[-1]} "
                f"({tokenizer.convert_ids_to_tokens(prefix[-1])!r}) but the decoded prefix "
                f"{tokenizer.decode(prefix, skip_special_tokens=False)[-20:]!r} says {expected}")
            checked += 1
            positives += expected
    assert checked > 1000 and 0.15 < positives / checked < 0.85, (checked, positives)


def test_table_agrees_on_real_text(tokenizer):
    table = build_delimiter_table(tokenizer)
    for text in CORPUS[:7]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for end in range(1, len(ids) + 1):
            assert bool(table[ids[end - 1]]) == text_rule(tokenizer, ids[:end], DEFAULT_DELIMITERS)


def test_raw_tokenizers_object_and_padding_to_model_vocab(tokenizer):
    raw = tokenizer.backend_tokenizer
    padded = build_delimiter_table(raw, vocab_size=len(tokenizer) + 13)
    assert torch.equal(padded[: len(tokenizer)], build_delimiter_table(tokenizer))
    assert not padded[len(tokenizer):].any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(delimiters=","), "non-empty sequence of strings"),
        (dict(delimiters=()), "non-empty sequence of strings"),
        (dict(delimiters=(".", "")), "non-empty strings"),
        (dict(vocab_size=10), "vocab_size must be an int >="),
        (dict(delimiters=(".", "§§§")), r"\['§§§'\] end no token"),
    ],
)
def test_bad_arguments(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_delimiter_table(tokenizer, **kwargs)
