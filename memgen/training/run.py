"""`memgen train --config run.yaml [key=value ...]`: one training stage from a YAML file.

    stage: sft | grpo | trigger
    model: Qwen/Qwen2.5-1.5B-Instruct     # the reasoner (name or directory)
    memgen: runs/sft                      # optional: start from a memgen checkpoint (trigger RL needs one)
    config: {trigger_mode: lora}          # MemGenConfig fields for a fresh model
    task: gsm8k                           # memgen.tasks: the data's shape and the reward (sft: optional;
                                          #   without it data's rows train as they are)
    data: data/train.jsonl                # local files or a hub name (default: the task's dataset)
    split: train
    limit: 1000                           # optional: the first N rows
    eval_data: data/test.jsonl            # optional: evaluation rows (files or a hub name), with
    eval_split: test                      #   their split (default: test); either key needs training.eval_strategy
    eval_limit: 200                       # optional: the first N evaluation rows
    max_length: 1024                      # optional (sft): rows longer than this raise
    num_proc: 8                           # optional (sft): processes that encode the rows
    chat_template_kwargs: {enable_thinking: false}  # optional: extra variables for the chat template
    dtype: bfloat16                       # the base model's weights (trained tensors stay float32)
    allow_untrained_weaver: false         # trigger RL against a weaver never trained or loaded
    training: {output_dir: runs/sft, learning_rate: 1.0e-5, num_train_epochs: 2}  # TrainingArguments,
                                          # GRPOConfig (grpo) or TriggerConfig (trigger) fields

Overrides use dotted keys: `training.learning_rate=3e-6 limit=64`; values are read as YAML. The
trained model is saved as a memgen checkpoint in `training.output_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from memgen.config import TORCH_DTYPES

STAGES = ("sft", "grpo", "trigger")
_KEYS = {"stage", "model", "memgen", "config", "task", "data", "split", "limit", "eval_data", "eval_split",
         "eval_limit", "max_length", "num_proc", "chat_template_kwargs", "dtype", "allow_untrained_weaver",
         "training"}


_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-5` as a string; read such exponent numbers as floats, as users mean them."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return float(value) if isinstance(value, str) and _EXPONENT.match(value) else value


def _args_class(stage: str) -> type:
    """The stage's training arguments: TrainingArguments (sft), GRPOConfig (grpo) or TriggerConfig (trigger)."""
    from transformers import TrainingArguments

    from memgen.training.grpo import GRPOConfig
    from memgen.training.trigger_rl import TriggerConfig

    return {"sft": TrainingArguments, "grpo": GRPOConfig, "trigger": TriggerConfig}[stage]


def _check_known(keys: Any, allowed: set[str], what: str, takes: str) -> None:
    """Raise for keys outside `allowed`, with the nearest allowed key to each (a typo would otherwise surface as a
    TypeError from the arguments' constructor, after the imports)."""
    unknown = sorted(set(keys) - allowed)
    if unknown:
        hints = [f"{close[0]!r} for {key!r}" for key in unknown
                 if (close := difflib.get_close_matches(key, allowed, n=1))]
        raise ValueError(f"unknown {what} {unknown}; {takes}" + (f"; did you mean {', '.join(hints)}?" if hints else ""))


def _check_model_config(run: dict[str, Any]) -> None:
    """`config` holds a fresh model's MemGenConfig fields: a mapping of known fields with valid values, in a run that
    builds a fresh model (a checkpoint's own config wins, so `config` beside `memgen` would change nothing).
    MemGenConfig itself keeps unknown keyword arguments as attributes, as every Hugging Face config does."""
    import inspect

    from memgen import MemGenConfig

    if run.get("memgen"):
        raise ValueError("config sets a fresh model's fields, but the run starts from the memgen checkpoint "
                         f"{run['memgen']!r}, whose own config is used; drop one of them")
    config = run["config"]
    if not isinstance(config, dict):
        raise ValueError(f"config must be a mapping of MemGenConfig fields, got {config!r}")
    fields = {name for name, p in inspect.signature(MemGenConfig).parameters.items()
              if p.kind is not p.VAR_KEYWORD} - {"reasoner_name_or_path"}  # `model` names the reasoner
    _check_known(config, fields, "config keys", f"config takes the MemGenConfig fields {sorted(fields)}")
    try:
        MemGenConfig(**config)
    except ValueError as error:
        raise ValueError(f"config: {error}") from error


def _evaluates(run: dict[str, Any]) -> bool:
    """Whether the run names evaluation rows (eval_data, or eval_split of the task's dataset)."""
    return "eval_data" in run or "eval_split" in run


