"""Checkpoints: memgen's own format round-trips; both reference formats load; loading is strict and safe."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from memgen import MemGenConfig, MemGenModel
from memgen.adapters import tuner_layers
from offline import chat_tokenizer, sentencepiece_style, tiny_causal_lm
from test_modeling import make_batch, make_model

LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def randomize(model, seed):
    """Give every trainable tensor a distinctive value so that a load that misses one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in ("weaver", "trigger"):
            for p in model.trainable_parameters(stage):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def trained_state(model):
    return {k: v.detach().clone() for s in ("weaver", "trigger") for k, v in model.stage_parameters(s).items()}


def same_model(a, b):
    sa, sb = trained_state(a), trained_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    input_ids, mask, labels = make_batch(a, [2, 1], seed=3)
    assert torch.equal(a(input_ids, mask, labels).logits, b(input_ids, mask, labels).logits)


def fresh(arch="qwen2", trigger_mode="lora", seed=0):
    """The same base weights as make_model(seed=seed), with new trainables."""
    tok = chat_tokenizer()
    config = MemGenConfig(prompt_latents_len=3, inference_latents_len=2, max_inference_aug_num=4,
                          trigger_mode=trigger_mode, weaver_lora={"lora_dropout": 0.0}, trigger_lora={"lora_dropout": 0.0})
    return MemGenModel.from_reasoner(tiny_causal_lm(arch, len(tok), seed=seed), tok, config).eval()


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_own_format_round_trip(tmp_path, trigger_mode):
    model = make_model("qwen3", trigger_mode=trigger_mode)
    randomize(model, 1)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "memgen.safetensors")
    assert saved.keys() == trained_state(model).keys()  # only what trains: no base weights
    assert not any("base_layer" in k or k.startswith("reasoner.") for k in saved)
    tok = chat_tokenizer()
    loaded = MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen3", len(tok)), tokenizer=tok).eval()
    assert loaded.config.to_dict() == model.config.to_dict()
    same_model(model, loaded)


def test_base_model_loaded_by_its_recorded_name(tmp_path):
    tok = chat_tokenizer()
    base_dir = tmp_path / "base"
    tiny_causal_lm("llama", len(tok), seed=4).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = MemGenModel.from_reasoner(str(base_dir), config=MemGenConfig(weaver_lora={"lora_dropout": 0.0})).eval()
    assert model.config.reasoner_name_or_path == str(base_dir)
    randomize(model, 2)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MemGenModel.from_pretrained(tmp_path / "ckpt").eval()
    same_model(model, loaded)


def test_loading_arguments_reach_the_bases_loaded_by_name(tmp_path):
    """`from_reasoner(name, dtype=..., device_map=..., attn_implementation=...)` and `from_pretrained(ckpt, ...)`
    load the bases as `AutoModelForCausalLM.from_pretrained` would (they were refused as unknown arguments)."""
    tok = chat_tokenizer()
    base_dir = tmp_path / "base"
    tiny_causal_lm("qwen2", len(tok), seed=4).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    config = MemGenConfig(trigger_mode="lora", weaver_lora={"lora_dropout": 0.0})
    model = MemGenModel.from_reasoner(str(base_dir), config=config, dtype=torch.bfloat16, device_map="cpu",
                                      attn_implementation="eager").eval()
    assert model.dtype == torch.bfloat16 and model.reasoner.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.stage_parameters("weaver").values())
    randomize(model, 2)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MemGenModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, attn_implementation="eager").eval()
    assert loaded.dtype == torch.bfloat16 and loaded.reasoner.config._attn_implementation == "eager"
    same_model(model, loaded)
    assert MemGenModel.from_pretrained(tmp_path / "ckpt").dtype == torch.float32  # the saved base's own dtype
    # the tokenizer comes from the same place and revision as the base
    from transformers import AutoTokenizer
    asked = []
    load = AutoTokenizer.from_pretrained.__func__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained",
                      classmethod(lambda cls, name, **kw: asked.append(kw) or load(cls, name, **kw)))
        MemGenModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, local_files_only=True, revision=None)
    assert asked == [{"local_files_only": True}]
    with pytest.raises(ValueError, match=r"\['dtype'\] would load a base by name, but every base is given loaded"):
        MemGenModel.from_pretrained(tmp_path / "ckpt", reasoner=tiny_causal_lm("qwen2", len(tok), seed=4),
                                    tokenizer=tok, dtype=torch.bfloat16)


