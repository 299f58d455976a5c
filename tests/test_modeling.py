"""MemGenModel: the fast training forward equals the row-by-row reference; stages; shared base; bad input."""

from __future__ import annotations

import random

import pytest
import torch

from memgen import MemGenConfig, MemGenModel
from memgen.reference import reference_forward
from offline import ARCHITECTURES, chat_tokenizer, tiny_causal_lm


def make_model(arch="qwen2", *, k_prompt=3, k_inference=2, max_prompt=1, max_inference=4, trigger_mode="always",
               weaver_base=None, trigger_base=None, seed=0, dtype=torch.float32):
    tok = chat_tokenizer()
    reasoner = tiny_causal_lm(arch, len(tok), seed=seed).to(dtype)
    config = MemGenConfig(prompt_latents_len=k_prompt, inference_latents_len=k_inference,
                          max_prompt_aug_num=max_prompt, max_inference_aug_num=max_inference,
                          trigger_mode=trigger_mode, weaver_lora={"lora_dropout": 0.0},
                          trigger_lora={"lora_dropout": 0.0})
    model = MemGenModel.from_reasoner(reasoner, tok, config, weaver_base=weaver_base,
                                      trigger_base=trigger_base).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, p in model.stage_parameters("weaver").items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def token_pools(model):
    """(delimiter tokens, other tokens but padding) of the model's vocabulary."""
    table = model.delimiter_table
    delimiters = table.nonzero().flatten().tolist()
    plain = [i for i in range(len(table)) if not table[i] and i != model.tokenizer.pad_token_id]
    return delimiters, plain


def make_batch(model, n_delimiters, padding="left", seed=0):
    """One row per entry of n_delimiters: a prompt, then an answer with that many delimiter tokens inside."""
    rng = random.Random(seed)
    delimiters, plain = token_pools(model)
    rows = []
    for n in n_delimiters:
        prompt = [rng.choice(plain) for _ in range(rng.randint(1, 9))]
        answer = [rng.choice(plain) for _ in range(rng.randint(n + 2, n + 12))]
        for pos in rng.sample(range(0, len(answer) - 1), n):
            answer[pos] = rng.choice(delimiters)
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    return pad_rows(rows, model.tokenizer.pad_token_id, padding)


