"""`memgen train --config run.yaml` (the three stages, chained through checkpoints) and `memgen eval`."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import yaml

from memgen import MemGenModel
from memgen.cli import main
from memgen.evaluation import evaluate, paired_difference, pass_at_k, reported_ks
from memgen.training.data import prompt_batch
from memgen.generation import completion_mask
from memgen.training.run import load_run_config, train_from_config
from offline import save_base
from test_modeling import make_model
from test_sft import THINKING
from test_tasks import ROWS, _write_jsonl

TRAINING = dict(per_device_train_batch_size=2, use_cpu=True, report_to=[], save_strategy="no", learning_rate=0.01,
                disable_tqdm=True, log_level="error", logging_steps=1, dataloader_num_workers=0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    model = make_model("qwen2", trigger_mode="lora")
    save_base(model, root / "base")
    data = _write_jsonl(root / "gsm8k.jsonl", ROWS["gsm8k"] * 3)
    return root, data


def _yaml(path, **run):
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_the_three_stages_run_from_yaml_and_chain_through_checkpoints(workspace, capsys):
    root, data = workspace
    config = {"prompt_latents_len": 4, "inference_latents_len": 2, "trigger_mode": "lora",
              "weaver_lora": {"lora_dropout": 0.0}, "trigger_lora": {"lora_dropout": 0.0}}
    sft = _yaml(root / "sft.yaml", stage="sft", model=str(root / "base"), config=config, task="gsm8k", data=str(data),
                training={**TRAINING, "output_dir": str(root / "sft"), "max_steps": 1})
    assert main(["train", "--config", sft, "training.max_steps=3", "num_proc=2"]) == 0
    assert "sft finished after 3 steps" in capsys.readouterr().out
    assert (root / "sft" / "memgen.safetensors").is_file()
    grpo = _yaml(root / "grpo.yaml", stage="grpo", memgen=str(root / "sft"), task="gsm8k", data=str(data),
                 training={**TRAINING, "output_dir": str(root / "grpo"), "max_steps": 1, "group_size": 2,
                           "max_new_tokens": 4})
    assert main(["train", "--config", grpo]) == 0
    trigger = _yaml(root / "trigger.yaml", stage="trigger", memgen=str(root / "grpo"), task="gsm8k", data=str(data),
                    training={**TRAINING, "output_dir": str(root / "trigger"), "max_steps": 1, "group_size": 2,
                              "max_new_tokens": 4, "invoke_penalty": 0.5})
    assert main(["train", "--config", trigger]) == 0
    after_grpo, after_trigger = (MemGenModel.from_pretrained(root / name) for name in ("grpo", "trigger"))
    weaver_after_trigger = after_trigger.stage_parameters("weaver")
    for key, value in after_grpo.stage_parameters("weaver").items():  # the trigger stage leaves the weaver alone
        assert torch.equal(value, weaver_after_trigger[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(after_grpo.stage_parameters("trigger").values(),
                                                      after_trigger.stage_parameters("trigger").values()))


def test_a_run_evaluates_on_its_evaluation_rows(workspace, tmp_path):
    root, data = workspace
    run = load_run_config(_yaml(tmp_path / "grpo.yaml", stage="grpo", model=str(root / "base"), task="gsm8k",
                                data=str(data), eval_data=str(data), eval_limit=2,
                                training={**TRAINING, "output_dir": str(tmp_path / "out"), "max_steps": 1,
                                          "group_size": 2, "max_new_tokens": 4, "eval_strategy": "steps",
                                          "eval_steps": 1}))
    trainer = train_from_config(run)
    evaluations = [h for h in trainer.state.log_history if "eval_reward" in h]
    assert len(evaluations) == 1 and len(trainer.eval_dataset) == 2


def test_eval_reports_accuracy_with_and_without_memory(workspace, capsys, tmp_path):
    root, data = workspace
    model = make_model("qwen2", trigger_mode="lora")
    model.config.reasoner_name_or_path = str(root / "base")
    model.save_pretrained(root / "eval_ckpt")
    out = tmp_path / "eval.json"
    command = ["eval", "--memgen", str(root / "eval_ckpt"), "--task", "gsm8k", "--data", str(data), "--limit", "3",
               "--max-new-tokens", "6", "--batch-size", "2", "--trigger-mode", "always", "--out", str(out)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "| with memory |" in printed and "| without memory |" in printed
    results = json.loads(out.read_text())
    assert results["with memory"]["rows"] == 3 and results["with memory"]["insertions_per_response"] >= 1
    difference = results["memory_minus_no_memory"]  # each row's reward with memory minus without, paired
    assert difference["mean"] == pytest.approx(results["with memory"]["accuracy"]
                                               - results["without memory"]["accuracy"])
    assert difference["low"] <= difference["mean"] <= difference["high"]
    assert "memory - no memory: accuracy" in printed and "95% paired bootstrap interval" in printed
    assert results["without memory"]["insertions_per_response"] == 0
    samples = tmp_path / "samples.jsonl"
    assert main(command + ["--reward-workers", "2", "--samples", str(samples)]) == 0
    assert json.loads(out.read_text()) == results  # the samples go to their own file
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [line["memory"] for line in lines] == [True] * 3 + [False] * 3
    assert {tuple(sorted(line)) for line in lines} == {("completion", "insertions", "memory", "prompt", "reward",
                                                        "sample", "target")}
    for name, memory in (("with memory", True), ("without memory", False)):
        rewards = [line["reward"] for line in lines if line["memory"] == memory]
        assert sum(rewards) / 3 == pytest.approx(results[name]["accuracy"])
        assert sum(line["insertions"] for line in lines if line["memory"] == memory) / 3 == pytest.approx(
            results[name]["insertions_per_response"])
    capsys.readouterr()
    assert main(command + ["--memory", "off"]) == 0  # the baseline alone
    printed = capsys.readouterr().out
    assert "| without memory |" in printed and "| with memory |" not in printed
    assert json.loads(out.read_text()) == {"task": "gsm8k", "checkpoint": str(root / "eval_ckpt"),
                                           "without memory": results["without memory"]}
    for flag in ("--reward-workers", "--batch-size"):
        with pytest.raises(SystemExit, match=f"memgen eval: {flag} must be >= 1, got 0"):
            main(command + [flag, "0"])
    with pytest.raises(SystemExit, match=r"memgen eval: --top-p change only sampling; add --sample"):
        main(command + ["--top-p", "0.9"])
    with pytest.raises(SystemExit, match=r"memgen eval: --num-return-sequences must be >= 1, and above 1 needs"):
        main(command + ["--num-return-sequences", "2"])
    with pytest.raises(SystemExit, match=r"memgen eval: --chat-template-kwargs: chat_template_kwargs .* need a "
                                         r"tokenizer with a chat template"):
        main(command + ["--chat-template-kwargs", '{"enable_thinking": false}'])
    with pytest.raises(SystemExit) as exited:  # argparse: not JSON
        main(command + ["--chat-template-kwargs", "enable_thinking=false"])
    assert exited.value.code == 2


def test_eval_samples_several_completions_per_row(workspace, capsys, tmp_path):
    root, data = workspace
    model = make_model("qwen2")
    model.config.reasoner_name_or_path = str(root / "base")
    model.save_pretrained(root / "sampled_ckpt")
    out, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    command = ["eval", "--memgen", str(root / "sampled_ckpt"), "--task", "gsm8k", "--data", str(data), "--limit", "2",
               "--max-new-tokens", "4", "--sample", "--temperature", "0.8", "--num-return-sequences", "3",
               "--seed", "5", "--out", str(out), "--samples", str(samples)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "| accuracy | pass@1 | pass@2 | pass@3 | insertions per response |" in printed
    results = json.loads(out.read_text())
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(line["memory"], line["sample"]) for line in lines] == [(memory, j) for memory in (True, False)
                                                                   for _ in range(2) for j in range(3)]
    for name, memory in (("with memory", True), ("without memory", False)):
        assert set(results[name]) == {"accuracy", "pass@1", "pass@2", "pass@3", "rows", "insertions_per_response"}
        rewards = [line["reward"] for line in lines if line["memory"] == memory]
        assert results[name]["accuracy"] == pytest.approx(sum(rewards) / 6)
    assert main(command) == 0  # the same seed, the same samples
    assert json.loads(out.read_text()) == results
    assert [json.loads(line) for line in samples.read_text().splitlines()] == lines
    text = "".join(line["completion"] for line in lines)
    stop = next(c for c in text[len(text) // 2:] + text if c.isascii() and c.isalnum())
    assert main(command + ["--stop", stop]) == 0  # a stop string ends completions
    stopped = [json.loads(line)["completion"] for line in samples.read_text().splitlines()]
    assert all(cut == line["completion"][:len(cut)] for cut, line in zip(stopped, lines))
    assert sum(map(len, stopped)) < len(text)


def test_evaluate_scores_each_completion_with_the_task_reward():
    model = make_model("qwen2")
    rows = [{"prompt": "Q: one, two", "target": "x"}, {"prompt": "Q: three", "target": "y"}]
    seen = []

    def reward(text, target):
        seen.append((text, target))
        return float(len(text) % 2)

    result = evaluate(model, rows, reward, max_new_tokens=5, batch_size=1)
    tok = model.tokenizer
    expected = []
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt")
        new = model.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=5)[:, ids["input_ids"].shape[1]:]
        keep = completion_mask(new, [tok.eos_token_id])
        expected.append((tok.decode(new[0][keep[0]], skip_special_tokens=True), row["target"]))
    assert seen == expected
    assert result["accuracy"] == sum(len(t) % 2 for t, _ in expected) / 2 and result["rows"] == 2
    assert result["pass@1"] == result["accuracy"]  # rewards of 0 or 1: a pass is a full mark
    assert "samples" not in result
    samples = evaluate(model, rows, reward, max_new_tokens=5, batch_size=1, return_samples=True)["samples"]
    assert samples == [{"prompt": row["prompt"], "sample": 0, "completion": text, "target": row["target"],
                        "reward": float(len(text) % 2), "insertions": n}
                       for row, (text, _), n in zip(rows, expected, [s["insertions"] for s in samples])]
    assert all(isinstance(s["insertions"], int) and s["insertions"] >= 1 for s in samples)  # the prompt weave
    # another end-of-completion token (a chat model's end of turn): each completion ends at its first one
    new = model.generate(*[tok([rows[0]["prompt"]], return_tensors="pt")[k] for k in ("input_ids", "attention_mask")],
                         max_new_tokens=5)[0, -5:].tolist()
    seen.clear()
    evaluate(model, rows[:1], reward, max_new_tokens=5, eos_token_id=[tok.eos_token_id, new[1]])
    assert seen == [(tok.decode(new[:new.index(new[1]) + 1], skip_special_tokens=True), "x")]
    with pytest.raises(ValueError, match="eos_token_id must be token ids"):
        evaluate(model, rows, reward, max_new_tokens=5, eos_token_id=[10 ** 6])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, rows, reward, batch_size=0)
    with pytest.raises(ValueError, match="rows must not be empty"):
        evaluate(model, [], reward)
    with pytest.raises(ValueError, match=r"reward must return a finite number, got nan for the completion"):
        evaluate(model, rows, lambda text, target: float("nan"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"evaluate's rows need a 'prompt' .* and a 'target' .*got \['question'\]"):
        evaluate(model, [*rows, {"question": "Q: four"}], reward)


def test_evaluate_ends_completions_at_stop_strings():
    model = make_model("qwen2")
    rows = [{"prompt": "Q: one, two", "target": "x"}, {"prompt": "Q: three", "target": "y"}]
    tok = model.tokenizer
    free = evaluate(model, rows, lambda text, target: 0.0, max_new_tokens=12, return_samples=True)["samples"]
    ids, mask = prompt_batch(tok, [r["prompt"] for r in rows])
    new = model.generate(ids, mask, max_new_tokens=12)[:, ids.shape[1]:]
    tokens = [row[kept].tolist() for row, kept in zip(new, completion_mask(new, [tok.eos_token_id]))]
    assert [s["completion"] for s in free] == [tok.decode(t, skip_special_tokens=True) for t in tokens]
    stop = next(text for t in tokens[0][len(tokens[0]) // 2:] + tokens[0]
                if (text := tok.decode([t])).isascii() and text.isprintable() and text.strip())
    cut = evaluate(model, rows, lambda text, target: 0.0, max_new_tokens=12, return_samples=True,
                   stop_strings=stop)["samples"]
    shortened = 0
    for row, sample in zip(tokens, cut):
        end = next((t + 1 for t in range(len(row)) if stop in tok.decode(row[:t + 1], skip_special_tokens=True)),
                   len(row))
        assert sample["completion"] == tok.decode(row[:end], skip_special_tokens=True)
        shortened += end < len(row)
    assert shortened >= 1


def test_evaluate_renders_prompts_with_chat_template_kwargs():
    model = make_model("qwen2")
    model.tokenizer.chat_template = THINKING
    rows = [{"prompt": "Q: one, two", "target": "x"}, {"prompt": "Q: three", "target": "y"}]
    direct = {"enable_thinking": False}
    samples = evaluate(model, rows, lambda text, target: 0.0, max_new_tokens=6, return_samples=True,
                       chat_template_kwargs=direct)["samples"]
    ids, mask = prompt_batch(model.tokenizer, [r["prompt"] for r in rows], direct)
    out = model.generate(ids, mask, max_new_tokens=6, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    assert [s["completion"] for s in samples] == [model.tokenizer.decode(row[kept], skip_special_tokens=True)
                                                  for row, kept in zip(new, out.completion_mask)]
    with pytest.raises(ValueError, match="are not variables of the tokenizer's chat template"):
        evaluate(model, rows, lambda text, target: 0.0, chat_template_kwargs={"enable_thinkng": False})


def test_pass_at_k_is_the_chance_that_some_of_k_draws_passes():
    for n in range(1, 7):
        for passed in range(n + 1):
            outcomes = [True] * passed + [False] * (n - passed)
            for k in range(1, n + 1):
                draws = list(itertools.combinations(outcomes, k))
                assert pass_at_k(n, passed, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    assert [reported_ks(n) for n in (1, 2, 5, 8, 10)] == [[1], [1, 2], [1, 2, 4, 5], [1, 2, 4, 8], [1, 2, 4, 8, 10]]
    with pytest.raises(ValueError, match="pass_at_k needs 1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_paired_difference_bootstraps_the_rows():
    same = paired_difference([0.0, 1.0, 0.5], [0.0, 1.0, 0.5])
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    shifted = paired_difference([0.25, 1.0, 0.5], [0.0, 0.75, 0.25])  # every row 0.25 higher
    assert shifted["mean"] == pytest.approx(0.25) and shifted["low"] == pytest.approx(0.25)
    assert shifted["high"] == pytest.approx(0.25)
    mixed = paired_difference([1.0] * 6 + [0.0] * 4, [0.0] * 10)
    assert mixed["mean"] == pytest.approx(0.6) and 0.2 < mixed["low"] < 0.6 < mixed["high"] <= 1.0
    assert paired_difference([1.0] * 6 + [0.0] * 4, [0.0] * 10) == mixed  # seeded
    with pytest.raises(ValueError, match="two equally long, non-empty lists, got 2 and 1"):
        paired_difference([1.0, 0.0], [1.0])


def test_evaluate_scores_several_samples_per_row():
    model = make_model("qwen2")
    rows = [{"prompt": "Q: one, two", "target": 0}, {"prompt": "Q: three", "target": 1},
            {"prompt": "Q: four. five", "target": 2}]

    def reward(text, target):  # full marks, partial credit or none, by the completion
        return [1.0, 0.5, 0.0][(len(text) + target) % 3]

    def run(seed, **kwargs):
        return evaluate(model, rows, reward, max_new_tokens=6, batch_size=3, do_sample=True, num_return_sequences=5,
                        generator=torch.Generator().manual_seed(seed), return_samples=True, **kwargs)

    result = run(0)
    assert run(0) == result  # the same seed, the same samples
    samples = result.pop("samples")
    assert [(s["prompt"], s["sample"]) for s in samples] == [(r["prompt"], j) for r in rows for j in range(5)]
    # the completions are generate's, sampled from the same seed
    tok = model.tokenizer
    ids, mask = prompt_batch(tok, [r["prompt"] for r in rows])
    sequences = model.generate(ids, mask, max_new_tokens=6, do_sample=True, num_return_sequences=5,
                               generator=torch.Generator().manual_seed(0))
    keep = completion_mask(sequences[:, ids.shape[1]:], [tok.eos_token_id])
    assert [s["completion"] for s in samples] == [tok.decode(row[kept], skip_special_tokens=True)
                                                  for row, kept in zip(sequences[:, ids.shape[1]:], keep)]
    rewards = [s["reward"] for s in samples]
    assert rewards == [reward(s["completion"], s["target"]) for s in samples] and len(set(rewards)) > 1
    assert result["accuracy"] == pytest.approx(sum(rewards) / 15) and result["rows"] == 3
    assert result["insertions_per_response"] == pytest.approx(sum(s["insertions"] for s in samples) / 15)
    assert [key for key in result if key.startswith("pass@")] == ["pass@1", "pass@2", "pass@4", "pass@5"]
    for k in (1, 2, 4, 5):  # the chance that some of k of a row's samples, drawn at random, has full marks
        chances = []
        for i in range(0, 15, 5):
            draws = list(itertools.combinations(rewards[i:i + 5], k))
            chances.append(sum(max(d) == 1.0 for d in draws) / len(draws))
        assert result[f"pass@{k}"] == pytest.approx(sum(chances) / 3)
    assert run(1)["samples"] != samples or run(1)["accuracy"] != result["accuracy"]
    # partial credit counts in the accuracy, not in pass@1
    greedy = evaluate(model, rows, lambda text, target: 0.5, max_new_tokens=2)
    assert (greedy["accuracy"], greedy["pass@1"]) == (0.5, 0.0) and "pass@2" not in greedy
    with pytest.raises(ValueError, match=r"num_return_sequences=2 needs do_sample=True"):
        evaluate(model, rows, reward, num_return_sequences=2)
    with pytest.raises(ValueError, match=r"num_return_sequences must be an int >= 1, got 0"):
        evaluate(model, rows, reward, do_sample=True, num_return_sequences=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0 when sampling"):
        evaluate(model, rows, reward, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="split_across_ranks=True needs an initialised torch.distributed"):
        evaluate(model, rows, reward, split_across_ranks=True)
    with pytest.raises(ValueError, match="split_across_ranks must be a bool or None, got 1"):
        evaluate(model, rows, reward, split_across_ranks=1)


def test_sft_without_a_task_trains_on_the_rows_as_they_are(tmp_path, capsys):
    base = make_model("qwen2")
    base.tokenizer.chat_template = THINKING  # conversations need one
    save_base(base, tmp_path / "base")
    conversations = [{"messages": [{"role": "user", "content": f"Q: {a} + {b}?"},
                                   {"role": "assistant", "content": f"{a + b}."},
                                   {"role": "user", "content": "And times two?"},
                                   {"role": "assistant", "content": f"{2 * (a + b)}."}]} for a, b in ((1, 2), (3, 4))]
    completions = [{"prompt": [{"role": "user", "content": "Say hi."}], "completion": "Hi, there."}] * 2
    for name, rows in (("messages", conversations), ("completions", completions)):
        data = _write_jsonl(tmp_path / f"{name}.jsonl", rows)
        run = _yaml(tmp_path / f"{name}.yaml", stage="sft", model=str(tmp_path / "base"), data=str(data),
                    eval_data=str(data), config={"weaver_lora": {"lora_dropout": 0.0}},
                    chat_template_kwargs={"enable_thinking": False},
                    training={**TRAINING, "output_dir": str(tmp_path / name), "max_steps": 2, "eval_strategy": "steps",
                              "eval_steps": 2})
        assert main(["train", "--config", run]) == 0
        assert "sft finished after 2 steps" in capsys.readouterr().out
        trained = MemGenModel.from_pretrained(tmp_path / name)
        fresh = MemGenModel.from_reasoner(str(tmp_path / "base"), config=trained.config)
        assert any(not torch.equal(a, b) for a, b in zip(trained.stage_parameters("weaver").values(),
                                                          fresh.stage_parameters("weaver").values()))
    # rows of no shape SFT takes raise, naming the source, before the model loads (it does not exist here)
    tasky = _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Q", "answer": "A #### 1"}])
    run = load_run_config(_yaml(tmp_path / "bad.yaml", stage="sft", model=str(tmp_path / "no-such-model"),
                                data=str(tasky), training={**TRAINING, "output_dir": str(tmp_path / "bad")}))
    with pytest.raises(ValueError, match=r"data '.*gsm8k.jsonl' \(read as it is, the run naming no task\): a row "
                                         r"must hold 'messages', or 'prompt' and one of 'answer' / 'completion'"):
        train_from_config(run)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"source files are empty: \['.*empty.jsonl'\]"):
        train_from_config({**run, "data": str(empty)})


@pytest.mark.parametrize("run,overrides,match", [
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}, "epochs": 2}, [],
     r"unknown keys \['epochs'\]; the run description takes \['allow_untrained_weaver'"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}, "limt": 2}, [],
     r"unknown keys \['limt'\]; .*; did you mean 'limit' for 'limt'\?"),
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o", "learnin_rate": 0.1}}, [],
     r"unknown training keys \['learnin_rate'\]; stage grpo takes the fields of GRPOConfig; did you mean "
     r"'learning_rate' for 'learnin_rate'\?"),
    ({"stage": "trigger", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["training.invoke_penalty=x"],
     "training: invoke_penalty must be a finite number >= 0, got 'x'"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["training.group_size=4"],
     r"unknown training keys \['group_size'\]; stage sft takes the fields of TrainingArguments"),
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o", "group_size": 1}}, [],
     "training: group_size must be an int >= 2"),
    ({"stage": "sft", "model": "m", "task": "gsm9k", "training": {"output_dir": "o"}}, [], "task must be one of"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["config.trigger_mod=lora"],
     r"unknown config keys \['trigger_mod'\]; .*; did you mean 'trigger_mode' for 'trigger_mod'\?"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["config.trigger_mode=gate"],
     "config: trigger_mode must be one of"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["config=lora"],
     "config must be a mapping of MemGenConfig fields, got 'lora'"),
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["max_length=512"],
     "max_length applies to the sft stage only; this run's stage is grpo"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["num_proc=0"],
     "num_proc must be an int >= 1, got 0"),
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["num_proc=2"],
     "num_proc applies to the sft stage only"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["max_length=long"],
     "max_length must be an int >= 1, got 'long'"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["allow_untrained_weaver=true"],
     "allow_untrained_weaver applies to the trigger stage only"),
    ({"stage": "grpo", "memgen": "ckpt", "task": "gsm8k", "training": {"output_dir": "o"}},
     ["config.trigger_mode=lora"], "config sets a fresh model's fields, but the run starts from the memgen checkpoint"),
    ({"stage": "ppo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, [], "stage must be one of"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {}}, [], "at least output_dir"),
    ({"stage": "sft", "task": "gsm8k", "training": {"output_dir": "o"}}, [], "needs 'model'"),
    ({"stage": "grpo", "model": "m", "training": {"output_dir": "o"}}, [],
     "stage grpo needs 'task': its reward scores the rollouts"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}},
     ["chat_template_kwargs=thinking"], "chat_template_kwargs must be a mapping of template variable names"),
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "chat_template_kwargs": {"enable_thinking": False},
      "training": {"output_dir": "o", "chat_template_kwargs": {"enable_thinking": False}}}, [],
     "chat_template_kwargs is given twice, at the top and in training"),
    ({"stage": "sft", "model": "m", "training": {"output_dir": "o"}}, [],
     "an sft run without a task reads its rows as they are from 'data'"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["limit"], "key=value"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["dtype=int8"], "dtype must"),
    ({"stage": "sft", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["eval_limit=5"],
     "eval_limit limits evaluation rows"),
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o"}}, ["eval_data=t.jsonl"],
     "evaluation needs both"),  # rows but no eval_strategy: they would never be read
    ({"stage": "grpo", "model": "m", "task": "gsm8k", "training": {"output_dir": "o", "eval_strategy": "steps"}}, [],
     "evaluation needs both"),
])
def test_bad_run_descriptions_raise_before_loading_anything(tmp_path, run, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(_yaml(tmp_path / "run.yaml", **run), overrides)


def test_overrides_reach_nested_keys(tmp_path):
    path = _yaml(tmp_path / "run.yaml", stage="sft", model="m", task="gsm8k", training={"output_dir": "o"})
    run = load_run_config(path, ["training.learning_rate=3e-6", "limit=64", "stage=grpo"])  # 3e-6: a float
    assert run["training"] == {"output_dir": "o", "learning_rate": 3e-6} and run["limit"] == 64
    assert run["stage"] == "grpo"
    with pytest.raises(SystemExit, match="is not a file"):
        main(["train", "--config", str(tmp_path / "missing.yaml")])
