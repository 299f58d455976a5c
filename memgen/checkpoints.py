"""Saving and loading MemGen checkpoints: memgen's own format and the reference implementation's two.

memgen's format: `config.json` (MemGenConfig) and `memgen.safetensors` holding only what trains,
under the names of `MemGenModel.stage_parameters` (LoRA tensors as PEFT names them inside the base,
e.g. `weaver.model.model.layers.0.self_attn.q_proj.lora_A.weaver.weight`).

The reference implementation's formats, detected automatically:
(a) its save_pretrained directory: `projs.bin`, `weaver.bin`, `trigger.bin` (torch pickles, read
    with weights_only=True) and PEFT adapter folders `weaver/weaver/`, `trigger/trigger/`;
(b) one `model.safetensors` of its whole module state (`weaver.prompt_query_latents`,
    `weaver.model.base_model.model.<path>.lora_A.weaver.weight`, `reasoner.<path>`, ...).

Loading is strict: every tensor the model trains must be present with its shape, and every tensor
read must land somewhere. The only tensors read and not loaded are the frozen base weights that
format (b) carries (`reasoner.*`, `*.base_layer.*`, ...), and the trigger's in a model whose trigger
mode is `always`; both are counted in the log. Those base weights are compared with the bases the
model was built on (`check_base_weights`): adapters trained on another base would load without
complaint and generate nonsense.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_file

from memgen.config import MemGenConfig, lora_settings
from memgen.sharding import parameters_gathered, whole

logger = logging.getLogger(__name__)
WEIGHTS_NAME = "memgen.safetensors"
_STAGE_PREFIXES = ("weaver.", "reasoner_to_weaver.", "weaver_to_reasoner.", "trigger.")


def save(model, path: str, is_main_process: bool = True) -> None:
    params = {k: v for stage in ("weaver", "trigger") for k, v in model.stage_parameters(stage).items()}
    with parameters_gathered(list(params.values())):
        state = {k: whole(v.detach()).to("cpu").contiguous() for k, v in params.items()}  # every rank: collectives
    if not is_main_process:
        return
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt", "producer": "memgen"})


def push(model, repo_id: str, commit_message: str | None = None, private: bool | None = None,
         token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
         is_main_process: bool = True) -> Any:
    """Save the checkpoint to a temporary directory and upload it to the Hub repository `repo_id` (created where it
    does not exist), as one commit; the commit's info on the main process, None on the others (which take part
    in gathering a sharded model's tensors)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id must be a Hub repository id ('name' or 'namespace/name'), got {repo_id!r}: "
                         f"{error}") from error
    with tempfile.TemporaryDirectory(prefix="memgen-push-") as folder:
        save(model, folder, is_main_process=is_main_process)
        if not is_main_process:
            return None
        api = huggingface_hub.HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload memgen checkpoint")


def checkpoint_directory(path: str, revision: str | None = None) -> str:
    """`path` where it is a local directory; otherwise a Hugging Face Hub repository of that id, downloaded (or taken
    from the Hub's cache; `revision`: a branch, tag or commit), as Hugging Face's `from_pretrained` does."""
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} names a version of a Hub repository; {path!r} is a local "
                             "directory")
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is a file: pass the checkpoint's directory")
    try:
        validate_repo_id(path)  # a mistyped local path goes no further
    except HFValidationError as error:
        raise FileNotFoundError(f"no checkpoint directory at {path!r}, nor is it a Hub repository id") from error
    try:
        return huggingface_hub.snapshot_download(repo_id=path, revision=revision)
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise FileNotFoundError(f"no checkpoint directory at {path!r}, and the Hugging Face Hub gave no repository of "
                                f"that id: {error}") from error


