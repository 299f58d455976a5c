"""Tasks: datasets (through `datasets`) and their rewards, in one shape for SFT, GRPO and evaluation.

`load_task(name, source=None, split="train", limit=None, config=None)` returns a `datasets.Dataset`
whose rows hold `prompt` (the user's message), `answer` (a reference response, the SFT target) and
`target` (what the reward compares with: a number, a boxed expression, a letter, a list of aliases,
or test code). `source` is a Hugging Face hub name (or a local copy of a hub dataset), local json /
jsonl / parquet files, or a directory written by `datasets`' `save_to_disk`; by default the task's
public dataset. `TASKS[name].reward(completion, target)` scores a completion in [0, 1].
`load_rows(source, ...)` reads a source's rows as they are (SFT rows in a shape of their own).

| task | rows read | target | reward |
|---|---|---|---|
| gsm8k | question, answer ("... #### 72") | "72" | final answer (boxed or last number) |
| math | problem, solution (and answer, if present) | last boxed of the solution | same, normalised LaTeX |
| gpqa | Question, Correct Answer, Incorrect Answer 1-3 | option letter (options shuffled per question) | option letter |
| triviaqa | question, answer {value, aliases} | aliases | normalised exact match, any alias |
| popqa | question, possible_answers (list or JSON list) | aliases | normalised exact match, any alias |
| kodcode | question, solution, test | pytest-style tests | fraction of tests passed (sandboxed) |
| bigcodebench | instruct_prompt, code_prompt, canonical_solution, test | unittest classes | same |
| qa | prompt (or question), answer | answer | normalised exact match |
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memgen.tasks import rewards

_MATH_SUFFIX = "\nPut the final answer in \\boxed{}."


@dataclass(frozen=True)
class Task:
    """A task: where its data lives by default, how a raw row becomes (prompt, answer, target), how to score.

    hub: (dataset name, config or None) used when no source is given.
    to_row: raw row -> {"prompt", "answer", "target"}. reward: (completion, target) -> float in [0, 1].
    """

    name: str
    hub: tuple[str, str | None]
    to_row: Callable[[dict[str, Any]], dict[str, Any]]
    reward: Callable[[str, Any], float]


def _need(row: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"a row lacks the field(s) {missing}; it has {sorted(row)}")
    return [row[n] for n in names]


def _gsm8k(row: dict[str, Any]) -> dict[str, Any]:
    question, solution = _need(row, "question", "answer")
    if "####" not in solution:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got {solution[-80:]!r}")
    reasoning, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # the dataset's calculator annotations
    return {"prompt": question + _MATH_SUFFIX, "answer": f"{reasoning}\nThe answer is \\boxed{{{final}}}.",
            "target": final}


def _math(row: dict[str, Any]) -> dict[str, Any]:
    problem, solution = _need(row, "problem", "solution")
    target = row.get("answer") or rewards.last_boxed(solution)
    if target is None:
        raise ValueError(f"a MATH solution needs a \\boxed{{}} answer (or an 'answer' field): {solution[-80:]!r}")
    return {"prompt": problem + _MATH_SUFFIX, "answer": solution, "target": target}


def _gpqa(row: dict[str, Any]) -> dict[str, Any]:
    question, correct, *wrong = _need(row, "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                      "Incorrect Answer 3")
    options = [correct.strip(), *(w.strip() for w in wrong)]
    random.Random(zlib.crc32(question.encode())).shuffle(options)  # the same order in every run
    letter = "ABCD"[options.index(correct.strip())]
    listed = "\n".join(f"({letter_}) {text}" for letter_, text in zip("ABCD", options))
    prompt = f"{question.strip()}\n\n{listed}\n\nEnd with \"The answer is (X)\" where X is the option's letter."
    explanation = (row.get("Explanation") or "").strip()
    return {"prompt": prompt, "answer": f"{explanation}\nThe answer is ({letter}).".strip(), "target": letter}


def _triviaqa(row: dict[str, Any]) -> dict[str, Any]:
    question, answer = _need(row, "question", "answer")
    aliases = list(dict.fromkeys([answer["value"], *answer.get("aliases", [])]))
    return {"prompt": question, "answer": f"The answer is {answer['value']}.", "target": aliases}


def _popqa(row: dict[str, Any]) -> dict[str, Any]:
    question, possible = _need(row, "question", "possible_answers")
    aliases = json.loads(possible) if isinstance(possible, str) else list(possible)
    if not aliases:
        raise ValueError(f"a PopQA row needs possible_answers, got {possible!r}")
    return {"prompt": question, "answer": f"The answer is {aliases[0]}.", "target": aliases}


def _kodcode(row: dict[str, Any]) -> dict[str, Any]:
    question, solution, test = _need(row, "question", "solution", "test")
    return {"prompt": question + "\nWrite the solution as a Python code block.",
            "answer": f"```python\n{solution.strip()}\n```", "target": test}


def _bigcodebench(row: dict[str, Any]) -> dict[str, Any]:
    """The instruct variant: the prompt asks for self-contained code starting with `code_prompt` (imports and the
    signature), which the canonical solution's body completes. The tests are unittest classes that call the
    solution's names unimported (BigCodeBench runs them in the solution's own namespace): they import them all."""
    prompt, code_prompt, solution, test = _need(row, "instruct_prompt", "code_prompt", "canonical_solution", "test")
    return {"prompt": prompt, "answer": f"```python\n{code_prompt}{solution}\n```",
            "target": f"from solution import *  # noqa: F403\n{test}"}


def _qa(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row.get("prompt", row.get("question"))
    if prompt is None or "answer" not in row:
        raise ValueError(f"a qa row needs 'prompt' (or 'question') and 'answer'; it has {sorted(row)}")
    return {"prompt": prompt, "answer": row["answer"], "target": row["answer"]}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("gsm8k", ("openai/gsm8k", "main"), _gsm8k, rewards.math_reward),
    Task("math", ("HuggingFaceH4/MATH-500", None), _math, rewards.math_reward),
    Task("gpqa", ("Idavidrein/gpqa", "gpqa_diamond"), _gpqa, rewards.option_reward),
    Task("triviaqa", ("mandarjoshi/trivia_qa", "rc.nocontext"), _triviaqa, rewards.qa_reward),
    Task("popqa", ("akariasai/PopQA", None), _popqa, rewards.qa_reward),
    Task("kodcode", ("KodCode/KodCode-V1", None), _kodcode, rewards.code_reward),
    Task("bigcodebench", ("bigcode/bigcodebench", None), _bigcodebench, rewards.code_reward),
    Task("qa", ("", None), _qa, rewards.qa_reward),
)}

_LOCAL = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _saved_to_disk(path: Path) -> bool:
    """Whether `path` is a directory that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _from_disk(path: Path, split: str):
    """The rows of a `save_to_disk` directory: a Dataset as it is, a DatasetDict's `split`."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"split {split!r} is not in the dataset saved at {str(path)!r}; it has {sorted(saved)}")
        return saved[split]
    return saved


def _local_copy_of(source: str, task: Task) -> bool:
    """Whether `source` is a local directory holding a dataset with the task's configuration (a copy of its hub
    dataset, e.g. from `huggingface_hub.snapshot_download`)."""
    import datasets

    return Path(source).is_dir() and task.hub[1] in datasets.get_dataset_config_names(source)


def _dataset(files: list, split: str, config: str | None, task: Task | None):
    """The raw rows of `files` (load_task's and load_rows' source, as a list); a task's public dataset where it is
    empty."""
    import datasets

    if config is not None and (not isinstance(config, str) or not config):
        raise ValueError(f"config must be a non-empty string (a hub dataset's configuration name), got {config!r}")
    local = [Path(f) for f in files if Path(f).suffix in _LOCAL]
    other_files = [str(f) for f in files if Path(f).suffix not in _LOCAL and Path(f).is_file()]
    if other_files:
        raise ValueError(f"source files must be {', '.join(sorted(_LOCAL))} files, got {other_files}")
    if len(files) > 1 and not local:
        raise ValueError(f"source takes one hub dataset name (or local files), got {files}")
    saved = len(files) == 1 and _saved_to_disk(Path(files[0]))
    if config is not None and (local or saved):
        raise ValueError(f"config names a hub dataset's configuration; local files and save_to_disk directories "
                         f"have none (got config={config!r} with {[str(f) for f in files]})")
    if saved:
        return _from_disk(Path(files[0]), split)
    if local:
        kinds = {_LOCAL[f.suffix] for f in local}
        if len(local) != len(files) or len(kinds) > 1:
            raise ValueError(f"source files must all be .json/.jsonl or all .parquet, got {files}")
        missing = [str(f) for f in local if not f.is_file()]
        if missing:
            raise ValueError(f"source files not found: {missing}")
        empty = [str(f) for f in local if f.stat().st_size == 0]
        if empty:  # (`datasets` fails on an empty JSON file with a bare StopIteration)
            raise ValueError(f"source files are empty: {empty}")
        return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in local], split="train")
    hub = str(files[0]) if files else task.hub[0]
    if task is not None and config is None and task.hub[1] and (hub == task.hub[0] or _local_copy_of(hub, task)):
        config = task.hub[1]
    if not hub:
        raise ValueError(f"task {task.name!r} has no public dataset: pass source (local files or a hub name)")
    return datasets.load_dataset(hub, config, split=split)


def _sources(source: str | Sequence[str] | None) -> list:
    return [source] if isinstance(source, (str, Path)) else list(source) if source is not None else []


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")


def _first(rows, limit: int | None):
    return rows if limit is None else rows.select(range(min(limit, len(rows))))


def load_rows(source: str | Sequence[str], split: str = "train", limit: int | None = None,
              config: str | None = None):
    """The rows of a dataset as they are, as a `datasets.Dataset` (no task's shape): for SFT on rows already in a
    shape `memgen.training.sft_trainer` takes (`messages` conversations, `prompt`/`answer`, TRL's
    `prompt`/`completion`). source, split, limit, config: as `load_task` takes them; source is required."""
    _check_limit(limit)
    files = _sources(source)
    if not files:
        raise ValueError("source must name local files (.json, .jsonl, .parquet), a save_to_disk directory or a hub "
                         f"dataset, got {source!r}")
    return _first(_dataset(files, split, config, None), limit)


def load_task(name: str, source: str | Sequence[str] | None = None, split: str = "train", limit: int | None = None,
              config: str | None = None):
    """The task's rows as a `datasets.Dataset` with columns prompt, answer, target.

    source: a hub dataset name (or a local copy of a hub dataset), local files (.json, .jsonl, .parquet; a path or
    a list of them), or a directory written by `save_to_disk` (a DatasetDict gives its `split`); None: the task's
    public dataset. config: the hub dataset's configuration; by default the task's own (GSM8K's "main") where
    source is None or the task's hub name. limit: keep the first `limit` rows.
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    _check_limit(limit)
    task = TASKS[name]
    raw = _first(_dataset(_sources(source), split, config, task), limit)
    rows = raw.map(task.to_row, remove_columns=raw.column_names, desc=f"{name} rows")
    return rows.select_columns(["prompt", "answer", "target"])


__all__ = ["TASKS", "Task", "load_rows", "load_task", "rewards"]
