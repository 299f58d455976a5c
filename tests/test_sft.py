"""Weaver SFT: chat rows to answer-only labels, the collator, MemGenTrainer's loss, and its pickle-free
checkpoints, which resume exactly where they stopped."""

from __future__ import annotations

import inspect
import math
import os
import pickle
import shutil

import datasets
import pytest
import torch
from tokenizers import processors
from transformers import TrainingArguments

from memgen.modeling import _checkpointing_method
from memgen.training import MemGenCollator, encode_dataset, encode_example, encode_examples, sft_trainer
from memgen.training.data import leading_special_tokens, prompt_batch
from offline import chat_tokenizer, sentencepiece_style, tiny_causal_lm
from test_modeling import make_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Qwen3's way with thinking, in small: every assistant turn starts with a (here empty) think block, and the
# generation prompt writes one only when `enable_thinking` is False (the model then answers without thinking).
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}<think></think>"
            "{% endif %}{{ m['content'] }}<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
            "assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
            "{% endif %}")

# Qwen3's way with earlier turns, in small: an assistant turn after the last user message shows its (here empty)
# thinking, earlier ones do not, so a turn renders otherwise once the conversation goes on.
REWRITING = ("{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
             "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
             "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and "
             "loop.index0 > ns.last %}<think></think>{% endif %}{{ m['content'] }}<|endoftext|>\n{% endfor -%}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _labelled_text(tok, encoded):
    spans, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


def test_prompt_answer_rows_without_a_template_label_the_answer_and_eos():
    tok = make_model().tokenizer
    encoded = encode_example(tok, {"prompt": "Q: one, two?", "answer": " A: three."})
    assert encoded["input_ids"][-1] == tok.eos_token_id
    assert _labelled_text(tok, encoded) == [" A: three.<|endoftext|>"]
    assert encoded["labels"][: len(tok("Q: one, two?")["input_ids"])] == [-100] * len(tok("Q: one, two?")["input_ids"])


@pytest.mark.parametrize("template", ["<s> $A", "<s> $A </s>"])
def test_text_without_a_template_starts_as_the_tokenizer_starts_text(template):
    """A Llama- or Mistral-style tokenizer starts encoded text with its BOS, as their base models saw text in
    training: SFT rows and generation prompts start with it too (they had none), and nothing else the tokenizer
    adds (an EOS after the prompt) is taken."""
    tok = sentencepiece_style()
    tok.pad_token = tok.unk_token
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", bos), ("</s>", eos)])
    assert tok("Step 1")["input_ids"][0] == bos  # the tokenizer does start text with its BOS
    assert leading_special_tokens(tok) == [bos]
    prompt = tok("Step 1: read.", add_special_tokens=False)["input_ids"]
    encoded = encode_example(tok, {"prompt": "Step 1: read.", "answer": " Step 2"})
    assert encoded["input_ids"][: len(prompt) + 1] == [bos] + prompt
    assert encoded["labels"][: len(prompt) + 1] == [-100] * (len(prompt) + 1)
    assert encoded["input_ids"].count(eos) == 1 and encoded["input_ids"][-1] == eos
    ids, mask = prompt_batch(tok, ["Step 1: read.", "Step 3"])
    assert ids[0].tolist() == [bos] + prompt and ids[1][mask[1].bool()].tolist()[0] == bos
    assert leading_special_tokens(chat_tokenizer()) == []  # Qwen-style: nothing before text


def test_conversations_label_every_assistant_turn_and_nothing_else():
    tok = make_model().tokenizer
    tok.chat_template = CHATML
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Step 1?"},
                        {"role": "assistant", "content": "Read, then think."}, {"role": "user", "content": "Next?"},
                        {"role": "assistant", "content": "Answer."}]}
    encoded = encode_example(tok, row)
    assert tok.decode(encoded["input_ids"]) == tok.apply_chat_template(row["messages"], tokenize=False)
    assert _labelled_text(tok, encoded) == ["Read, then think.<|endoftext|>\n", "Answer.<|endoftext|>\n"]
    single = encode_example(tok, {"prompt": "Hi?", "answer": "Hello."})
    assert _labelled_text(tok, single) == ["Hello.<|endoftext|>\n"]