def load(cls, path: str, reasoner: Any, tokenizer: Any, config: MemGenConfig | None = None,
         weaver_base: Any = None, trigger_base: Any = None, check_base_weights: bool = True,
         revision: str | None = None, **model_kwargs: Any):
    path = checkpoint_directory(path, revision)
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        config = MemGenConfig.from_pretrained(path) if config is None else config
        state, ignored = load_file(os.path.join(path, WEIGHTS_NAME)), {}
    elif os.path.isfile(os.path.join(path, "projs.bin")):
        state, ignored = _read_reference_dir(path), {}
        config = config or _reference_config(path, state)
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        state, ignored = _split_reference_state(load_file(os.path.join(path, "model.safetensors")))
        config = config or _reference_config(path, state)
    else:
        raise FileNotFoundError(f"{path!r} holds no memgen checkpoint ({WEIGHTS_NAME}) nor a reference one "
                                "(projs.bin + weaver.bin + trigger.bin, or model.safetensors)")
    if reasoner is None:
        if not config.reasoner_name_or_path:
            raise ValueError("the checkpoint records no base model name: pass `reasoner=`")
        reasoner = config.reasoner_name_or_path
    if weaver_base is None and config.weaver_name_or_path:
        weaver_base = config.weaver_name_or_path
    if trigger_base is None and config.trigger_name_or_path:
        trigger_base = config.trigger_name_or_path
    model = cls.from_reasoner(reasoner, tokenizer, config, weaver_base=weaver_base, trigger_base=trigger_base,
                              **model_kwargs)
    if check_base_weights and ignored:
        check_bases(model, ignored)
    if config.trigger_mode == "always":
        ignored.update({k: v for k, v in state.items() if k.startswith("trigger.")})
        state = {k: v for k, v in state.items() if not k.startswith("trigger.")}
    loaded = load_strict(model, state)
    model.weaver_trained = True
    logger.info("memgen: loaded %d tensors from %s; %d tensors not needed (frozen base weights, or the trigger of "
                "an `always` model)", loaded, path, len(ignored))
    return model


def check_bases(model, frozen: dict[str, torch.Tensor]) -> None:
    """Raise unless format (b)'s frozen base weights (`reasoner.<name>`, `weaver.model.base_model.model.<name>`,
    `trigger.model.base_model.model.<name>`) equal the model's bases' tensors of those names, compared in the coarser
    of the two dtypes (a checkpoint saved in bfloat16 matches a float32 base rounded to bfloat16). Names the model's
    bases lack (a buffer Hugging Face no longer saves, a trigger the model does not build) are not compared."""
    trigger = getattr(model.trigger, "model", None)
    owners = {"reasoner.": model.reasoner, "weaver.model.base_model.model.": model.weaver.model,
              "trigger.model.base_model.model.": trigger}
    bases = {}
    differ, compared = [], 0
    for key, saved in frozen.items():
        prefix = next((p for p in owners if key.startswith(p)), None)
        if prefix is None or owners[prefix] is None:
            continue
        if prefix not in bases:  # the base's own tensors under their names without PEFT's `base_layer`
            bases[prefix] = {name.replace(".base_layer.", "."): tensor
                             for name, tensor in owners[prefix].state_dict().items() if ".lora_" not in name}
        mine = bases[prefix].get(key[len(prefix):].replace(".base_layer.", "."))
        if mine is None or mine.is_meta:  # (a base offloaded by accelerate has no values here)
            continue
        compared += 1
        if mine.shape != saved.shape:
            differ.append(f"{key}: shape {list(saved.shape)} in the checkpoint, {list(mine.shape)} in the model")
            continue
        coarse = max((saved.dtype, mine.dtype), key=_resolution)
        if not torch.equal(saved.to(coarse), mine.detach().to("cpu", coarse)):
            gap = (saved.float() - mine.detach().to("cpu").float()).abs().max().item()
            differ.append(f"{key}: values differ by up to {gap:.3g}")
    if differ:
        raise ValueError(f"the checkpoint's frozen base weights are not those of the model's bases: {len(differ)} of "
                         f"{compared} compared tensors differ (e.g. {differ[:3]}); its adapters were trained on "
                         "another base model. Pass the base it was trained with, or check_base_weights=False to load "
                         "them anyway")


