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

from memgen import DEFAULT_DELIMITERS, build_delimiter_table
from offline import CORPUS, byte_level_bpe, sentencepiece_style

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