def test_chat_template_kwargs_reach_the_template():
    tok = make_model().tokenizer
    tok.chat_template = THINKING
    row = {"messages": [{"role": "user", "content": "Step 1?"}, {"role": "assistant", "content": "Read."},
                        {"role": "user", "content": "Next?"}, {"role": "assistant", "content": "Answer."}]}
    thinking = encode_example(tok, row)
    direct = encode_example(tok, row, chat_template_kwargs={"enable_thinking": False})
    assert direct["input_ids"] == thinking["input_ids"]  # the same text; the think blocks are now prompt, not trained
    assert _labelled_text(tok, thinking) == ["<think></think>Read.<|endoftext|>\n",
                                             "<think></think>Answer.<|endoftext|>\n"]
    assert _labelled_text(tok, direct) == ["Read.<|endoftext|>\n", "Answer.<|endoftext|>\n"]
    assert encode_dataset(tok, [row], chat_template_kwargs={"enable_thinking": False}) == [direct]
    ids, mask = prompt_batch(tok, ["Step 1?"], {"enable_thinking": False})
    assert tok.decode(ids[0][mask[0].bool()]) == "<|im_start|>user\nStep 1?<|endoftext|>\n<|im_start|>assistant\n" \
                                               "<think></think>"
    for bad, match in (({"enable_thinkng": False}, r"\['enable_thinkng'\] are not variables of the tokenizer's"),
                       ({"tokenize": True}, r"must not set \['tokenize'\]: memgen sets them itself"),
                       ("enable_thinking", "must be a mapping of template variable names")):
        with pytest.raises(ValueError, match=match):
            encode_dataset(tok, [row], chat_template_kwargs=bad)
        with pytest.raises(ValueError, match=match):
            prompt_batch(tok, ["Step 1?"], bad)
    tok.chat_template = None
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        prompt_batch(tok, ["Step 1?"], {"enable_thinking": False})


def test_a_template_that_rewrites_earlier_turns_gives_each_turn_its_own_example(tmp_path):
    tok = make_model().tokenizer
    tok.chat_template = REWRITING
    turns = [{"role": "user", "content": "Step 1?"}, {"role": "assistant", "content": "Read."},
             {"role": "user", "content": "Next?"}, {"role": "assistant", "content": "Answer."}]
    row = {"messages": turns}
    first, second = encode_examples(tok, row)
    # each turn over the conversation up to it, as the template renders a conversation that ends there
    assert tok.decode(first["input_ids"]) == tok.apply_chat_template(turns[:2], tokenize=False)
    assert tok.decode(second["input_ids"]) == tok.apply_chat_template(turns, tokenize=False)
    assert _labelled_text(tok, first) == ["<think></think>Read.<|endoftext|>\n"]
    assert _labelled_text(tok, second) == ["<think></think>Answer.<|endoftext|>\n"]  # the first turn is context
    with pytest.raises(ValueError, match="rewrites earlier turns of the row starting 'Step 1\\?'"):
        encode_example(tok, row)
    # a TRL prompt's own assistant turns are context: one example, the completion's
    assert encode_examples(tok, {"prompt": turns[:3], "completion": turns[3:]}) == [second]
    single = {"prompt": "Hi?", "answer": "Hello."}  # nothing to rewrite: one example, as encode_example's
    assert encode_examples(tok, single) == [encode_example(tok, single)]
    expected = [first, second, encode_example(tok, single)]
    assert encode_dataset(tok, [row, single]) == expected
    assert list(encode_dataset(tok, datasets.Dataset.from_list([row]))) == [first, second]
    assert list(encode_dataset(tok, datasets.Dataset.from_list([row]).to_iterable_dataset())) == [first, second]
    with pytest.raises(ValueError, match="more than max_length=20"):
        encode_examples(tok, row, max_length=20)


