"""The per-vocabulary delimiter table: which tokens end the text with a delimiter.

A decision point comes when the text generated so far ends with a delimiter. Decoding the
sequence at every step would cost O(length) per row; instead each token id is decoded once, alone,
and the table records whether that text ends with a delimiter. For the single-character ASCII
delimiters MemGen uses (",", ".", "\\n") the last token decides how the decoded prefix ends, for
byte-level BPE and SentencePiece-style tokenizers alike (tests/test_delimiters.py checks it on
random sequences). One case is decided by the table, not the decoded text: a SentencePiece
byte-fallback token of a delimiter (`<0x2E>`) emitted right after an incomplete multi-byte run;
the decoder turns that whole malformed run into U+FFFD, the table still counts the delimiter.
Delimiters a tokenizer can split across tokens (a multi-byte character under byte-level BPE) are
not detectable token by token; the builder refuses those that end no token at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_DELIMITERS: tuple[str, ...] = (",", ".", "\n")


def _vocabulary_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # a `tokenizers.Tokenizer`
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)  # a transformers tokenizer: base vocabulary plus added tokens


def _decode_each(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    """Each id's text alone, special tokens kept (the text rule decodes with skip_special_tokens=False)."""
    if hasattr(tokenizer, "decode_batch"):  # a `tokenizers.Tokenizer`
        return tokenizer.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids, skip_special_tokens=False)


def _check_delimiters(delimiters: Sequence[str]) -> tuple[str, ...]:
    if isinstance(delimiters, str) or not isinstance(delimiters, Sequence) or len(delimiters) == 0:
        raise ValueError(f"delimiters must be a non-empty sequence of strings such as (',', '.', '\\n'), got {delimiters!r}")
    for d in delimiters:
        if not isinstance(d, str) or d == "":
            raise ValueError(f"delimiters must be non-empty strings, got {d!r} in {delimiters!r}")
    return tuple(delimiters)


def build_delimiter_table(
    tokenizer: Any,
    delimiters: Sequence[str] = DEFAULT_DELIMITERS,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """bool[vocab_size]: entry t is True when token t's decoded text ends with one of `delimiters`.

    Args:
        tokenizer: a transformers tokenizer or a `tokenizers.Tokenizer`.
        delimiters: the strings that end a reasoning segment.
        vocab_size: the table's length; pass the model's embedding size when it exceeds the
            tokenizer's vocabulary (ids past the tokenizer's end are never delimiters). Default:
            the tokenizer's vocabulary, added tokens included.
        device: where the table lives (default CPU).

    Raises:
        ValueError: on malformed delimiters, a vocab_size smaller than the tokenizer's vocabulary,
            or a delimiter that ends no token (it could never be detected).
    """
    delimiters = _check_delimiters(delimiters)
    n_tokens = _vocabulary_size(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    if not isinstance(vocab_size, int) or vocab_size < n_tokens:
        raise ValueError(
            f"vocab_size must be an int >= the tokenizer's vocabulary size {n_tokens} (every token id "
            f"needs an entry), got {vocab_size!r}"
        )
    texts = _decode_each(tokenizer, [[i] for i in range(n_tokens)])
    table = torch.zeros(vocab_size, dtype=torch.bool)
    ends = [text.endswith(delimiters) for text in texts]
    table[:n_tokens] = torch.tensor(ends, dtype=torch.bool)
    undetectable = [d for d in delimiters if not any(text.endswith(d) for text in texts)]
    if undetectable:
        raise ValueError(
            f"delimiters {undetectable!r} end no token of this tokenizer's vocabulary, so they could never be "
            "detected; they may be split across tokens (e.g. a multi-byte character under byte-level BPE)"
        )
    return table.to(device) if device is not None else table