def pad_rows(rows, pad_id, padding):
    """(input_ids, attention_mask, labels) from (ids, labels) lists, padded on the left or the right."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        cols = slice(length - len(ids), length) if padding == "left" else slice(0, len(ids))
        input_ids[b, cols], labels[b, cols], mask[b, cols] = torch.tensor(ids), torch.tensor(lab), 1
    return input_ids, mask, labels


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def assert_matches_reference(model, input_ids, mask, labels, latent_scale_tolerance=None, **kwargs):
    """The training forward against `reference_forward`: loss and logits within 1e-5 relative, the weaver's
    gradients within 1e-4. `latent_scale_tolerance`: compare the latent scales' gradients within
    1e-7 + tolerance x the reference's instead (sums of many cancelling terms: float32 noise shows). A batch
    without insertion points gives no weaver gradient on either side."""
    model.zero_grad()
    out = model(input_ids, mask, labels, **kwargs)
    out.loss.backward()
    fast_grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.stage_parameters("weaver").items()}
    model.zero_grad()
    points = kwargs.get("augmentation_points")
    ref_points = None
    if points is not None:
        ref_points = [{j: ("prompt" if out.augmentation_points[b, j] == 1 else "inference")
                       for j in (out.augmentation_points[b] != 0).nonzero().flatten().tolist()}
                      for b in range(input_ids.shape[0])]
    ref_loss, ref_logits = reference_forward(model, input_ids, mask, labels, points=ref_points)
    assert rel_err(out.loss, ref_loss) < 1e-5, (out.loss.item(), ref_loss.item())
    real = mask.bool()
    assert rel_err(out.logits[real], ref_logits[real]) < 1e-5
    assert (out.logits[~real] == 0).all()
    if not out.augmentation_points.any():  # the weaver took no part
        assert not ref_loss.requires_grad and all(g is None for g in fast_grads.values())
        return out
    ref_loss.backward()
    for name, p in model.stage_parameters("weaver").items():
        if fast_grads[name] is None or p.grad is None:  # e.g. prompt queries when no row has a prompt point
            assert fast_grads[name] is None and p.grad is None, name
            continue
        assert torch.isfinite(fast_grads[name]).all(), name
        if latent_scale_tolerance is not None and "latent_scale" in name:
            bound = 1e-7 + latent_scale_tolerance * p.grad.abs().max()
            assert (fast_grads[name] - p.grad).abs().max() <= bound, name
        else:
            assert rel_err(fast_grads[name], p.grad) < 1e-4, (name, rel_err(fast_grads[name], p.grad))
    assert all(p.grad is None for p in model.reasoner.parameters() if not p.requires_grad)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("n_delimiters", [[2], [0, 5, 1], [3, 0, 1, 7, 2, 4, 5, 1]], ids=["B1", "B3", "B8"])
def test_forward_matches_reference(arch, padding, n_delimiters):
    model = make_model(arch)
    input_ids, mask, labels = make_batch(model, n_delimiters, padding, seed=len(n_delimiters))
    out = assert_matches_reference(model, input_ids, mask, labels)
    counts = (out.augmentation_points != 0).sum(1).tolist()
    # the prompt point plus up to 4 inference points (delimiters sit inside the answer, never last)
    assert counts == [1 + min(n, 4) for n in n_delimiters], counts


def test_int32_token_ids_give_the_int64_forward():
    model = make_model("qwen2")
    input_ids, mask, labels = make_batch(model, [2, 0, 3], "right", seed=4)
    want = model(input_ids, mask, labels)
    got = model(input_ids.int(), mask, labels.int())
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    assert torch.equal(got.augmentation_points, want.augmentation_points)


def make_conversations(model, turns_per_row, padding="left", seed=0):
    """Rows of alternating prompt and answer segments; answers carry delimiters."""
    rng = random.Random(seed)
    delimiters, plain = token_pools(model)
    rows = []
    for turns in turns_per_row:
        ids, lab = [], []
        for _ in range(turns):
            prompt = [rng.choice(plain) for _ in range(rng.randint(1, 5))]
            answer = [rng.choice(delimiters) if rng.random() < 0.3 else rng.choice(plain)
                      for _ in range(rng.randint(2, 8))]
            ids += prompt + answer
            lab += [-100] * len(prompt) + answer
        if rng.random() < 0.5:  # trailing tokens after the last answer
            tail = [rng.choice(plain) for _ in range(2)]
            ids, lab = ids + tail, lab + [-100, -100]
        rows.append((ids, lab))
    return pad_rows(rows, model.tokenizer.pad_token_id, padding)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("max_prompt", [1, 3])
def test_conversations_match_reference(padding, max_prompt):
    model = make_model("qwen2", max_prompt=max_prompt, max_inference=2)
    input_ids, mask, labels = make_conversations(model, [3, 1, 2, 4], padding, seed=max_prompt)
    model.zero_grad()
    out = model(input_ids, mask, labels, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in model.stage_parameters("weaver").items() if p.grad is not None}
    model.zero_grad()
    ref_loss, ref_logits = reference_forward(model, input_ids, mask, labels, generator=torch.Generator().manual_seed(7))
    ref_loss.backward()
    real = mask.bool()
    assert rel_err(out.loss, ref_loss) < 1e-5
    assert rel_err(out.logits[real], ref_logits[real]) < 1e-5
    for name, p in model.stage_parameters("weaver").items():
        if p.grad is not None:
            assert rel_err(fast[name], p.grad) < 1e-4, name
    prompt_points = (out.augmentation_points == 1).sum(1).tolist()
    assert prompt_points == [min(3, max_prompt), 1, min(2, max_prompt), min(4, max_prompt)]


def test_rows_with_zero_to_five_points_and_odd_k():
    model = make_model("llama", k_prompt=1, k_inference=4, max_prompt=0, max_inference=5)
    input_ids, mask, labels = make_batch(model, [0, 1, 2, 3, 4, 5, 6], "left", seed=3)
    out = assert_matches_reference(model, input_ids, mask, labels)
    assert (out.augmentation_points != 0).sum(1).tolist() == [0, 1, 2, 3, 4, 5, 5]


@pytest.mark.parametrize("form", ["mask", "lists"])
def test_explicit_points_override_the_rule(form):
    model = make_model("qwen2")
    input_ids, mask, labels = make_batch(model, [2, 4, 0], "left", seed=5)
    answer = (labels != -100)
    g = torch.Generator().manual_seed(0)
    chosen = answer & (torch.rand(answer.shape, generator=g) < 0.2)  # arbitrary answer positions
    given = chosen.long() if form == "mask" else [row.nonzero().flatten().tolist() for row in chosen]
    out = assert_matches_reference(model, input_ids, mask, labels, augmentation_points=given)
    assert torch.equal(out.augmentation_points != 0, chosen)


def _plain_token_logps(logits, input_ids, labels, temperature=1.0):
    """The reference: log-softmax of the whole [B, L, V] logits / temperature, read at each labelled token."""
    logps = torch.zeros(input_ids.shape)
    logps[:, 1:] = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(
        -1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.where(labels != -100, logps, 0.0)


@pytest.mark.parametrize("padding,chunk_size,seed,temperature", [("left", 1, 0, 1.0), ("right", 7, 1, 0.7),
                                                                 ("left", 10_000, 2, 1.3)])
def test_chunked_token_logps_equal_the_full_log_softmax(padding, chunk_size, seed, temperature):
    model = make_model("qwen2", k_prompt=3, k_inference=2, seed=seed).train()
    input_ids, mask, labels = make_batch(model, [3, 0, 5, 1, 2], padding, seed=seed)
    g = torch.Generator().manual_seed(seed)
    points = ((labels != -100) & (torch.rand(labels.shape, generator=g) < 0.3)).long()
    weaver = model.stage_parameters("weaver")

    def run(**kwargs):
        model.zero_grad()
        out = model(input_ids, mask, labels, augmentation_points=points, **kwargs)
        logps = (out.token_logps if "token_logps" in kwargs
                 else _plain_token_logps(out.logits, input_ids, labels, temperature))
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
        return logps.detach(), {k: p.grad.clone() for k, p in weaver.items() if p.grad is not None}

    want, want_grads = run()
    got, got_grads = run(token_logps=True, logps_chunk_size=chunk_size, logps_temperature=temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[labels == -100] == 0).all() and (got[labels != -100][1:] != 0).all()
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_logps_needs_labels_and_a_chunk_size():
    model = make_model("qwen2")
    input_ids, mask, labels = make_batch(model, [1], "left")
    with pytest.raises(ValueError, match="token_logps=True needs labels"):
        model(input_ids, mask, memory=False, token_logps=True)
    with pytest.raises(ValueError, match="logps_chunk_size"):
        model(input_ids, mask, labels, token_logps=True, logps_chunk_size=0)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids, mask, labels, token_logps=True, trigger_logits=True)
    for bad in (0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="logps_temperature must be a finite number > 0"):
            model(input_ids, mask, labels, token_logps=True, logps_temperature=bad)


def test_memory_off_and_zero_budgets_are_the_bare_reasoner():
    model = make_model("qwen3", max_prompt=0, max_inference=0)
    input_ids, mask, labels = make_batch(model, [3, 1], "right", seed=7)
    bare = model.reasoner(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    no_points = model(input_ids, mask, labels)
    assert (no_points.augmentation_points == 0).all()
    assert rel_err(no_points.logits[real], bare[real]) < 1e-5
    off = make_model("qwen3")(input_ids, mask, labels, memory=False)
    assert rel_err(off.logits[real], bare[real]) < 1e-5


def test_weaver_on_a_separate_base_with_another_hidden_size():
    tok = chat_tokenizer()
    weaver_base = tiny_causal_lm("llama", len(tok), hidden_size=32, seed=9)
    model = make_model("qwen2", weaver_base=weaver_base)
    assert model.weaver.model is weaver_base and model.reasoner_to_weaver.weight.shape == (32, 64)
    input_ids, mask, labels = make_batch(model, [1, 3], "left", seed=11)
    assert_matches_reference(model, input_ids, mask, labels)


def test_one_copy_of_the_base_weights():
    model = make_model("qwen2", trigger_mode="lora")
    assert model.weaver.model is model.reasoner and model.trigger.model is model.reasoner
    embed = model.reasoner.get_input_embeddings().weight
    assert model.weaver.model.get_input_embeddings().weight.data_ptr() == embed.data_ptr()
    base = sum(p.numel() for n, p in model.reasoner.named_parameters() if "lora_" not in n)
    total = sum(p.numel() for p in model.parameters())  # parameters() counts shared tensors once
    extras = sum(p.numel() for stage in ("weaver", "trigger") for p in model.trainable_parameters(stage))
    assert total == base + extras


def test_stages_train_only_their_parameters():
    model = make_model("qwen2", trigger_mode="lora")
    weaver, trigger = model.stage_parameters("weaver"), model.stage_parameters("trigger")
    assert weaver and trigger and not set(map(id, weaver.values())) & set(map(id, trigger.values()))
    assert all(p.requires_grad for p in weaver.values()) and not any(p.requires_grad for p in trigger.values())
    model.set_trainable("trigger")
    assert all(p.requires_grad for p in trigger.values()) and not any(p.requires_grad for p in weaver.values())
    model.set_trainable(None)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_trainable("weaver")
    input_ids, mask, labels = make_batch(model, [2], seed=1)
    model(input_ids, mask, labels).loss.backward()
    assert all(p.grad is not None for p in weaver.values())
    base = [p for n, p in model.reasoner.named_parameters() if "lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in base)
    with pytest.raises(ValueError, match="stage must be one of"):
        model.set_trainable("reasoner")


def test_bfloat16_base_keeps_float32_trainables():
    model = make_model("qwen2", dtype=torch.bfloat16)
    assert model.reasoner.get_input_embeddings().weight.dtype == torch.bfloat16
    input_ids, mask, labels = make_batch(model, [2, 1], seed=2)
    out = model(input_ids, mask, labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.stage_parameters("weaver").items():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), name


def test_device_and_dtype_name_where_inputs_go():
    """Hugging Face habits: `batch.to(model.device)` and `model.dtype` (the reasoner's)."""
    model = make_model("qwen2", trigger_mode="lora", dtype=torch.bfloat16)
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
    input_ids, mask, _ = make_batch(model, [2, 1], seed=3)
    out = model.generate(input_ids.to(model.device), mask.to(model.device), max_new_tokens=4)
    assert out.shape == (2, input_ids.shape[1] + 4)
    assert model.to(torch.float32).dtype == torch.float32


def _own_tensors(model):
    """memgen's own parameters and buffers: what is not a base's (the adapters are, PEFT adds them to the base)."""
    bases = {id(t) for base in (model.reasoner, model.weaver.model) for t in (*base.parameters(), *base.buffers())}
    return {name: t for name, t in (*model.named_parameters(), *model.named_buffers()) if id(t) not in bases}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_a_reasoner_on_cuda_gives_a_model_there_with_the_cpu_s_initial_values(trigger_mode):
    """A reasoner loaded onto a GPU (`device_map="cuda"`, `.to("cuda")`) gives a MemGen model whose own modules are
    there too, drawn as on the CPU from the same seed; it generates without a `.to()` of its own."""
    tok = chat_tokenizer()
    config = MemGenConfig(trigger_mode=trigger_mode, prompt_latents_len=3, inference_latents_len=2)
    built = {}
    for device in ("cpu", "cuda"):
        reasoner = tiny_causal_lm("qwen2", len(tok), seed=0).to(device)
        torch.manual_seed(7)
        built[device] = MemGenModel.from_reasoner(reasoner, tok, config).eval()
    on_gpu, on_cpu = built["cuda"], built["cpu"]
    assert {t.device.type for t in (*on_gpu.parameters(), *on_gpu.buffers())} == {"cuda"}
    assert on_gpu.device == torch.device("cuda", torch.cuda.current_device())
    mine, theirs = _own_tensors(on_gpu), _own_tensors(on_cpu)
    assert mine.keys() == theirs.keys() and len(mine) > 4
    assert all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine)
    input_ids, mask, _ = make_batch(on_cpu, [2, 1], seed=3)
    out = on_gpu.generate(input_ids.to(on_gpu.device), mask.to(on_gpu.device), max_new_tokens=8)
    assert out.device == on_gpu.device and out.shape == (2, input_ids.shape[1] + 8)