def test_trl_prompt_completion_rows_train_on_the_completion_only():
    """TRL's SFT formats: `completion` stands for `answer`; a conversational prompt's own assistant turns are context,
    not trained (a `messages` row trains them all)."""
    tok = make_model().tokenizer
    for template in (None, CHATML):
        tok.chat_template = template
        assert (encode_example(tok, {"prompt": "Q: one, two?", "completion": " A: three."})
                == encode_example(tok, {"prompt": "Q: one, two?", "answer": " A: three."}))
    turns = [{"role": "user", "content": "a, b"}, {"role": "assistant", "content": "c."},
             {"role": "user", "content": "d, e"}, {"role": "assistant", "content": "f."}]
    every = encode_example(tok, {"messages": turns})
    last = encode_example(tok, {"prompt": turns[:3], "completion": turns[3:]})
    assert last["input_ids"] == every["input_ids"]
    assert _labelled_text(tok, every) == ["c.<|endoftext|>\n", "f.<|endoftext|>\n"]
    assert _labelled_text(tok, last) == ["f.<|endoftext|>\n"]
    assert encode_example(tok, {"prompt": turns[:3], "completion": "f."}) == last


@pytest.mark.parametrize("row,template,match", [
    ({"messages": [{"role": "user", "content": "x"}]}, CHATML, "at least one assistant turn"),
    ({"messages": []}, CHATML, "non-empty list"),
    ({"text": "x"}, None, "must hold 'messages', or 'prompt' and one of 'answer' / 'completion'"),
    ({"prompt": "x", "answer": "y", "completion": "z"}, None, r"it has \['answer', 'completion', 'prompt'\]"),
    ({"prompt": 3, "completion": "z"}, None, "'prompt' and 'completion' must be strings or lists of messages"),
    ({"prompt": [{"role": "user"}], "completion": "z"}, CHATML, "prompt must be a non-empty list"),
    ({"prompt": "x", "completion": [{"role": "user", "content": "y"}]}, CHATML,
     "completion must hold at least one assistant turn"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                 {"role": "user", "content": "c"}], "completion": "d"}, None,
     "without a chat template takes prompt/answer rows only"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, None,
     "without a chat template takes prompt/answer rows only"),
    ({"messages": [{"role": "assistant", "content": "b"}]}, CHATML,
     "the row starting 'b' has no prompt before its first assistant turn"),
    ({"prompt": "a b c d e f g h", "answer": "i j k l m n"}, None,
     "the row starting 'a b c d e f g h' has .* more than max_length=5"),
    ({"prompt": "Hi", "answer": "Yo"}, "{{ messages[-1]['content'] }}", "assistant turn 1 .* cannot be located"),
])
def test_bad_rows_raise_clearly(row, template, match):
    tok = make_model().tokenizer
    tok.chat_template = template
    with pytest.raises(ValueError, match=match):
        encode_example(tok, row, max_length=5 if "max_length" in match else None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_on_either_side(side):
    batch = MemGenCollator(7, side)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                                     {"input_ids": [4], "labels": [4]}])
    if side == "left":
        assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 7, 4]]
        assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    else:
        assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    with pytest.raises(ValueError, match="padding_side"):
        MemGenCollator(0, "middle")


def _rows(n=24):
    words = ["apple", "river", "stone", "cloud", "green", "seven"]
    return [{"prompt": "Q: " + " ".join(words[(i + j) % 6] for j in range(2 + i % 4)) + "?",
             "answer": " First, the plan. Then, the answer.\n Done."} for i in range(n)]


def _args(path, **kw):
    base = dict(per_device_train_batch_size=4, learning_rate=3e-2, lr_scheduler_type="linear", logging_steps=1,
                report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, log_level="error",
                save_strategy="no")
    base.update(kw)
    return TrainingArguments(output_dir=str(path), **base)


