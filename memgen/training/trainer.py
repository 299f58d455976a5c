"""`MemGenTrainer`: Hugging Face `Trainer` for a MemGen stage, with checkpoints in safetensors and JSON.

It trains only the stage's parameters (`MemGenModel.set_trainable`), so `torchrun` / `accelerate`
and DDP work as for any Trainer. Its checkpoints hold no pickles: the model part is a memgen
checkpoint (`config.json` + `memgen.safetensors`, only the trained tensors), the optimizer and
scheduler states are `optimizer.safetensors` + `optimizer.json`, the random states are
`rng_state[_<rank>].safetensors` + `.json`, and the arguments `training_args.json`. Resuming reads
them back (`trainer.train(resume_from_checkpoint=...)`) without unpickling anything. Under
DeepSpeed or FSDP those libraries write and read their own optimizer and model state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy
from transformers.utils import CONFIG_NAME
from transformers.utils.hub import PushInProgress

from memgen.checkpoints import WEIGHTS_NAME, load_strict
from memgen.peak_memory import peak_memory_mib, reset_peak_memory

OPTIMIZER = "optimizer"
ARGS_NAME = "training_args.json"  # the arguments, as JSON (Trainer pickles them)


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"memgen checkpoints store optimizer and scheduler settings as JSON; {type(value).__name__} "
                    f"({value!r}) is not JSON-serialisable")


def save_optimizer_state(optimizer_state: dict[str, Any], scheduler_state: dict[str, Any], directory: str) -> None:
    """An optimizer's and a scheduler's `state_dict()`s as `optimizer.safetensors` (tensors) + `optimizer.json`."""
    tensors, meta = {}, {"param_groups": optimizer_state["param_groups"], "state": {}, "scheduler": scheduler_state}
    for index, per_param in optimizer_state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                meta["state"].setdefault(str(index), {})[name] = value
    save_file(tensors, os.path.join(directory, f"{OPTIMIZER}.safetensors"))
    Path(directory, f"{OPTIMIZER}.json").write_text(json.dumps(meta, default=_json_default))


def load_optimizer_state(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state_dict, scheduler state_dict) written by `save_optimizer_state`."""
    meta = json.loads(Path(directory, f"{OPTIMIZER}.json").read_text())
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in meta["state"].items()}
    for key, tensor in load_file(os.path.join(directory, f"{OPTIMIZER}.safetensors")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}, meta["scheduler"]


