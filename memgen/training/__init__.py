"""Training MemGen: weaver SFT on chat-formatted data through Hugging Face `Trainer`.

    from transformers import TrainingArguments
    from memgen.training import sft_trainer
    trainer = sft_trainer(model, load_task("gsm8k", "train.jsonl"), TrainingArguments("out", ...))
    trainer.train()                      # or train(resume_from_checkpoint=True)

The loss is `MemGenModel.forward`'s: mean cross-entropy over answer tokens, with latents woven at
the prompt point and at delimiters (DESIGN.md section 1); only the weaver's parameters train.
Checkpoints are memgen checkpoints plus optimizer and random states, all safetensors and JSON
(`MemGenTrainer`). Several processes: launch the same script with `torchrun` or `accelerate`.
"""

from __future__ import annotations

import functools
from typing import Any

import datasets

from memgen.training.data import MemGenCollator, encode_example, template_kwargs
from memgen.training.trainer import MemGenTrainer


def encode_dataset(tokenizer: Any, rows: Any, max_length: int | None = None, num_proc: int | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> Any:
    """Encode prompt/answer or messages rows for SFT: a `datasets.Dataset` (encoded once, up front, in `num_proc`
    processes where given, for large datasets: a chat template renders each row once per assistant turn and twice
    more), a `datasets.IterableDataset` (a streamed one: encoded as it is read; Trainer then needs `max_steps`) or
    an iterable of dicts. chat_template_kwargs: extra variables for the chat template (`template_kwargs`)."""
    extra = template_kwargs(tokenizer, chat_template_kwargs) or None  # checked before any row is encoded
    encode = functools.partial(encode_example, tokenizer, max_length=max_length,  # picklable, for loader workers
                               chat_template_kwargs=extra)
    mapped = hasattr(rows, "map") and hasattr(rows, "column_names") and not isinstance(rows, datasets.IterableDataset)
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1
                                 or not mapped):
        raise ValueError(f"num_proc must be an int >= 1 and encodes a datasets.Dataset in that many processes; got "
                         f"num_proc={num_proc!r} for a {type(rows).__name__} (a list: datasets.Dataset.from_list)")
    if isinstance(rows, datasets.IterableDataset):
        # a streamed dataset may not know its columns before it is read: keep the encoded ones instead
        return rows.map(encode).select_columns(["input_ids", "labels"])
    if mapped:
        return rows.map(encode, remove_columns=rows.column_names, desc="encoding rows", num_proc=num_proc)
    return [encode(row) for row in rows]


def sft_trainer(model: Any, train_dataset: Any, args: Any, eval_dataset: Any = None, max_length: int | None = None,
                padding_side: str = "left", num_proc: int | None = None,
                chat_template_kwargs: dict[str, Any] | None = None, **trainer_kwargs: Any) -> MemGenTrainer:
    """A `MemGenTrainer` for weaver SFT: rows encoded with the model's tokenizer (answer-only labels; `num_proc`
    processes for a `datasets.Dataset`, see `encode_dataset`; `chat_template_kwargs` for its chat template), padded
    by `MemGenCollator`, the weaver's parameters trainable and everything else frozen."""
    tokenizer = model.tokenizer
    encode = functools.partial(encode_dataset, tokenizer, max_length=max_length, num_proc=num_proc,
                               chat_template_kwargs=chat_template_kwargs)
    return MemGenTrainer(model, args, stage="weaver", train_dataset=encode(train_dataset),
                         eval_dataset=None if eval_dataset is None else encode(eval_dataset),
                         data_collator=MemGenCollator(tokenizer.pad_token_id, padding_side), **trainer_kwargs)


__all__ = ["MemGenCollator", "MemGenTrainer", "encode_dataset", "encode_example", "sft_trainer"]