def test_sft_lowers_the_answer_loss_and_trains_only_the_weaver(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2, trigger_mode="lora").train()
    trained = {p.data_ptr() for p in model.stage_parameters("weaver").values()}  # also named inside the shared base
    frozen = {k: v.clone() for k, v in model.state_dict().items() if v.data_ptr() not in trained}
    weaver = {k: v.detach().clone() for k, v in model.stage_parameters("weaver").items()}
    trainer = sft_trainer(model, _rows(32), _args(tmp_path, max_steps=30, lr_scheduler_type="constant"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert all(h["peak_memory_mib"] > 0 for h in trainer.state.log_history if "loss" in h)
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key  # the reasoner and the trigger stay as they were
    assert any(not torch.equal(p, weaver[k]) for k, p in model.stage_parameters("weaver").items())


def test_a_batch_without_insertion_points_trains_nothing_and_does_not_fail(tmp_path):
    """No prompt weave and answers without delimiters: the weaver takes no part in the forward. The loss still
    supports backward, the weaver gets no gradient, and a mixed run trains on the batches that weave."""
    model = make_model("qwen2", max_prompt=0).train()
    plain = [{"prompt": "Q: apple river", "answer": " A stone"}] * 4
    batch = MemGenCollator(model.tokenizer.pad_token_id)([encode_example(model.tokenizer, r) for r in plain])
    out = model(**batch)
    assert not out.augmentation_points.any() and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in model.stage_parameters("weaver").values())
    with torch.no_grad():
        assert not model(**batch).loss.requires_grad
    weaver = {k: v.detach().clone() for k, v in model.stage_parameters("weaver").items()}
    sft_trainer(model, plain, _args(tmp_path / "plain", max_steps=2)).train()
    assert all(torch.equal(p, weaver[k]) for k, p in model.stage_parameters("weaver").items())
    sft_trainer(model, plain + _rows(4), _args(tmp_path / "mixed", max_steps=2, per_device_train_batch_size=8)).train()
    assert any(not torch.equal(p, weaver[k]) for k, p in model.stage_parameters("weaver").items())


def _first_batch(model):
    return MemGenCollator(model.tokenizer.pad_token_id)([encode_example(model.tokenizer, r) for r in _rows(4)])


def test_label_smoothing_smooths_the_shifted_answer_loss(tmp_path):
    """Trainer takes the labels out of the model's inputs to smooth them itself; MemGen needs them to place its
    points (it raised 'labels are required'), and its logits[:, i] predict token i + 1."""
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    trainer = sft_trainer(model, _rows(8), _args(tmp_path, max_steps=2, label_smoothing_factor=0.1))
    batch = _first_batch(model)
    with torch.no_grad():
        out = model(**batch)
        answer = batch["labels"][:, 1:] != -100
        uniform = -torch.log_softmax(out.logits[:, :-1].float(), -1).mean(-1)[answer].mean()
        loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, 0.9 * out.loss + 0.1 * uniform)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_a_custom_loss_function_gets_the_outputs_and_the_labels(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    seen = []

    def twice_the_loss(outputs, labels, num_items_in_batch=None):
        seen.append(labels)
        return 2 * outputs.loss

    trainer = sft_trainer(model, _rows(8), _args(tmp_path, max_steps=2), compute_loss_func=twice_the_loss)
    batch = _first_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), 2 * model(**batch).loss)
    assert torch.equal(seen[-1], batch["labels"])
    trainer.train()
    assert len(seen) == 3