# ------------------------------------------------------------------ bad input


def test_bad_labels_and_shapes():
    model = make_model("qwen2")
    input_ids, mask, labels = make_batch(model, [1, 2], seed=4)
    no_answer = torch.full_like(labels, -100)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] have no answer tokens"):
        model(input_ids, mask, no_answer)
    two_spans = labels.clone()
    two_spans[0, (labels[0] != -100).nonzero()[2, 0]] = -100
    with pytest.raises(ValueError, match="several answer spans"):
        model(input_ids, mask, two_spans, augmentation_points=[[], []])
    first = labels.clone()
    first[1] = torch.where(mask[1].bool(), input_ids[1], -100)
    with pytest.raises(ValueError, match="must follow at least one prompt token"):
        model(input_ids, mask, first)
    with pytest.raises(ValueError, match="attention_mask must match"):
        model(input_ids, mask[:, 1:], labels)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \[2, \d+\] like input_ids"):
        model(input_ids, mask, labels[:1])
    with pytest.raises(ValueError, match="like input_ids, got list"):
        model(input_ids, mask, labels.tolist())
    with pytest.raises(ValueError, match="labels are required"):
        model(input_ids, mask)
    with pytest.raises(ValueError, match="not an answer position"):
        model(input_ids, mask, labels, augmentation_points=[[int(mask[0].argmax())], []])
    padded_labels = labels.clone()
    padded_labels[0, 0] = 5
    with pytest.raises(ValueError, match="-100 at padding"):
        model(input_ids, mask, padded_labels)


