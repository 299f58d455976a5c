"""SFT data: chat-formatted rows to (input_ids, labels) with the loss on answer tokens only, and a collator.

A row is one of:
- `{"prompt": str, "answer": str}`: one user turn, one assistant turn (what `memgen.tasks.load_task`
  gives); TRL's name `completion` may stand for `answer`;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation; every assistant turn trains;
- TRL's conversational prompt-completion rows, `{"prompt": [messages], "completion": [messages]}`
  (either side may also be a string: a user turn, an assistant turn): only the completion's assistant
  turns train, the prompt's are context.
With a chat template, each trained assistant turn's tokens, up to and including the template's
end-of-turn tokens, carry labels. A conversation with several trained assistant turns is what
`MemGenModel.forward` treats turn by turn. Without a template, the prompt and the answer are
concatenated, after the special tokens the tokenizer starts text with (a BOS), and the answer ends
with the EOS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100


def _is_conversation(prompt: Any) -> bool:
    """Whether `prompt` is a conversation: a non-empty list of {'role': str, 'content': str} messages."""
    return (isinstance(prompt, list) and bool(prompt)
            and all(hasattr(m, "get") and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt))


def _checked_messages(messages: Any, name: str) -> list[dict[str, str]]:
    """`messages` (a row's `name` field) where it is a conversation of dicts; raises otherwise."""
    if not (_is_conversation(messages) and all(isinstance(m, dict) for m in messages)):
        raise ValueError(f"{name} must be a non-empty list of {{'role': str, 'content': str}}")
    return messages


def _messages(row: dict[str, Any]) -> tuple[list[dict[str, str]], int]:
    """The row's conversation, and the index of its first message whose assistant turns train."""
    if "messages" in row:
        messages = _checked_messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("messages must hold at least one assistant turn to train on")
        return messages, 0
    answers = [key for key in ("answer", "completion") if key in row]
    if "prompt" not in row or len(answers) != 1:
        raise ValueError("a row must hold 'messages', or 'prompt' and one of 'answer' / 'completion' (strings, or "
                         f"lists of messages); it has {sorted(row)}")
    prompt, answer = row["prompt"], row[answers[0]]
    if not isinstance(prompt, (str, list)) or not isinstance(answer, (str, list)):
        raise ValueError(f"'prompt' and {answers[0]!r} must be strings or lists of messages, got "
                         f"{type(prompt).__name__} and {type(answer).__name__}")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _checked_messages(prompt, "prompt")
    answer = ([{"role": "assistant", "content": answer}] if isinstance(answer, str)
              else _checked_messages(answer, answers[0]))
    if not any(m["role"] == "assistant" for m in answer):
        raise ValueError(f"{answers[0]} must hold at least one assistant turn to train on")
    return prompt + answer, len(prompt)


# apply_chat_template arguments memgen sets itself (rendering text, with or without the assistant's generation prompt)
_TEMPLATE_ARGUMENTS = ("tokenize", "add_generation_prompt")


def check_template_mapping(chat_template_kwargs: Any) -> None:
    """Raise unless `chat_template_kwargs` is None or a mapping of variable names (strings) to values: the check
    that needs no tokenizer, made where the setting is given (GRPOConfig, a run description)."""
    if chat_template_kwargs is not None and not (isinstance(chat_template_kwargs, dict)
                                                 and all(isinstance(k, str) for k in chat_template_kwargs)):
        raise ValueError(f"chat_template_kwargs must be a mapping of template variable names to values, got "
                         f"{chat_template_kwargs!r}")


def template_kwargs(tokenizer: Any, chat_template_kwargs: Any) -> dict[str, Any]:
    """`chat_template_kwargs` (None: none) checked against `tokenizer`: extra variables for its chat template, as
    `apply_chat_template` takes them (Qwen3's `{"enable_thinking": False}`). Refused: a tokenizer without a
    template, memgen's own arguments, and a name the template never mentions, which Jinja would ignore without a
    word (a typo such as `enable_thinkng`)."""
    check_template_mapping(chat_template_kwargs)
    if chat_template_kwargs is None:
        return {}
    template = getattr(tokenizer, "chat_template", None)
    if chat_template_kwargs and not template:
        raise ValueError(f"chat_template_kwargs {chat_template_kwargs!r} need a tokenizer with a chat template")
    own = sorted(set(chat_template_kwargs) & set(_TEMPLATE_ARGUMENTS))
    if own:
        raise ValueError(f"chat_template_kwargs must not set {own}: memgen sets them itself")
    sources = "\n".join(template.values()) if isinstance(template, dict) else str(template or "")
    unused = sorted(k for k in chat_template_kwargs if k not in sources)
    if unused:
        raise ValueError(f"chat_template_kwargs {unused} are not variables of the tokenizer's chat template, which "
                         "would ignore them")
    return dict(chat_template_kwargs)


def check_sft_row(row: Any) -> None:
    """Raise unless `row` is in one of the shapes SFT takes (the module's docstring), without a tokenizer: to fail
    before a model loads."""
    if not hasattr(row, "keys"):
        raise ValueError(f"a row must be a mapping, got {type(row).__name__}")
    _messages(row)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before any text it encodes: the BOS of Llama's and Mistral's tokenizers, nothing for
    Qwen's. Text without a chat template starts with them, as the model saw text in training; a chat template
    writes its own."""
    probe = "a"
    plain, full = _ids(tokenizer, probe), tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    raise ValueError(f"the tokenizer encodes {probe!r} with its special tokens as {full}, which does not contain its "
                     f"encoding without them ({plain}): where its special tokens go cannot be told")


def encode_example(tokenizer: Any, row: dict[str, Any], max_length: int | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` of one row; labels are the token ids on assistant turns and -100 elsewhere.
    chat_template_kwargs: extra variables for the chat template (`template_kwargs`).

    Raises when the row is longer than `max_length` (nothing is cut silently), when the chat template does not
    render a conversation as a growing prefix (it rewrites earlier turns, so one sequence cannot hold every turn as
    trained: `encode_examples` splits such a row), or when the text before the first assistant turn is empty (the
    weaver's prompt point needs a prompt).
    """
    example, = _encoded(tokenizer, row, max_length, chat_template_kwargs, split=False)
    return example


def encode_examples(tokenizer: Any, row: dict[str, Any], max_length: int | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> list[dict[str, list[int]]]:
    """The SFT examples of one row: `encode_example`'s one where the chat template renders the conversation as a
    growing prefix; else, where the template rewrites earlier turns as a conversation grows (Qwen3's drops the
    thinking of the turns before the last question), one example per trained assistant turn, over the conversation
    up to it as the template renders a conversation that ends there. That is the text `MemGenModel.forward` trains
    each turn on in any case (a single-turn forward over the prefix ending at that turn; DESIGN.md section 1)."""
    return _encoded(tokenizer, row, max_length, chat_template_kwargs, split=True)


def _encoded(tokenizer: Any, row: dict[str, Any], max_length: int | None, chat_template_kwargs: Any,
             split: bool) -> list[dict[str, list[int]]]:
    """`encode_examples` (split) or `encode_example`'s one example in a list (not split: a row that needs splitting
    raises)."""
    messages, trained_from = _messages(row)
    extra = template_kwargs(tokenizer, chat_template_kwargs)
    which = f"the row starting {messages[0]['content'][:60]!r}"  # which one, in a dataset of thousands
    if getattr(tokenizer, "chat_template", None):
        def render(upto: int, generation_prompt: bool = False) -> str:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                                 add_generation_prompt=generation_prompt, **extra)

        full = _ids(tokenizer, render(len(messages)))
        turns = []  # (start of the turn's labels, the conversation through it) per trained assistant turn
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < trained_from:
                continue
            before, through = (render(i, generation_prompt=True) if i else ""), render(i + 1)
            start, through_ids = (len(_ids(tokenizer, before)) if before else 0), _ids(tokenizer, through)
            if not through.startswith(before) or start >= len(through_ids):
                raise ValueError(f"the tokenizer's chat template does not render assistant turn {i} after the "
                                 "conversation before it and the generation prompt, so the turn cannot be located; "
                                 "pass prompt/answer rows instead")
            turns.append((start, through_ids))
        if all(full[: len(through)] == through for _, through in turns):
            labels = [IGNORE] * len(full)
            for start, through in turns:
                labels[start: len(through)] = full[start: len(through)]
            examples = [(full, labels)]
        elif split:
            examples = [(through, [IGNORE] * start + through[start:]) for start, through in turns]
        else:
            raise ValueError(f"the tokenizer's chat template rewrites earlier turns of {which} as the conversation "
                             "grows (Qwen3's drops their thinking), so one sequence cannot hold every turn as it is "
                             "trained: encode_examples, encode_dataset and sft_trainer give each turn an example of "
                             "its own")
    else:
        if len(messages) != 2 or [m["role"] for m in messages] != ["user", "assistant"]:
            raise ValueError("a tokenizer without a chat template takes prompt/answer rows only, not conversations")
        prompt = leading_special_tokens(tokenizer) + _ids(tokenizer, messages[0]["content"])
        answer = _ids(tokenizer, messages[1]["content"]) + [tokenizer.eos_token_id]
        examples = [(prompt + answer, [IGNORE] * len(prompt) + answer)]
    for input_ids, labels in examples:
        if labels[0] != IGNORE:
            raise ValueError(f"{which} has no prompt before its first assistant turn")
        if max_length is not None and len(input_ids) > max_length:
            raise ValueError(f"{which} has {len(input_ids)} tokens, more than max_length={max_length}; raise "
                             "max_length or shorten the row (rows are never truncated silently)")
    return [{"input_ids": input_ids, "labels": labels} for input_ids, labels in examples]


class MemGenCollator:
    """Pads encoded rows into `input_ids`, `attention_mask` and `labels` tensors (left padding by default)."""

    def __init__(self, pad_token_id: int, padding_side: str = "left") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[b, cols] = torch.tensor(row["input_ids"])
            labels[b, cols] = torch.tensor(row["labels"])
            mask[b, cols] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_prompt_rows(rows: Sequence[Any], what: str) -> None:
    """Raise unless every row is a mapping with a `prompt` (a string, or a conversation: a list of {'role',
    'content'} messages) and a `target` (what a reward compares with); `what` names the rows' user (GRPO,
    evaluate) in the message."""
    for row in rows:
        if not (hasattr(row, "keys") and "target" in row
                and (isinstance(row.get("prompt"), str) or _is_conversation(row.get("prompt")))):
            got = sorted(row.keys()) if hasattr(row, "keys") else type(row).__name__
            raise ValueError(f"{what}'s rows need a 'prompt' (a string, or a list of {{'role', 'content'}} messages) "
                             f"and a 'target' (as memgen.tasks.load_task gives), got {got}")


def prompt_batch(tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]],
                 chat_template_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of prompts for generation: a string is one user turn, a list of
    {'role', 'content'} messages a conversation to continue. Through the chat template (with the assistant's
    generation prompt and `chat_template_kwargs`, see `template_kwargs`) when the tokenizer has one; otherwise
    strings only, after the tokenizer's leading special tokens."""
    extra = template_kwargs(tokenizer, chat_template_kwargs)
    if getattr(tokenizer, "chat_template", None):
        conversations = [p if _is_conversation(p) else [{"role": "user", "content": p}] for p in prompts]
        ids = [_ids(tokenizer, tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True, **extra))
               for c in conversations]
    else:
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("a conversation as prompt (a list of messages) needs a tokenizer with a chat template")
        start = leading_special_tokens(tokenizer)
        ids = [start + _ids(tokenizer, p) for p in prompts]
    if any(not row for row in ids):
        raise ValueError("a prompt encodes to no tokens")
    batch = MemGenCollator(tokenizer.pad_token_id, "left")([{"input_ids": row, "labels": row} for row in ids])
    return batch["input_ids"], batch["attention_mask"]