def save_rng_state(path_stem: str) -> None:
    """Python's, NumPy's, torch's CPU and (when present) CUDA generators' states as `<stem>.safetensors` + `.json`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"numpy": torch.from_numpy(keys.astype(np.int64)), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.random.get_rng_state_all())})
    save_file(tensors, path_stem + ".safetensors")
    Path(path_stem + ".json").write_text(json.dumps({"python": random.getstate(),
                                                     "numpy": [name, int(pos), int(has_gauss), float(cached)]}))


def load_rng_state(path_stem: str) -> None:
    """Restore what `save_rng_state` wrote."""
    meta = json.loads(Path(path_stem + ".json").read_text())
    tensors = load_file(path_stem + ".safetensors")
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(cuda[: torch.cuda.device_count()])


class MemGenTrainer(Trainer):
    """A `Trainer` for one MemGen stage ("weaver" or "trigger") whose checkpoints are safetensors and JSON."""

    def __init__(self, model: Any, args: Any = None, stage: str = "weaver", **kwargs: Any) -> None:
        if stage == "trigger" and type(self).compute_loss is MemGenTrainer.compute_loss:
            raise ValueError("stage='trigger' with the teacher-forced loss would train nothing: that loss does not "
                             "involve the trigger. Train the trigger with TriggerTrainer (trigger RL), or subclass "
                             "MemGenTrainer with a compute_loss on forward(..., trigger_logits=True)")
        if args is not None and args.accelerator_config.dispatch_batches is None:
            # Unset, accelerate has the first rank read a streamed dataset's batches for every rank and concatenate
            # them, which needs one width for all, while the collator pads each batch to its own (and GRPO's rows
            # are text). Each rank reads its own share instead.
            args.accelerator_config.dispatch_batches = False
        model.set_trainable(stage)
        self.stage = stage
        super().__init__(model=model, args=args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; a finished weaver stage marks the model's weaver as trained (trigger RL requires it)."""
        output = super().train(*args, **kwargs)
        if self.stage == "weaver":
            self.accelerator.unwrap_model(self.model).weaver_trained = True
        return output

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Trainer's loss, except that with label smoothing (`label_smoothing_factor`) or a `compute_loss_func` the
        model still gets the labels: it places its augmentation points from them (Trainer takes them out of the
        model's inputs for those). Smoothing shifts the labels, as Trainer does for a causal LM: `logits[:, i]`
        predicts token i + 1."""
        if (self.label_smoother is None and self.compute_loss_func is None) or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens while DDP averages the ranks' gradients (as Trainer)
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        else:
            loss = self.label_smoother(outputs, labels, shift_labels=True)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `peak_memory_mib`, the peak since the previous log (CUDA: allocated by torch; CPU: the
        process's resident set), so each logged step shows what it needed."""
        if "loss" in logs:
            peak = peak_memory_mib(self.args.device)
            if peak is not None:
                logs["peak_memory_mib"] = round(peak, 1)
            reset_peak_memory(self.args.device)
        super().log(logs, *args, **kwargs)

    def _own_state(self) -> bool:
        """False under DeepSpeed / FSDP, which checkpoint the optimizer (and sharded model) themselves."""
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        # every rank: under ZeRO-3 gathering the trained tensors is a collective; one rank writes
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            Path(output_dir, ARGS_NAME).write_text(self.args.to_json_string())

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's push of each saved checkpoint to the Hub (`push_to_hub=True`, `hub_strategy`), with memgen's
        files. Trainer's own copies the checkpoint's model files into `output_dir` by Hugging Face's names before
        uploading it, which left out `memgen.safetensors` (every push until the last carried a config without its
        weights), and writes the arguments there as a pickle (`training_args.bin`); this one copies the memgen
        checkpoint and the arguments' JSON. What is uploaded, when, and under which message is Trainer's."""
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        if not args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return  # the previous push is still uploading: skip this one, as Trainer does
        self.callback_handler.on_push_begin(args, self.state, self.control)
        for name in (CONFIG_NAME, WEIGHTS_NAME, ARGS_NAME):
            if os.path.isfile(os.path.join(checkpoint_folder, name)):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(args.output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(args.output_dir)
        api = huggingface_hub.HfApi(token=args.hub_token)
        steps = args.save_strategy == SaveStrategy.STEPS
        message = f"Training in progress, step {self.state.global_step}" if steps else \
            f"Training in progress, epoch {int(self.state.epoch)}"
        jobs = [api.upload_folder(repo_id=self.hub_model_id, folder_path=args.output_dir, commit_message=message,
                                  run_as_future=True, ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"],
                                  revision=args.hub_revision)]
        if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            in_repo = "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            jobs.append(api.upload_folder(repo_id=self.hub_model_id, folder_path=checkpoint_folder,
                                          path_in_repo=in_repo, commit_message=message + ", checkpoint",
                                          run_as_future=True, revision=args.hub_revision))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint {resume_from_checkpoint!r} holds no {WEIGHTS_NAME}")
        load_strict(self.accelerator.unwrap_model(model or self.model), load_file(path))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._own_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_optimizer_state(self.optimizer.state_dict(), self.lr_scheduler.state_dict(), output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._own_state():
            return super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, f"{OPTIMIZER}.json")):
            return
        optimizer_state, scheduler_state = load_optimizer_state(checkpoint)
        self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(scheduler_state)

    def _rng_stem(self, directory: str) -> str:
        name = "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"
        return os.path.join(directory, name)

    def _save_rng_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        save_rng_state(self._rng_stem(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and os.path.isfile(self._rng_stem(checkpoint) + ".json"):
            load_rng_state(self._rng_stem(checkpoint))