def test_bad_construction():
    tok = chat_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="tokenizer.pad_token = tokenizer.eos_token"):
        MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(tok)), tok)
    # the message lists the model's own linear layers as the names to pick from
    with pytest.raises(ValueError, match="match no module.*its linear layers: down_proj, gate_proj, k_proj, lm_head, "
                                         "o_proj, q_proj, up_proj, v_proj"):
        MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(chat_tokenizer())), chat_tokenizer(),
                                  MemGenConfig(weaver_lora={"target_modules": ["no_such_proj"]}))


def test_a_second_model_on_the_same_base_warns_that_the_first_now_runs_its_adapters(recwarn):
    tok = chat_tokenizer()
    reasoner = tiny_causal_lm("qwen2", len(tok))
    first = MemGenModel.from_reasoner(reasoner, tok)
    assert not recwarn.list
    with pytest.warns(UserWarning, match="the reasoner already carries memgen's weaver adapter: another MemGenModel"):
        second = MemGenModel.from_reasoner(reasoner, tok)
    adapters = [{name: p for name, p in model.stage_parameters("weaver").items() if ".lora_" in name}
                for model in (first, second)]
    assert adapters[1] and all(adapters[0][name] is p for name, p in adapters[1].items())  # as the warning says


def test_an_adapter_on_a_layer_that_is_not_linear_is_refused_and_the_model_left_as_it_was():
    from memgen.adapters import adapter_names

    tok = chat_tokenizer()
    reasoner = tiny_causal_lm("qwen2", len(tok))
    with pytest.raises(ValueError, match=r"weaver_lora\['target_modules'\] = \['embed_tokens', 'q_proj'\] names layers "
                                         r"that are not linear \(model.embed_tokens\)"):
        MemGenModel.from_reasoner(reasoner, tok, MemGenConfig(weaver_lora={"target_modules": ["embed_tokens", "q_proj"]}))
    assert not adapter_names(reasoner) and not hasattr(reasoner, "peft_config")
    assert type(reasoner.get_input_embeddings()) is torch.nn.Embedding
    assert MemGenModel.from_reasoner(reasoner, tok).reasoner is reasoner  # and it builds


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call on 5.23+
def test_a_base_with_adapters_of_its_own_is_refused():
    """memgen runs its bases bare or with its own adapter active: a user's adapter (added by transformers'
    `add_adapter`/`load_adapter`, or a PeftModel) would be silently left out of every forward, so it is refused."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    tok = chat_tokenizer()
    adapted = tiny_causal_lm("qwen2", len(tok))  # as transformers' add_adapter leaves a model
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), adapted, adapter_name="mine")
    with pytest.raises(ValueError, match=r"reasoner carries adapters of its own \(mine\).*merge_and_unload"):
        MemGenModel.from_reasoner(adapted, tok)
    with pytest.raises(ValueError, match=r"weaver_base carries adapters of its own \(mine\)"):
        MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(tok)), tok, weaver_base=adapted)
    wrapped = get_peft_model(tiny_causal_lm("qwen2", len(tok)), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"reasoner is a PEFT model \(PeftModel\w*\).*merge_and_unload"):
        MemGenModel.from_reasoner(wrapped, tok)
    merged = wrapped.merge_and_unload()  # as the message says: then it builds
    assert MemGenModel.from_reasoner(merged, tok).reasoner is merged


def test_a_trigger_base_with_a_smaller_vocabulary_is_refused():
    """The `lora` trigger reads the reasoner's token ids through its own embedding: a base with fewer rows than the
    tokenizer has ids failed mid-generation with an IndexError."""
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match=rf"trigger_base must share the reasoner's tokenizer: its embedding has "
                                         rf"{len(tok) - 50} rows, the tokenizer {len(tok)} ids"):
        MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(tok)), tok, MemGenConfig(trigger_mode="lora"),
                                  trigger_base=tiny_causal_lm("llama", len(tok) - 50))


def test_a_model_with_offloaded_layers_is_refused(tmp_path):
    """accelerate leaves an offloaded module's weights on the meta device; LoRA layers added there would be meta too,
    and a product with a meta weight returns uninitialised memory, not an error: refused when the model is built."""
    from transformers import AutoModelForCausalLM

    tok = chat_tokenizer()
    tiny_causal_lm("qwen2", len(tok), layers=3).save_pretrained(tmp_path / "lm")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    for base in ("reasoner", "weaver_base"):
        with pytest.raises(ValueError, match=rf"{base} has 12 parameters on the meta device, without values \(e.g. "
                                             r"model.layers.1.self_attn.q_proj.weight.*device_map=\{'': 0\}"):
            kwargs = {"reasoner": offloaded} if base == "reasoner" else {
                "reasoner": tiny_causal_lm("qwen2", len(tok)), "weaver_base": offloaded}
            MemGenModel.from_reasoner(tokenizer=tok, **kwargs)


@pytest.mark.parametrize("targets,expected", [
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),  # not the LM head
    (r".*\.layers\.1\.self_attn\.(q|v)_proj", {"q_proj", "v_proj"}),  # a regular expression: layer 1 only
    (["q_proj", "o_proj"], {"q_proj", "o_proj"}),
])
def test_lora_targets_keep_peft_s_meaning(targets, expected):
    """A string is PEFT's: "all-linear" or a regular expression over module paths, not one module name."""
    tok = chat_tokenizer()
    model = MemGenModel.from_reasoner(tiny_causal_lm("qwen2", len(tok)), tok,
                                      MemGenConfig(weaver_lora={"target_modules": targets}))
    paths = {name.split(".lora_")[0] for name in model.stage_parameters("weaver") if ".lora_" in name}
    assert {path.rsplit(".", 1)[-1] for path in paths} == expected
    if isinstance(targets, str) and targets != "all-linear":
        assert all(".layers.1." in path for path in paths)
    assert model.config.weaver_lora["target_modules"] == targets


