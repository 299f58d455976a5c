"""`memgen generate`: a saved reasoner and checkpoint in, marked completions and latent norms out."""

from __future__ import annotations

import math
import re

import pytest
import torch

from memgen import MemGenModel
from memgen.cli import MARKER, _encode, main, marked_text
from memgen.demo import DEMO_PROMPTS
from offline import save_base
from test_modeling import make_batch
from test_reference_generation import chatty_model
from test_tasks import ROWS, _write_jsonl


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = chatty_model("qwen2", "always")
    save_base(model, root / "reasoner")
    model.config.reasoner_name_or_path = str(root / "reasoner")
    model.save_pretrained(root / "ckpt")
    return root, model


def test_generate_marks_insertions_and_reports_latent_norms(saved, capsys):
    root, model = saved
    assert main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b, c", "--prompt", "x y z.",
                 "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("=== prompt") == 2 and MARKER in printed
    reports = re.findall(r"latent norm ([0-9.e+-]+) = ([0-9.]+)x the token embeddings", printed)
    assert reports, printed
    assert all(float(norm) > 0 and float(ratio) > 0 for norm, ratio in reports)
    # the same numbers as the API's: the first row's prompt insertion comes first
    loaded = MemGenModel.from_pretrained(root / "ckpt").eval()
    batch = loaded.tokenizer(["a b, c", "x y z."], return_tensors="pt", padding=True)
    out = loaded.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=24,
                          return_dict_in_generate=True)
    first = out.latent_norms[0, 0].item()
    assert math.isclose(float(reports[0][0]), first, rel_tol=1e-2)
    # the nearest tokens of each latent woven: one line per latent, its 2 tokens best first
    assert main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b, c", "--prompt", "x y z.",
                 "--max-new-tokens", "24", "--latent-tokens", "2"]) == 0
    probed = capsys.readouterr().out
    lines = re.findall(r"before token +(\d+), latent (\d+): '.*' (-?[0-9.]+), '.*' (-?[0-9.]+)$", probed, flags=re.M)
    k = {0: loaded.config.prompt_latents_len, 1: loaded.config.inference_latents_len}
    assert len(lines) == sum(k[int(i > 0)] for i in (out.augmentation_mask == 1).nonzero()[:, 1].tolist())
    assert all(float(first) >= float(second) for *_, first, second in lines)
    with pytest.raises(SystemExit, match="--latent-tokens 1000000 exceeds the vocabulary"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a", "--latent-tokens", "1000000"])


def test_generate_prints_each_prompts_samples(saved, capsys):
    root, _ = saved
    args = ["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b, c", "--prompt", "x y z.", "--max-new-tokens",
            "8", "--sample", "--top-k", "20", "--num-return-sequences", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    headers = re.findall(r"=== prompt (\d), sample (\d) ===", printed)
    assert headers == [(str(p), str(s)) for p in (1, 2) for s in (1, 2, 3)], headers
    with pytest.raises(SystemExit, match="needs --sample"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b", "--num-return-sequences", "2"])
    with pytest.raises(SystemExit, match="--temperature and --top-p change only sampling; add --sample"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b", "--temperature", "0.5", "--top-p", "0.9"])
    with pytest.raises(SystemExit, match="--min-p change only sampling; add --sample"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b", "--min-p", "0.1"])
    assert main(args + ["--min-p", "1.0", "--num-return-sequences", "2"]) == 0  # only the likeliest: the samples agree
    texts = re.findall(r"=== prompt 1, sample \d ===\n.*\n--- completion .*---\n(.*)\n", capsys.readouterr().out)
    assert len(texts) == 2 and texts[0] == texts[1]


def test_eos_tokens_end_completions(saved, capsys):
    """--eos names other tokens that end a completion (a chat model's end of turn): the printed completion stops
    after the first; a string that is not one token of the vocabulary is refused by name."""
    root, model = saved
    tok = model.tokenizer
    batch = tok(["a b, c"], return_tensors="pt")
    new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)[0, -12:].tolist()
    stop = next(t for t in new[2:] if t not in new[:2])  # a token whose first use is not among the first two
    assert main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "a b, c", "--max-new-tokens", "12",
                 "--eos", tok.convert_ids_to_tokens(stop)]) == 0
    printed = capsys.readouterr().out
    completion = printed.split("---\n", 1)[1].split("\n---", 1)[0]
    assert completion.replace(MARKER, "") == tok.decode(new[:new.index(stop) + 1], skip_special_tokens=True)
    data = _write_jsonl(root / "gsm8k.jsonl", ROWS["gsm8k"])
    for command in (["generate", "--prompt", "x"], ["eval", "--task", "gsm8k", "--data", str(data)]):
        with pytest.raises(SystemExit, match=r"--eos \['no such token'\] are not tokens of the tokenizer"):
            main([command[0], "--memgen", str(root / "ckpt"), *command[1:], "--eos", "no such token"])


def test_latent_norms_are_set_exactly_where_memory_was_woven():
    model = chatty_model("qwen2", "head")
    input_ids, mask, _ = make_batch(model, [0] * 3, "left", seed=4)
    out = model.generate(input_ids, mask, max_new_tokens=20, return_dict_in_generate=True)
    woven = out.augmentation_mask == 1
    assert woven.any()
    assert torch.isfinite(out.latent_norms[woven]).all() and (out.latent_norms[woven] > 0).all()
    assert torch.isnan(out.latent_norms[~woven]).all()


def test_marked_text_splices_markers_before_tokens(saved):
    _, model = saved
    tok = model.tokenizer
    ids = tok("hello, world.")["input_ids"]
    text = marked_text(tok, ids, [0, len(ids) - 1])
    assert text.startswith(MARKER) and text.replace(MARKER, "") == tok.decode(ids, skip_special_tokens=True)


def test_chat_prompts_render_with_chat_template_kwargs():
    from test_sft import THINKING

    tok = chatty_model("qwen2", "always").tokenizer
    tok.chat_template = THINKING
    plain, direct = (_encode(tok, ["a b, c"], True, kwargs) for kwargs in (None, {"enable_thinking": False}))
    assert tok.decode(direct["input_ids"][0]) == tok.decode(plain["input_ids"][0]) + "<think></think>"
    with pytest.raises(SystemExit, match=r"--chat-template-kwargs: chat_template_kwargs \['enable_thinkng'\]"):
        _encode(tok, ["a b, c"], True, {"enable_thinkng": False})


def test_demo_trains_a_weaver_generates_and_saves_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "4", "--max-new-tokens", "10", "--rounds", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    losses = re.search(r"without memory ([0-9.]+), with the untrained weaver ([0-9.]+)", printed)
    trained = re.search(r"with the trained weaver: ([0-9.]+) \(without memory ([0-9.]+)\)", printed)
    assert losses and trained and losses[1] == trained[2], printed  # the same rows, the same reasoner
    assert float(trained[1]) < float(losses[2])  # the weaver learned (its untrained latents hurt)
    completions = [line for line in printed.splitlines() if line.startswith(tuple(p + " -> " for p in DEMO_PROMPTS))]
    assert "4 SFT steps of 8 rows" in printed and len(completions) == 3 and MARKER in printed
    assert re.search(r"with memory [0-9.]+ ms, without [0-9.]+ ms \([0-9.]+x\)", printed)
    loaded = MemGenModel.from_pretrained(out)  # its base by the preset's path
    assert loaded.config.trigger_mode == "always"
    with pytest.raises(SystemExit, match="memgen demo: --steps must be >= 1, got 0"):
        main(["demo", "--steps", "0"])


def test_bad_arguments_exit_with_a_message(saved, capsys):
    root, _ = saved
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])  # no --memgen
    with pytest.raises(SystemExit, match="must not be empty"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", ""])
    with pytest.raises(SystemExit, match="--device 'cdua' is not a device"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "x", "--device", "cdua"])
    with pytest.raises(SystemExit, match="--chat-template-kwargs applies to the chat template: add --chat"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "x", "--chat-template-kwargs", "{}"])
    with pytest.raises(SystemExit, match="--chat needs a tokenizer with a chat template"):
        main(["generate", "--memgen", str(root / "ckpt"), "--prompt", "x", "--chat", "--chat-template-kwargs",
              '{"enable_thinking": false}'])
    if not torch.cuda.is_available():  # it raised torch's "Torch not compiled with CUDA enabled", after loading
        for command in (["generate", "--prompt", "x"], ["eval", "--task", "gsm8k"]):
            with pytest.raises(SystemExit, match="--device 'cuda', but this torch .* sees no CUDA device"):
                main([command[0], "--memgen", str(root / "ckpt"), *command[1:], "--device", "cuda"])