def load_run_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML run description with `key=value` overrides applied, checked before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {str(path)!r} is not a file")
    run = yaml.safe_load(path.read_text()) or {}
    if not isinstance(run, dict):
        raise ValueError(f"{path}: the run description must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"overrides look like key=value or section.key=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = run
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    run = _numbers(run)
    _check_known(run, _KEYS, "keys", f"the run description takes {sorted(_KEYS)}")
    if run.get("stage") not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {run.get('stage')!r}")
    if "training" not in run:
        raise ValueError("the run description needs 'training'")
    from memgen.tasks import TASKS
    from memgen.training.data import check_template_mapping
    from memgen.training.grpo import check_count

    if "task" in run and run["task"] not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {run['task']!r}")
    if "task" not in run and run["stage"] != "sft":
        raise ValueError(f"stage {run['stage']} needs 'task': its reward scores the rollouts")
    if "task" not in run and not run.get("data"):
        raise ValueError("an sft run without a task reads its rows as they are from 'data' (messages, prompt/answer "
                         "or prompt/completion rows); name the files or hub dataset, or a task")
    if not run.get("model") and not run.get("memgen"):
        raise ValueError("the run description needs 'model' (the reasoner) or 'memgen' (a checkpoint)")
    if "config" in run:
        _check_model_config(run)
    for key, stage in (("max_length", "sft"), ("num_proc", "sft"), ("allow_untrained_weaver", "trigger")):
        if key in run and run["stage"] != stage:
            raise ValueError(f"{key} applies to the {stage} stage only; this run's stage is {run['stage']}")
    for key in ("max_length", "num_proc"):
        if key in run:
            check_count(key, run[key])
    if not isinstance(run["training"], dict) or "output_dir" not in run["training"]:
        raise ValueError("training must be a mapping with at least output_dir")
    if "chat_template_kwargs" in run:
        check_template_mapping(run["chat_template_kwargs"])
        if "chat_template_kwargs" in run["training"]:
            raise ValueError("chat_template_kwargs is given twice, at the top and in training: keep one")
    args_class = _args_class(run["stage"])
    _check_known(run["training"], {f.name for f in dataclasses.fields(args_class) if f.init}, "training keys",
                 f"stage {run['stage']} takes the fields of {args_class.__name__}")
    try:  # the arguments' own checks (values, combinations); train_from_config builds them again, as cheaply
        args_class(**run["training"])
    except ValueError as error:
        raise ValueError(f"training: {error}") from error
    evaluating = _evaluates(run)
    if "eval_limit" in run and not evaluating:
        raise ValueError("eval_limit limits evaluation rows: name them with eval_data (or eval_split)")
    if evaluating != (run["training"].get("eval_strategy", "no") != "no"):
        raise ValueError("evaluation needs both evaluation rows (eval_data or eval_split) and "
                         "training.eval_strategy ('steps' or 'epoch'); the run names only one")
    if run.get("dtype", "float32") not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {run.get('dtype')!r}")
    return run


def build_model(model: str | None, memgen: str | None, config: dict[str, Any] | None = None,
                dtype: str = "float32") -> Any:
    """A MemGen model: loaded from a memgen (or reference) checkpoint, or fresh around the reasoner `model`; every
    base loaded by name (the reasoner, and a checkpoint's separate weaver or trigger base) is loaded in `dtype`."""
    from memgen import MemGenConfig, MemGenModel

    if memgen:
        return MemGenModel.from_pretrained(memgen, reasoner=model, dtype=TORCH_DTYPES[dtype])
    return MemGenModel.from_reasoner(model, config=MemGenConfig(**(config or {})), dtype=TORCH_DTYPES[dtype])


def _rows(run: dict[str, Any], source: Any, split: str, limit: int | None, key: str) -> Any:
    """The run's task's rows from `source`, or without a task (sft) the rows of `source` as they are, their first
    row's shape checked before any model loads (`key` names the source in the message)."""
    from memgen.tasks import load_rows, load_task
    from memgen.training.data import check_sft_row

    if "task" in run:
        return load_task(run["task"], source, split, limit)
    rows = load_rows(source, split, limit)  # (`datasets` refuses a source without rows)
    try:
        check_sft_row(rows[0])
    except ValueError as error:
        raise ValueError(f"{key} {source!r} (read as it is, the run naming no task): {error}") from error
    return rows


def train_from_config(run: dict[str, Any]) -> Any:
    """Build the model, data and trainer a checked run description names; train; save; return the trainer."""
    from memgen.tasks import TASKS
    from memgen.training import sft_trainer
    from memgen.training.grpo import GRPOTrainer
    from memgen.training.trigger_rl import TriggerTrainer

    stage = run["stage"]
    template = run.get("chat_template_kwargs")
    training = run["training"] if template is None or stage == "sft" else {**run["training"],
                                                                          "chat_template_kwargs": template}
    args = _args_class(stage)(**training)
    rows = _rows(run, run.get("data"), run.get("split", "train"), run.get("limit"), "data")
    eval_rows = (_rows(run, run.get("eval_data", None if "task" in run else run["data"]), run.get("eval_split", "test"),
                       run.get("eval_limit"), "eval_data") if _evaluates(run) else None)
    model = build_model(run.get("model"), run.get("memgen"), run.get("config"), run.get("dtype", "float32")).train()
    if stage == "sft":
        trainer = sft_trainer(model, rows, args, eval_dataset=eval_rows, max_length=run.get("max_length"),
                              num_proc=run.get("num_proc"), chat_template_kwargs=template)
    elif stage == "grpo":
        trainer = GRPOTrainer(model, args, rows, TASKS[run["task"]].reward, eval_dataset=eval_rows)
    else:
        trainer = TriggerTrainer(model, args, rows, TASKS[run["task"]].reward, eval_dataset=eval_rows,
                                 allow_untrained_weaver=bool(run.get("allow_untrained_weaver", False)))
    trainer.train(resume_from_checkpoint=run["training"].get("resume_from_checkpoint"))
    trainer.save_model(args.output_dir)
    return trainer