def test_a_base_whose_tokenizer_names_no_pad_token_loads_by_name(tmp_path):
    """Llama's and Mistral's tokenizers name no pad token. Where memgen loads the tokenizer itself (a reasoner or a
    checkpoint's base given by name) it pads with EOS, as the command line did; from_pretrained raised before.
    A tokenizer the caller hands over is theirs to set up."""
    tok = sentencepiece_style()
    base_dir = tmp_path / "base"
    tiny_causal_lm("llama", len(tok), seed=4).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = MemGenModel.from_reasoner(str(base_dir), config=MemGenConfig(weaver_lora={"lora_dropout": 0.0})).eval()
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id == tok.eos_token_id
    randomize(model, 2)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MemGenModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.tokenizer.pad_token_id == tok.eos_token_id
    same_model(model, loaded)
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        MemGenModel.from_reasoner(str(base_dir), tok)


def _peft_adapter(model, adapter, folder):
    os.makedirs(folder, exist_ok=True)
    prefix = f"{adapter}.model."
    tensors = {}
    for key, value in model.stage_parameters(adapter).items():
        if key.startswith(prefix):
            path = key[len(prefix):].replace(f".{adapter}.weight", ".weight")
            tensors[f"base_model.model.{path}"] = value.detach().clone()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", **LORA}, f)


def write_reference_dir(model, path, trigger_active=True):
    """The reference implementation's save_pretrained layout (format a)."""
    os.makedirs(path, exist_ok=True)
    w = model.weaver
    torch.save({"reasoner_to_weaver": model.reasoner_to_weaver.state_dict(),
                "weaver_to_reasoner": model.weaver_to_reasoner.state_dict()}, os.path.join(path, "projs.bin"))
    torch.save({"prompt_query_latents": w.prompt_query_latents.detach(),
                "inference_query_latents": w.inference_query_latents.detach(),
                "prompt_latent_ln": w.prompt_latent_ln.state_dict(), "inference_latent_ln": w.inference_latent_ln.state_dict(),
                "prompt_latent_scale": w.prompt_latent_scale.detach(),
                "inference_latent_scale": w.inference_latent_scale.detach()}, os.path.join(path, "weaver.bin"))
    torch.save({"output_layer": model.trigger.output_layer.state_dict()}, os.path.join(path, "trigger.bin"))
    _peft_adapter(model, "weaver", os.path.join(path, "weaver", "weaver"))
    _peft_adapter(model, "trigger", os.path.join(path, "trigger", "trigger"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"max_prompt_aug_num": 1, "max_inference_aug_num": 4,
                   "weaver": {"prompt_latents_len": 3, "inference_latents_len": 2, "lora_config": LORA},
                   "trigger": {"active": trigger_active, "lora_config": LORA}}, f)


