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

from memgen.training.data import MemGenCollator, encode_example, encode_examples, template_kwargs
from memgen.training.trainer import MemGenTrainer


def _encoded_batch(tokenizer: Any, batch: dict[str, list], max_length: int | None,
                   chat_template_kwargs: dict[str, Any] | None, keep_inputs: bool) -> dict[str, list]:
    """`datasets`' batched map: the rows of `batch` (columns of lists) as SFT examples (`encode_examples`, so a row
    may give several); with `keep_inputs`, its own columns too, repeated for each row's examples (a streamed map
    keeps the input columns, which must then be as long as the output)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    per_row = [encode_examples(tokenizer, row, max_length, chat_template_kwargs) for row in rows]
    out = {"input_ids": [e["input_ids"] for examples in per_row for e in examples],
           "labels": [e["labels"] for examples in per_row for e in examples]}
    if keep_inputs:
        out.update({column: [value for value, examples in zip(values, per_row) for _ in examples]
                    for column, values in batch.items() if column not in out})
    return out


def encode_dataset(tokenizer: Any, rows: Any, max_length: int | None = None, num_proc: int | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> Any:
    """Encode prompt/answer or messages rows for SFT: a `datasets.Dataset` (encoded once, up front, in `num_proc`
    processes where given, for large datasets: a chat template renders each row once per assistant turn and twice
    more), a `datasets.IterableDataset` (a streamed one: encoded as it is read; Trainer then needs `max_steps`) or
    an iterable of dicts. A row gives one example, or one per trained turn where the chat template rewrites earlier
    turns (`encode_examples`). chat_template_kwargs: extra variables for the chat template (`template_kwargs`)."""
    extra = template_kwargs(tokenizer, chat_template_kwargs) or None  # checked before any row is encoded
    mapped = hasattr(rows, "map") and hasattr(rows, "column_names") and not isinstance(rows, datasets.IterableDataset)
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1
                                 or not mapped):
        raise ValueError(f"num_proc must be an int >= 1 and encodes a datasets.Dataset in that many processes; got "
                         f"num_proc={num_proc!r} for a {type(rows).__name__} (a list: datasets.Dataset.from_list)")
    if isinstance(rows, datasets.IterableDataset):
        # a streamed dataset may not know its columns before it is read: keep them through the map, then drop them
        encode = functools.partial(_encoded_batch, tokenizer, max_length=max_length, chat_template_kwargs=extra,
                                   keep_inputs=True)  # picklable, for loader workers
        return rows.map(encode, batched=True).select_columns(["input_ids", "labels"])
    if mapped:
        encode = functools.partial(_encoded_batch, tokenizer, max_length=max_length, chat_template_kwargs=extra,
                                   keep_inputs=False)
        return rows.map(encode, batched=True, remove_columns=rows.column_names, desc="encoding rows",
                        num_proc=num_proc)
    return [example for row in rows for example in encode_examples(tokenizer, row, max_length, extra)]


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


__all__ = ["MemGenCollator", "MemGenTrainer", "encode_dataset", "encode_example", "encode_examples", "sft_trainer"]