def test_neftune_noises_the_reasoner_embeddings_while_training_only(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    assert model.get_input_embeddings() is model.reasoner.get_input_embeddings()
    losses = {}
    for alpha in (None, 5.0):
        model = make_model("qwen2", k_prompt=4, k_inference=2).train()
        trainer = sft_trainer(model, _rows(8), _args(tmp_path / str(alpha), max_steps=2, neftune_noise_alpha=alpha))
        trainer.train()
        losses[alpha] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        batch = _first_batch(model)
        assert torch.equal(model(**batch).loss, model(**batch).loss)  # the hook is gone after training
    assert losses[None][0] != losses[5.0][0]


def test_datasets_rows_encode_like_lists():

    model = make_model()
    rows = _rows(3)
    assert list(encode_dataset(model.tokenizer, datasets.Dataset.from_list(rows))) == \
        encode_dataset(model.tokenizer, rows)
    # streamed datasets, which may not know their columns before they are read (IterableDataset.map raised on
    # `desc`)
    def generate_rows():
        yield from rows

    for streamed in (datasets.Dataset.from_list(rows).to_iterable_dataset(),
                     datasets.IterableDataset.from_generator(generate_rows)):
        assert list(encode_dataset(model.tokenizer, streamed)) == encode_dataset(model.tokenizer, rows)
        with pytest.raises(ValueError, match="num_proc must be an int >= 1 and encodes a datasets.Dataset .* for a "
                                             "IterableDataset"):
            encode_dataset(model.tokenizer, streamed, num_proc=2)
    many = _rows(3) * 5  # several rows per process
    assert list(encode_dataset(model.tokenizer, datasets.Dataset.from_list(many), num_proc=2)) == \
        encode_dataset(model.tokenizer, many)
    for rows_, num_proc in ((many, 2), (datasets.Dataset.from_list(many), 0)):
        with pytest.raises(ValueError, match=f"num_proc must be an int >= 1 .* got num_proc={num_proc}"):
            encode_dataset(model.tokenizer, rows_, num_proc=num_proc)


def test_a_streamed_dataset_pickles_for_loader_workers():
    """Data loader workers started by spawn or forkserver (Python 3.14's default on Linux) unpickle the dataset: a
    stream encoded through a lambda could not be pickled."""

    model = make_model()
    streamed = encode_dataset(model.tokenizer, datasets.Dataset.from_list(_rows(3)).to_iterable_dataset())
    assert list(pickle.loads(pickle.dumps(streamed))) == encode_dataset(model.tokenizer, _rows(3))


def test_sft_on_a_streamed_dataset(tmp_path):

    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    weaver = {k: v.detach().clone() for k, v in model.stage_parameters("weaver").items()}
    rows = datasets.Dataset.from_list(_rows(8)).to_iterable_dataset()
    sft_trainer(model, rows, _args(tmp_path, max_steps=2)).train()
    assert any(not torch.equal(p, weaver[k]) for k, p in model.stage_parameters("weaver").items())


def test_checkpoints_hold_no_pickles_and_resuming_continues_exactly(tmp_path):
    full = make_model("qwen2", k_prompt=4, k_inference=2).train()
    sft_trainer(full, _rows(), _args(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3)).train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = sorted(os.listdir(checkpoint))
    assert "memgen.safetensors" in files and "optimizer.safetensors" in files and "rng_state.safetensors" in files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], files

    resumed = make_model("qwen2", k_prompt=4, k_inference=2).train()
    trainer = sft_trainer(resumed, _rows(), _args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    for (name, a), b in zip(full.stage_parameters("weaver").items(), resumed.stage_parameters("weaver").values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="holds no memgen.safetensors"):
        sft_trainer(make_model(), _rows(), _args(tmp_path / "c", max_steps=1)).train(
            resume_from_checkpoint=str(tmp_path))


def _checkpointing(model) -> bool:
    """Whether `model` (a Hugging Face model) recomputes its layers in the backward pass, under the name its
    transformers release gives the flag."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return model.is_gradient_checkpointing if flag is None else flag


def test_activation_checkpointing_keeps_the_loss_and_gradients(tmp_path):
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    batch = MemGenCollator(model.tokenizer.pad_token_id)(encode_dataset(model.tokenizer, _rows(3)))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.stage_parameters("weaver").items()
                               if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.activation_checkpointing_enable()
    assert _checkpointing(model.reasoner)
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)
    model.activation_checkpointing_disable()
    assert not _checkpointing(model.reasoner)
    model.gradient_checkpointing_enable()  # the former name, which Trainer calls in transformers < 5.23
    assert _checkpointing(model.reasoner)
    model.gradient_checkpointing_disable()
    assert not _checkpointing(model.reasoner)
    # TrainingArguments names the switch activation_checkpointing from transformers 5.23 on
    names = inspect.signature(TrainingArguments).parameters
    switch = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    trainer = sft_trainer(make_model("qwen2").train(), _rows(8), _args(tmp_path, max_steps=2, **{switch: True}))
    trainer.train()  # Trainer turns it on through MemGenModel's method of that name
    assert _checkpointing(trainer.model.reasoner) and trainer.state.global_step == 2


def test_checkpointing_some_layers_is_passed_to_every_base():
    weaver_base = tiny_causal_lm("qwen2", len(chat_tokenizer()), seed=5)  # a base of its own: two bases
    model = make_model("qwen2", k_prompt=4, k_inference=2, weaver_base=weaver_base).train()
    if "every_n_layers" not in inspect.signature(_checkpointing_method(model.reasoner, "enable")).parameters:
        with pytest.raises(ValueError, match="every_n_layers=2, offload=False: .* needs transformers >= 5.17"):
            model.activation_checkpointing_enable(every_n_layers=2)
        return
    model.activation_checkpointing_enable(every_n_layers=2)
    for base in (model.reasoner, weaver_base):
        layers = base.get_decoder().layers
        assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]


def _fake_hub(monkeypatch, hub):
    """Route the Hub calls of memgen and of Trainer (whichever form its transformers release uses) to a local
    directory: each upload copies the folder, as the Hub would store it, to `hub/<commit number>`."""
    import huggingface_hub
    import transformers.trainer
    from concurrent.futures import Future

    class FakeApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, run_as_future=False,
                          ignore_patterns=None, **kwargs):
            commit = hub / str(len(os.listdir(hub)))
            shutil.copytree(folder_path, commit / (path_in_repo or ""),
                            ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
            (commit / "_message").write_text(commit_message)
            if not run_as_future:
                return "commit"
            done = Future()
            done.set_result("commit")
            return done

    hub.mkdir()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    if hasattr(transformers.trainer, "hf_api"):  # later transformers 5 releases
        monkeypatch.setattr(transformers.trainer, "hf_api", lambda *args, **kwargs: FakeApi())
    else:
        monkeypatch.setattr(transformers.trainer, "create_repo", lambda repo_id, **kw: FakeApi().create_repo(repo_id))
        monkeypatch.setattr(transformers.trainer, "upload_folder", lambda **kw: FakeApi().upload_folder(**kw))


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_pushing_to_the_hub_while_training_uploads_each_checkpoints_weights_and_no_pickle(tmp_path, monkeypatch,
                                                                                          strategy):
    """TrainingArguments(push_to_hub=True): Trainer's pushes while training uploaded a config without
    memgen.safetensors, and a pickle of the arguments (training_args.bin). The Hub is faked (the tests run offline)."""
    _fake_hub(monkeypatch, tmp_path / "hub")
    model = make_model("qwen2", k_prompt=4, k_inference=2).train()
    trainer = sft_trainer(model, _rows(), _args(tmp_path / "out", max_steps=2, save_strategy="steps", save_steps=1,
                                                push_to_hub=True, hub_model_id="org/memgen-sft", hub_strategy=strategy))
    trainer.train()
    trainer.push_to_hub()
    commits = sorted((tmp_path / "hub").iterdir(), key=lambda p: int(p.name))
    messages = [(c / "_message").read_text() for c in commits]
    pushed = {m: c for m, c in zip(messages, commits)}
    assert "Training in progress, step 1" in pushed and "Training in progress, step 2" in pushed, messages
    for step in (1, 2):
        commit = pushed[f"Training in progress, step {step}"]
        files = {str(p.relative_to(commit)) for p in commit.rglob("*") if p.is_file()}
        assert {"config.json", "memgen.safetensors", "training_args.json"} <= files, files
        assert not [f for f in files if f.endswith(".bin")], files
        assert not [f for f in files if f.startswith("checkpoint-")], files  # Trainer's ignore patterns hold
        checkpoint = tmp_path / "out" / f"checkpoint-{step}" / "memgen.safetensors"
        assert (commit / "memgen.safetensors").read_bytes() == checkpoint.read_bytes()
        if strategy == "checkpoint":
            assert pushed[f"Training in progress, step {step}, checkpoint"].joinpath(
                "last-checkpoint", "memgen.safetensors").read_bytes() == checkpoint.read_bytes()
    final = commits[-1]
    assert (final / "memgen.safetensors").is_file() and not list(final.rglob("*.bin"))
    assert not list((tmp_path / "out").glob("*.bin"))