def write_reference_safetensors(model, path):
    """The reference implementation's whole-module state (format b), frozen base weights included."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    base = model.reasoner.state_dict()
    for key, value in base.items():
        if "lora_" not in key:
            tensors[f"reasoner.{key.replace('.base_layer.', '.')}"] = value.clone()
        for adapter in ("weaver", "trigger"):
            other = "trigger" if adapter == "weaver" else "weaver"
            if f".{other}." not in key:  # each PEFT copy holds the base and its own adapter
                tensors[f"{adapter}.model.base_model.model.{key}"] = value.clone()
    w = model.weaver
    for name in ("prompt_query_latents", "inference_query_latents", "prompt_latent_scale", "inference_latent_scale"):
        tensors[f"weaver.{name}"] = getattr(w, name).detach().clone()
    for ln in ("prompt_latent_ln", "inference_latent_ln"):
        tensors.update({f"weaver.{ln}.{k}": v.clone() for k, v in getattr(w, ln).state_dict().items()})
    for proj in ("reasoner_to_weaver", "weaver_to_reasoner"):
        tensors.update({f"{proj}.{k}": v.clone() for k, v in getattr(model, proj).state_dict().items()})
    tensors.update({f"trigger.output_layer.{k}": v.clone() for k, v in model.trigger.output_layer.state_dict().items()})
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"max_prompt_aug_num": 1, "max_inference_aug_num": 4, "weaver": {"lora_config": LORA},
                   "trigger": {"active": True, "lora_config": LORA}}, f)
    return tensors


@pytest.mark.parametrize("layout", ["directory", "safetensors"])
def test_reference_formats_load(tmp_path, layout):
    model = fresh(seed=0)
    randomize(model, 3)
    if layout == "directory":
        write_reference_dir(model, tmp_path)
    else:
        tensors = write_reference_safetensors(model, tmp_path)
        assert "weaver.model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weaver.weight" in tensors
        assert "trigger.model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.trigger.weight" in tensors
    tok = chat_tokenizer()
    loaded = MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok).eval()
    assert loaded.config.trigger_mode == "lora" and loaded.config.prompt_latents_len == 3
    same_model(model, loaded)


def test_the_command_line_loads_every_checkpoint_format_s_base_in_its_dtype(tmp_path):
    """`--dtype` (memgen generate / eval, memgen train's `dtype`) reaches the base of a reference checkpoint, which
    names it under the reference's own key (it loaded in the saved dtype there), and of memgen's own."""
    from memgen.training.run import build_model

    tok = chat_tokenizer()
    base_dir = tmp_path / "base"
    tiny_causal_lm("qwen2", len(tok), seed=0).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = fresh(seed=0)
    randomize(model, 3)
    write_reference_dir(model, tmp_path / "reference")
    settings = json.loads((tmp_path / "reference" / "config.json").read_text())
    (tmp_path / "reference" / "config.json").write_text(json.dumps({**settings, "model_name": str(base_dir)}))
    model.config.reasoner_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "own")
    for checkpoint in ("reference", "own"):
        loaded = build_model(None, str(tmp_path / checkpoint), dtype="bfloat16")
        assert loaded.dtype == torch.bfloat16, checkpoint
        assert all(torch.equal(v, trained_state(model)[k]) for k, v in trained_state(loaded).items())
    assert build_model(str(base_dir), None, {"trigger_mode": "head"}, dtype="bfloat16").dtype == torch.bfloat16


def test_every_setting_of_the_reference_adapter_config_is_used_or_refused(tmp_path):
    """PEFT writes every LoraConfig field to adapter_config.json: those that change the adapter are used (rsLoRA's
    scaling) or refused by name (DoRA), never dropped."""
    from peft import LoraConfig

    model = fresh(seed=0)
    write_reference_dir(model, tmp_path)
    folder = os.path.join(tmp_path, "weaver", "weaver", "adapter_config.json")
    tok = chat_tokenizer()
    for extra, error in ((dict(use_rslora=True), None), (dict(use_dora=True), r"unsupported LoRA settings \['use_dora'\]")):
        fields = LoraConfig(**LORA, **extra).to_dict()
        with open(folder, "w") as f:
            json.dump({k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}, f)
        if error:
            with pytest.raises(ValueError, match=error):
                MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)
            continue
        loaded = MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)
        assert loaded.config.weaver_lora["use_rslora"] and loaded.config.weaver_lora["r"] == 16
        scaling = next(layer.scaling["weaver"] for layer in tuner_layers(loaded.reasoner) if "weaver" in layer.scaling)
        assert scaling == 32 / 16 ** 0.5


def test_reference_safetensors_must_match_the_base_it_is_loaded_on(tmp_path):
    model = fresh(seed=0)
    randomize(model, 3)
    write_reference_safetensors(model, tmp_path)
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match=r"frozen base weights are not those of the model's bases: \d+ of \d+ compared "
                                         r"tensors differ .*check_base_weights=False"):
        MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok), seed=1), tokenizer=tok)
    # one tensor changed is enough, and the error names it
    tensors = load_file(tmp_path / "model.safetensors")
    name = "weaver.model.base_model.model.model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 of \d+ compared tensors differ \(e.g. \['weaver.model.base_model.model"
                                         r".model.layers.1.mlp.up_proj.weight: values differ by up to 0.001"):
        MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)
    loaded = MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok,
                                         check_base_weights=False).eval()
    same_model(model, loaded)


def test_reference_safetensors_saved_in_bfloat16_match_a_float32_base(tmp_path):
    model = fresh(seed=0)
    tensors = write_reference_safetensors(model, tmp_path)
    save_file({k: v.to(torch.bfloat16) if "base_model" in k or k.startswith("reasoner.") else v
               for k, v in tensors.items()}, tmp_path / "model.safetensors")
    tok = chat_tokenizer()
    MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)
    with pytest.raises(ValueError, match="frozen base weights"):
        MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok), seed=1), tokenizer=tok)


def test_reference_directory_with_inactive_trigger_loads_as_always(tmp_path):
    model = fresh(seed=0)
    randomize(model, 5)
    write_reference_dir(model, tmp_path, trigger_active=False)
    tok = chat_tokenizer()
    loaded = MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)
    assert loaded.config.trigger_mode == "always" and loaded.trigger is None
    for key, value in trained_state(loaded).items():
        assert torch.equal(value, model.stage_parameters("weaver")[key]), key


def test_missing_misshapen_and_misnamed_tensors_raise(tmp_path):
    model = make_model("qwen2")
    model.save_pretrained(tmp_path)
    tok = chat_tokenizer()
    state = load_file(tmp_path / "memgen.safetensors")

    def load_with(tensors):
        save_file(tensors, tmp_path / "memgen.safetensors")
        return MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)

    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['weaver.prompt_latent_scale'\]\)"):
        load_with({k: v for k, v in state.items() if k != "weaver.prompt_latent_scale"})
    with pytest.raises(ValueError, match="wrong shape"):
        load_with({**state, "weaver.prompt_query_latents": torch.zeros(5, 64)})
    # an adapter saved under another name loads nothing in the reference code; here it cannot load at all
    renamed = {k.replace(".lora_A.weaver.", ".lora_A.default."): v for k, v in state.items()}
    with pytest.raises(ValueError, match="missing.*unexpected"):
        load_with(renamed)


def test_reference_adapter_for_modules_the_model_lacks_raises(tmp_path):
    model = fresh(seed=0)
    write_reference_dir(model, tmp_path)
    adapter = tmp_path / "weaver" / "weaver" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    tensors = {k.replace("q_proj", "k_proj"): v for k, v in tensors.items()}
    save_file(tensors, adapter)
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match="unexpected"):
        MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_reference_pickles_are_read_with_weights_only(tmp_path):
    model = fresh(seed=0)
    write_reference_dir(model, tmp_path)
    with open(tmp_path / "trigger.bin", "wb") as f:
        pickle.dump({"output_layer": Payload()}, f, protocol=2)  # torch.save's protocol
    tok = chat_tokenizer()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)


def test_no_checkpoint_here(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no memgen checkpoint"):
        MemGenModel.from_pretrained(tmp_path, reasoner=tiny_causal_lm("qwen2", 10))


def test_a_hub_repository_id_loads_through_the_hub(tmp_path, monkeypatch):
    """from_pretrained takes a Hugging Face Hub repository id, as Hugging Face's does; the download is faked here
    (the tests run offline)."""
    model = make_model("qwen2", trigger_mode="lora")
    randomize(model, 3)
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, revision=None):
        calls.append((repo_id, revision))
        if repo_id != "org/memgen-weaver":
            raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub, and nothing is cached")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tok = chat_tokenizer()
    loaded = MemGenModel.from_pretrained("org/memgen-weaver", reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok,
                                         revision="v1")
    same_model(model, loaded)
    with pytest.raises(FileNotFoundError, match="the Hugging Face Hub gave no repository of that id: cannot reach"):
        MemGenModel.from_pretrained("org/other", reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="nor is it a Hub repository id"):
        MemGenModel.from_pretrained(str(tmp_path / "missing" / "dir"), reasoner=model.reasoner)
    with pytest.raises(FileNotFoundError, match="is a file: pass the checkpoint's directory"):
        MemGenModel.from_pretrained(tmp_path / "snapshot" / "memgen.safetensors", reasoner=model.reasoner)
    with pytest.raises(ValueError, match="names a version of a Hub repository"):
        MemGenModel.from_pretrained(tmp_path / "snapshot", reasoner=model.reasoner, revision="v1")
    assert calls == [("org/memgen-weaver", "v1"), ("org/other", None)]  # local paths never reach the Hub


def test_push_to_hub_uploads_what_from_pretrained_loads(tmp_path, monkeypatch):
    """push_to_hub, as Hugging Face models have it: one commit of the save_pretrained files to a repository created
    where missing. The Hub is faked here (the tests run offline): its upload copies the folder."""
    model = make_model("qwen2", trigger_mode="lora")
    randomize(model, 5)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok, self.token))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=None):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), revision, create_pr,
                          commit_message))
            shutil.copytree(folder_path, tmp_path / "hub" / repo_id)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert model.push_to_hub("org/memgen-weaver", private=True, token="t", revision="dev") == "commit-info"
    assert calls == [("create_repo", "org/memgen-weaver", True, True, "t"),
                     ("upload_folder", "org/memgen-weaver", ["config.json", "memgen.safetensors"], "dev", False,
                      "Upload memgen checkpoint")]
    tok = chat_tokenizer()
    same_model(model, MemGenModel.from_pretrained(tmp_path / "hub" / "org" / "memgen-weaver",
                                                  reasoner=tiny_causal_lm("qwen2", len(tok)), tokenizer=tok))
    calls.clear()
    assert model.push_to_hub("org/other", is_main_process=False) is None and calls == []  # another rank: no upload
    with pytest.raises(ValueError, match="repo_id must be a Hub repository id .* got 'not a/valid/id'"):
        model.push_to_hub("not a/valid/id")
    assert calls == []