@pytest.mark.parametrize("kwargs,match", [
    (dict(trigger_mode="sometimes"), "trigger_mode must be one of"),
    (dict(prompt_latents_len=0), "prompt_latents_len must be an int >= 1"),
    (dict(max_inference_aug_num=-1), "max_inference_aug_num must be an int >= 0"),
    (dict(delimiters=[]), "delimiters must be a non-empty sequence"),
    (dict(weaver_lora={"rank": 8}), r"unsupported LoRA settings \['rank'\]"),
    (dict(trigger_lora={"lora_dropout": 1.5}), r"lora_dropout'\] must be in \[0, 1\)"),
    (dict(weaver_lora={"target_modules": ""}), r"target_modules'\] must not be empty"),
    (dict(weaver_lora={"target_modules": []}), r"a non-empty list of module names, a regular expression or 'all-linear'"),
])
def test_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemGenConfig(**kwargs)


def test_a_peft_lora_config_is_taken_whole_or_refused():
    """A LoraConfig's settings are used (its target set too); one it sets that memgen does not pass on is refused by
    name, not dropped (DoRA, extra trained modules, per-layer ranks)."""
    from peft import LoraConfig

    config = MemGenConfig(weaver_lora=LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"],
                                                 use_rslora=True, task_type="CAUSAL_LM"))
    assert {k: config.weaver_lora[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora")} == \
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_rslora=True)
    for setting in (dict(use_dora=True), dict(modules_to_save=["lm_head"]), dict(rank_pattern={"q_proj": 2})):
        with pytest.raises(ValueError, match=rf"weaver_lora has unsupported LoRA settings \['{next(iter(setting))}'\]"):
            MemGenConfig(weaver_lora=LoraConfig(r=4, **setting))


def test_lora_settings_from_another_peft_release():
    """An adapter_config.json as an older PEFT wrote it (runtime-only `runtime_config`, every default spelled out)
    gives the settings alone; a field the installed PEFT does not know is ignored with a warning, as PEFT does."""
    from memgen.config import lora_settings

    written = {"alpha_pattern": {}, "base_model_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "bias": "none",
               "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
               "loftq_config": {}, "lora_alpha": 32, "lora_dropout": 0.1, "modules_to_save": None, "peft_type": "LORA",
               "r": 16, "rank_pattern": {}, "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM",
               "use_dora": False, "use_rslora": False, "runtime_config": {"ephemeral_gpu_offload": False},
               "a_later_release_s_setting": 3}
    with pytest.warns(UserWarning, match=r"unknown to the installed PEFT .* ignored: \['a_later_release_s_setting'\]"):
        settings = lora_settings(written)
    assert settings == dict(bias="none", fan_in_fan_out=False, init_lora_weights=True, lora_alpha=32, lora_dropout=0.1,
                            r=16, target_modules=["v_proj", "q_proj"], use_rslora=False)


def test_config_round_trip():
    config = MemGenConfig(prompt_latents_len=4, max_inference_aug_num=2, trigger_mode="head", delimiters=[".", "!"])
    again = MemGenConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_bare_base_computes_the_frozen_model_without_lora_layers_and_restores_them():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from memgen.adapters import BareBase, active_adapter

    model = make_model("qwen2", trigger_mode="lora")
    with torch.no_grad():  # nonzero LoRA B, so that an active adapter would change the output
        for name, p in model.reasoner.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 50, (2, 7))
    decoder = model.reasoner.get_decoder()
    with torch.no_grad(), active_adapter(model.reasoner, None):
        want = decoder(input_ids=ids).last_hidden_state
    before = dict(model.reasoner.named_modules())
    assert any(isinstance(m, BaseTunerLayer) for m in before.values())
    bare = BareBase(model.reasoner)
    with torch.no_grad(), bare():
        assert not any(isinstance(m, BaseTunerLayer) for m in model.reasoner.modules())
        got = decoder(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError), bare():
        raise RuntimeError("restored even so")
    after = dict(model.reasoner.named_modules())  # the very same modules under the same names
    assert after.keys() == before.keys() and all(after[name] is module for name, module in before.items())


@pytest.mark.parametrize("trigger_mode", ["always", "lora", "head"])
def test_a_model_cast_whole_to_bfloat16_generates_and_trains(trigger_mode):
    """DeepSpeed's bf16 mode casts every parameter, the trainable projections too: they then compute in bfloat16
    (they had failed on their float32 inputs)."""
    model = make_model("qwen2", trigger_mode=trigger_mode).to(torch.bfloat16)
    assert model.reasoner_to_weaver.weight.dtype == torch.bfloat16
    input_ids, mask, labels = make_batch(model, [2, 1], "right", seed=2)
    out = model.generate(input_ids, mask, max_new_tokens=8, return_dict_in_generate=True)
    assert out.sequences.shape == (2, input_ids.shape[1] + 8) and out.latent_norms.dtype == torch.float32
    loss = model(input_ids, mask, labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.reasoner_to_weaver.weight.grad is not None
    if trigger_mode == "lora":  # (`head`'s need the points generation recorded)
        logits = model(input_ids, mask, labels, trigger_logits=True).trigger_logits
        assert torch.isfinite(logits.float()).all()