def _resolution(dtype: torch.dtype) -> float:
    """A floating dtype's relative spacing (the coarser dtype's is larger); 0 for exact dtypes."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def load_strict(model, state: dict[str, torch.Tensor]) -> int:
    """Copy `state` into the model's trainable tensors; raise on anything missing, unexpected or misshapen."""
    expected = {**model.stage_parameters("weaver"), **model.stage_parameters("trigger")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if misshapen:
        problems.append(f"{len(misshapen)} with the wrong shape (e.g. {misshapen[:3]})")
    if problems:
        raise ValueError("checkpoint does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    return len(state)


# ---------------------------------------------------------------------- the reference formats


def _lora_key(adapter_key: str, adapter: str) -> str:
    """`base_model.model.<path>.lora_A.weight` (a PEFT adapter file) -> `<adapter>.model.<path>.lora_A.<adapter>.weight`."""
    prefix = "base_model.model."
    if not adapter_key.startswith(prefix) or not (".lora_A." in adapter_key or ".lora_B." in adapter_key):
        raise ValueError(f"unexpected tensor {adapter_key!r} in the {adapter} adapter (expected PEFT LoRA keys "
                         f"'{prefix}<module>.lora_A.weight')")
    path = adapter_key[len(prefix):]
    for part in ("lora_A", "lora_B"):
        path = path.replace(f".{part}.weight", f".{part}.{adapter}.weight")
    return f"{adapter}.model.{path}"


def _read_adapter(folder: str, adapter: str) -> dict[str, torch.Tensor]:
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"missing PEFT adapter weights {weights!r}")
    return {_lora_key(k, adapter): v for k, v in load_file(weights).items()}


def _torch_pickle(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_reference_dir(path: str) -> dict[str, torch.Tensor]:
    """Format (a), every trained tensor under memgen's names (the trigger's where its files exist)."""
    state: dict[str, torch.Tensor] = {}
    projections = _torch_pickle(os.path.join(path, "projs.bin"))
    for name in ("reasoner_to_weaver", "weaver_to_reasoner"):
        state.update({f"{name}.{k}": v for k, v in projections[name].items()})
    for name, value in _torch_pickle(os.path.join(path, "weaver.bin")).items():
        if isinstance(value, dict):  # a LayerNorm's state dict
            state.update({f"weaver.{name}.{k}": v for k, v in value.items()})
        else:
            state[f"weaver.{name}"] = value
    state.update(_read_adapter(os.path.join(path, "weaver", "weaver"), "weaver"))
    if os.path.isfile(os.path.join(path, "trigger.bin")):
        trigger = _torch_pickle(os.path.join(path, "trigger.bin"))
        state.update({f"trigger.output_layer.{k}": v for k, v in trigger["output_layer"].items()})
    if os.path.isdir(os.path.join(path, "trigger", "trigger")):
        state.update(_read_adapter(os.path.join(path, "trigger", "trigger"), "trigger"))
    return state


def _split_reference_state(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Format (b): the trained tensors under memgen's names, and the frozen base weights set aside."""
    state, ignored = {}, {}
    for key, value in raw.items():
        for adapter in ("weaver", "trigger"):
            peft_prefix = f"{adapter}.model.base_model.model."
            if key.startswith(peft_prefix):
                if f".lora_A.{adapter}." in key or f".lora_B.{adapter}." in key:
                    state[f"{adapter}.model.{key[len(peft_prefix):]}"] = value
                else:
                    ignored[key] = value  # the frozen base inside the PEFT wrapper
                break
        else:
            if key.startswith("reasoner."):
                ignored[key] = value
            elif key.startswith(_STAGE_PREFIXES):
                state[key] = value
            else:
                raise ValueError(f"unexpected tensor {key!r} in the reference checkpoint")
    return state, ignored


def _reference_config(path: str, tensors: dict[str, torch.Tensor]) -> MemGenConfig:
    """MemGenConfig for a reference checkpoint: latent counts from the tensors, the rest from its config.json."""
    settings: dict[str, Any] = {}
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            settings = json.load(f)
    if "weaver.prompt_query_latents" not in tensors:
        raise ValueError(f"{path!r}: no weaver.prompt_query_latents; not a MemGen reference checkpoint")
    weaver, trigger = settings.get("weaver", {}), settings.get("trigger", {})

    def lora(part: dict[str, Any], adapter: str) -> dict[str, Any] | None:
        folder = os.path.join(path, adapter, adapter, "adapter_config.json")
        if os.path.isfile(folder):
            with open(folder) as f:
                part = {"lora_config": json.load(f)}
        found = part.get("lora_config")
        if found is None:
            return None
        return lora_settings(found)

    weaver_lora = lora(weaver, "weaver")
    if weaver_lora is None or "lora_alpha" not in weaver_lora:
        raise ValueError(f"{path!r}: the weaver's LoRA settings (r, lora_alpha, target_modules) are not recorded; "
                         "pass `config=MemGenConfig(weaver_lora=...)` with the values it was trained with")
    trigger_active = bool(trigger.get("active", False))
    return MemGenConfig(
        prompt_latents_len=int(tensors["weaver.prompt_query_latents"].shape[0]),
        inference_latents_len=int(tensors["weaver.inference_query_latents"].shape[0]),
        max_prompt_aug_num=int(settings.get("max_prompt_aug_num", 1)),
        max_inference_aug_num=int(settings.get("max_inference_aug_num", 5)),
        weaver_lora=weaver_lora,
        trigger_lora=lora(trigger, "trigger") if trigger_active else None,
        trigger_mode="lora" if trigger_active else "always",
        reasoner_name_or_path=settings.get("reasoner_model_name") or settings.get("model_name")
        or weaver.get("model_name"),
    )
