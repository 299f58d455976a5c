"""`memgen bench`: the timing harness, ratios, reports, workloads, and the command end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from memgen import bench, build_delimiter_table, generation
from memgen.bench.harness import Case, measure
from memgen.bench.decode_suite import weaver_calls, weaving_steps
from memgen.bench.report import add_ratios, markdown, median_interval, suite_table, write
from memgen.bench.workload import DELIMITER_SHARE, Workload, load_workload, prompt_batch, training_batch
from memgen.cli import main
from memgen.layer_stack import sliding_window
from offline import chat_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh preset cache for this module: the tiny preset is trained once, here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _case(log: list[str], **kwargs) -> Case:
    def impl(name):
        def run():
            log.append(name)
            return len(log)
        return run

    return Case("decode", "c", {"batch": 2}, {n: impl(n) for n in "abc"}, baselines=("a",), work=10, unit="tokens",
                **kwargs)


def _script(name: str):
    """A script of benchmarks/ loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_interleaves_rotating_rounds_and_caps_slow_implementations():
    log: list[str] = []
    seen = {}
    case = _case(log, max_rounds={"b": 2}, describe=lambda name, result: seen.setdefault(name, result) and {"n": 1})
    records = measure(case, rounds=4, device="cpu")
    assert log[:3] == ["a", "b", "c"]  # one warm-up call each, whose results reach `describe`
    assert seen == {"a": 1, "b": 2, "c": 3}
    assert log[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "a", "c"]  # rotated order; b stops after 2 rounds
    assert [len(r["times_s"]) for r in records] == [r["rounds"] for r in records] == [4, 2, 4]
    r = records[0]
    assert r["impl"] == "a" and r["params"] == {"batch": 2} and r["facts"] == {"n": 1} and r["baselines"] == ["a"]
    assert r["median_s"] > 0 and r["rate_per_s"] == pytest.approx(10 / r["median_s"])
    assert r["peak_memory_mib"] is None or r["peak_memory_mib"] > 0
    json.dumps(records)  # plain data


def test_measure_times_iterations_per_call():
    calls = []
    case = Case("ops", "o", {}, {"x": lambda: calls.append(1)}, iterations=7, warmup=3)
    measure(case, rounds=2, device="cpu")
    assert len(calls) == 3 + 2 * 7


def test_measure_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        measure(_case([]), rounds=0, device="cpu")


def _record(case, impl, median, baselines=("ref",), suite="train"):
    return dict(suite=suite, case=case, params={"batch": 1}, impl=impl, rounds=1, times_s=[median], median_s=median,
                iqr_s=0.0, iterations=1, work=1, unit="steps", rate_per_s=1 / median, peak_memory_mib=100.0,
                facts={}, baselines=list(baselines))


def test_ratios_are_medians_over_each_baseline_in_the_same_case():
    records = [_record("x", "fast", 1.0), _record("x", "ref", 4.0), _record("y", "fast", 3.0), _record("y", "ref", 3.0)]
    add_ratios(records)
    assert records[0]["ratios"] == {"ref": 0.25}
    assert records[1]["ratios"] == {}  # not compared with itself
    assert records[2]["ratios"] == {"ref": 1.0}
    table = suite_table(records)
    assert "| batch | implementation | median ± IQR | steps/s | peak MiB | / ref |" in table
    assert "| 1 | fast | 1.00 s ± 0.0 µs | 1 | 100 | 0.25 |" in table


def test_paired_ratios_are_per_round_ratios_with_an_interval_and_a_capped_baseline_pairs_its_first_rounds():
    fast = _record("x", "fast", 1.0, baselines=("ref", "slow"))
    fast["times_s"] = [1.0, 2.0, 1.0, 1.5, 1.0, 3.0, 1.0]
    ref = _record("x", "ref", 2.0)
    ref["times_s"] = [2.0, 2.0, 4.0, 3.0, 2.0, 3.0, 1.0]
    slow = _record("x", "slow", 4.0)
    slow["times_s"] = [4.0, 8.0, 2.0]  # capped: three rounds
    records = [fast, ref, slow]
    add_ratios(records)
    ratios = sorted([0.5, 1.0, 0.25, 0.5, 0.5, 1.0, 1.0])
    assert fast["paired_ratios"]["ref"] == {"median": 0.5, "low": ratios[0], "high": ratios[-1]}  # 7 rounds: the range
    assert fast["paired_ratios"]["slow"] == {"median": 0.25, "low": None, "high": None}  # 3 pairs: no interval
    table = suite_table(records)
    assert "| / ref | / slow | paired / ref (95% CI) |" in table
    assert "| 0.50 | 0.25 | 0.50 (0.25-1.00) |" in table  # fast: ratios of medians over ref, slow; paired over ref
    assert "| 2.00 | - | 2.00 |" in table  # slow: 3 pairs with ref, no interval
    add_ratios(records, paired=False)
    assert "paired" not in suite_table(records)


def test_median_interval_picks_the_order_statistics_that_cover_the_median_95_percent_of_the_time():
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 5 values cover it only 94% of the time
    assert median_interval([6.0, 1.0, 2.0, 5.0, 4.0, 3.0]) == (1.0, 6.0)
    assert median_interval([float(v) for v in range(1, 16)]) == (4.0, 12.0)
    generator = torch.Generator().manual_seed(0)
    covered = 0
    for _ in range(2000):  # exponential draws: median log 2, a skewed law
        low, high = median_interval(torch.empty(15).exponential_(generator=generator).tolist())
        covered += low <= 0.6931 <= high
    assert 0.95 <= covered / 2000 <= 0.985


def test_write_makes_json_markdown_and_png(tmp_path):
    records = [_record("x", "fast", 0.002), _record("x", "ref", 0.004)]
    add_ratios(records)
    meta = dict(workload="tiny", device="cpu", dtype="float32", date="2026-01-01 00:00 UTC", command="memgen bench",
                machine=dict(cpu="Test CPU", cores=2, torch="2", transformers="5", memgen="0"))
    paths = write({"meta": meta, "records": records}, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["records"][0]["ratios"] == {"ref": 0.5}
    text = paths["markdown"].read_text()
    assert "Test CPU, 2 threads" in text and "## Training step" in text and "`memgen bench`" in text
    assert text == markdown({"meta": meta, "records": records})
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_workloads_bias_delimiters_to_their_share_and_never_emit_eos():
    tok = chat_tokenizer()
    model = tiny_causal_lm("qwen2", len(tok) + 37)  # a vocabulary larger than the tokenizer's, like Qwen's
    workload = Workload("random", model.config, tok, torch.device("cpu"), torch.float32, synthetic=True)
    bias = workload._logit_bias(model)
    probs = torch.softmax(bias, 0)  # what near-uniform logits become
    table = build_delimiter_table(tok, vocab_size=bias.numel())
    assert probs[table].sum().item() == pytest.approx(DELIMITER_SHARE, rel=1e-4)
    assert probs[tok.eos_token_id].item() == 0.0
    real = Workload("real", model.config, tok, torch.device("cpu"), torch.float32, synthetic=False)._logit_bias(model)
    assert (real[torch.arange(real.numel()) != tok.eos_token_id] == 0).all()


def test_prompts_are_ragged_and_training_rows_carry_the_points(cache):
    workload = load_workload("tiny")
    ids, mask = prompt_batch(workload, 5)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and (mask[:, -1] == 1).all()  # left-padded, different lengths
    model = workload.memgen_model("lora")
    input_ids, mask, labels = training_batch(workload, 3, points=6)
    points = model(input_ids, mask, labels).augmentation_points
    assert ((points != 0).sum(1) == 6).all()
    assert workload.memgen_model("lora") is model  # built once per trigger mode
    assert workload.memgen_model("head").reasoner is not model.reasoner  # its own base: one set of adapters each


def test_workload_models_are_the_same_in_every_run_and_leave_the_global_generator_alone(cache):
    """Fresh MemGen weights come from a fixed seed, so two runs of a benchmark do the same work."""
    first = load_workload("tiny").memgen_model("lora").state_dict()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    second = load_workload("tiny").memgen_model("lora").state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_bench_command_writes_three_files_and_every_memory_configuration_weaves(cache, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--rounds", "1", "--batch", "1", "3", "--new-tokens", "48", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for title in ("## Compiled ops", "## Decoding", "## Training step"):
        assert title in printed
    assert all((out / name).is_file() for name in ("results.json", "results.md", "results.png"))
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["command"] == f"memgen bench --rounds 1 --batch 1 3 --new-tokens 48 --out {out} --no-progress"
    decode = {(r["params"]["batch"], r["impl"]): r for r in results["records"] if r["suite"] == "decode"}
    assert sorted({impl for _, impl in decode}) == sorted(bench.decode_suite.IMPLS)
    for batch in (1, 3):
        for impl in ("always", "prompt_only", "reference"):
            assert decode[batch, impl]["facts"]["insertions_per_row"] >= 1
        assert decode[batch, "always"]["facts"]["insertions_per_row"] > 1  # inference weaves too
        assert decode[batch, "prompt_only"]["facts"]["insertions_per_row"] == 1
        assert decode[batch, "prompt_only"]["facts"]["weaving_steps"] == 1  # every row weaves at the prompt
        always = decode[batch, "always"]["facts"]
        assert always["insertions_per_row"] <= always["weaving_steps"] <= batch * always["insertions_per_row"]
        assert decode[batch, "memory_off"]["facts"]["weaving_steps"] == 0
        for impl in ("head", "lora"):
            assert decode[batch, impl]["facts"]["decision_points_per_row"] > 1
        assert decode[batch, "always"]["ratios"].keys() == {"memory_off", "hf_generate", "reference"}
    train = [r for r in results["records"] if r["suite"] == "train"]
    assert {r["params"]["points_per_row"] for r in train} == {6}
    assert {r["impl"] for r in train} == set(bench.train_suite.IMPLS)
    step = next(r for r in train if r["impl"] == "memgen")
    assert step["ratios"].keys() == {"reference", "memgen_rereading"}
    ops = {r["params"]["op"] for r in results["records"] if r["suite"] == "ops"}
    assert ops == {"trigger_scoring", "pack_step", "pack_ragged", "write_kv"}


def test_bench_runs_on_a_model_directory(tmp_path):
    tok = chat_tokenizer()
    tiny_causal_lm("qwen2", len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    results = bench.run(("decode",), preset=None, model_path=str(tmp_path / "m"), rounds=1, batches=(2,),
                        new_tokens=6, progress=False, skip=("reference", "head"))
    records = {r["impl"]: r for r in results["records"]}
    assert results["meta"]["workload"] == str(tmp_path / "m")
    assert records["always"]["facts"]["insertions_per_row"] >= 1  # the prompt weave at least
    assert records["memory_off"]["facts"]["insertions_per_row"] == 0
    assert records.keys() == set(bench.decode_suite.IMPLS) - {"reference", "head"}  # skipped: not run
    assert records["always"]["ratios"].keys() == {"memory_off", "hf_generate"}
    assert "reference" not in markdown(results)


@pytest.mark.parametrize("kwargs,match", [
    (dict(suites=("nope",)), "suite must be one of"),
    (dict(rounds=0), "rounds must be an int >= 1"),
    (dict(batches=(0,)), "batches must be ints >= 1"),
    (dict(new_tokens=0), "new_tokens must be an int >= 1"),
    (dict(preset="huge"), "preset must be one of"),
    (dict(suites=("train",), skip=("lora",)), "skip: 'lora' not among the implementations"),
])
def test_bad_arguments_raise_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run(progress=False, **kwargs)


def test_bench_command_rejects_a_preset_and_a_model_together(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--model", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_call_costs_script_times_every_layout_and_refuses_a_step_where_every_row_weaves(cache, tmp_path, capsys):
    call_costs = _script("call_costs")
    with pytest.raises(SystemExit):
        call_costs.main(["--batch", "4", "--weaving", "4"])
    assert "--weaving must be in 1 .. 3" in capsys.readouterr().err
    call_costs.main(["--preset", "tiny", "--batch", "3", "--weaving", "1", "--width", "5", "--rounds", "2",
                     "--out", str(tmp_path)])
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["impl"] for r in records] == [
        "plain step [B, 1]", "weaver [G, W]", "reasoner tokens + latents [B + G*K, 1]",
        "reasoner tokens + latents, padded [B, 1 + K]", "joint: others' tokens + weaver [B - G + G*W, 1]",
        "joint padded [B, W]"]
    assert all(r["median_s"] > 0 and r["rounds"] == 2 for r in records)
    assert "| 3 | 1 | 5 | 8 | joint padded [B, W] |" in capsys.readouterr().out


def test_weaving_items_counts_each_rows_stream_to_its_last_weave_plus_the_queries():
    weaving_floor = _script("weaving_floor")
    mask = torch.tensor([[1, -100, 0, 1, 0, 1],  # prompt weave, then before new tokens 3 and 5
                         [0, 0, 0, 0, 0, 0],  # never weaves
                         [1, 0, 0, -100, -100, -100],  # the prompt weave only
                         [0, 1, -100, 0, 0, 0]])  # one weave, before new token 1
    # row 0's last weave sees 5 prompt items, 2 prompt latents, 5 tokens and 3 latents; 2 + 3 + 3 queries
    assert weaving_floor.weaving_items(mask, torch.tensor([5, 7, 4, 6]), 2, 3) == (
        (5 + 2 + 5 + 3 + 8) + 0 + (4 + 2) + (6 + 1 + 3), 8 + 0 + 2 + 3)


@pytest.mark.parametrize("joint", [True, False], ids=["weaver in the reasoner's calls", "weaver's own calls"])
@pytest.mark.parametrize("mode", ["always", "head", "lora"])
def test_weaving_items_equal_what_the_engines_weaver_reads(cache, monkeypatch, mode, joint):
    from memgen import generation

    monkeypatch.setitem(generation.JOINT_WEAVER_MODES, "cpu", ("always", "head", "lora") if joint else ())
    # the trigger invokes at half the decision points, so head/lora rows weave whatever this machine's tiny preset
    # writes (at the benchmarks' 0.1, some machines' weights and this seed gave no inference weave)
    monkeypatch.setattr("memgen.bench.workload.INVOKE_PROBABILITY", 0.5)
    weaving_floor = _script("weaving_floor")
    workload = load_workload("tiny")
    model = workload.memgen_model(mode)
    input_ids, mask = prompt_batch(workload, 3)
    reads, own_calls = [], []  # per weaver read: its stream items plus queries
    weave, weaver_part = generation._Engine.weave, generation._Engine._weaver_part

    def counting_weave(self, rows, kind, column, ahead=0):
        pending = self.stream_lengths[rows] + ahead - self.weaver.lengths[rows + self.weaver_offset]
        reads.append(int(pending.sum()) + rows.shape[0] * self.k[kind])
        own_calls.append(1)
        return weave(self, rows, kind, column, ahead)

    def counting_part(self, rows, kind, ahead):
        part, pending = weaver_part(self, rows, kind, ahead)
        reads.append(int(part.counts.sum()))
        return part, pending

    monkeypatch.setattr(generation._Engine, "weave", counting_weave)
    monkeypatch.setattr(generation._Engine, "_weaver_part", counting_part)
    out = model.generate(input_ids, mask, max_new_tokens=60, do_sample=True, generator=torch.Generator().manual_seed(1),
                         eos_token_id=workload.tokenizer.eos_token_id, return_dict_in_generate=True, trigger_mode=mode)
    weaves = out.augmentation_mask == 1
    assert weaves[:, 1:].any(), "no inference weave: the test would not check the stream count"
    k_prompt, k_inference = model.config.prompt_latents_len, model.config.inference_latents_len
    assert weaving_floor.weaving_items(out.augmentation_mask, mask.sum(1), k_prompt, k_inference) == (
        sum(reads), int(weaves[:, 0].sum()) * k_prompt + int(weaves[:, 1:].sum()) * k_inference)
    assert weaving_steps(out.augmentation_mask, mode) == len(reads)  # one weaver read per weaving step
    assert weaver_calls(out.augmentation_mask, mode) == len(own_calls)
    assert len(own_calls) == (int(weaves[:, 0].any()) if joint else len(reads))


def test_weaving_floor_script_reports_a_floor_and_a_measured_ratio_per_mode(cache, tmp_path, capsys):
    weaving_floor = _script("weaving_floor")
    with pytest.raises(SystemExit):
        weaving_floor.main(["--width", "0"])
    assert "--width must be >= 1, got 0" in capsys.readouterr().err
    weaving_floor.main(["--preset", "tiny", "--batch", "3", "--new-tokens", "20", "--width", "8", "--rounds", "2",
                        "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["impl"] for r in results["records"]] == ["memory off", "always", "head", "lora", "weaver [B, W]",
                                                       "reasoner [B, W]"]
    for mode in ("always", "head", "lora"):
        floor = results["floor"][mode]
        assert floor["floor_ratio"]["median"] >= 1.0 and floor["measured_ratio"]["median"] > 0
        assert floor["floor_ratio"]["low"] is None  # two rounds give no interval
    assert results["floor"]["always"]["weaver_items"] > 0
    assert "## Floor" in (tmp_path / "results.md").read_text()
    assert "| `always` |" in capsys.readouterr().out


def test_schedules_script_times_both_schedules_of_each_trigger_mode(cache, tmp_path, capsys):
    schedules = _script("schedules")
    with pytest.raises(SystemExit):
        schedules.main(["--rounds", "0"])
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    # 100 tokens: `head` and `lora` weave at several steps whichever torch trained the tiny preset (with 60, the
    # preset trained under torch 2.8 weaves at one step only, and the comparisons below would say nothing)
    schedules.main(["--preset", "tiny", "--batch", "3", "--new-tokens", "100", "--rounds", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    records = {r["impl"]: r for r in results["records"]}
    assert list(records) == ["memory off", "always in step", "always run ahead", "head in step", "head run ahead",
                             "lora in step", "lora run ahead"]
    for mode in ("always", "head", "lora"):
        in_step, run_ahead = records[f"{mode} in step"]["facts"], records[f"{mode} run ahead"]["facts"]
        assert in_step["insertions_per_row"] == run_ahead["insertions_per_row"] > 0  # the same samples
        assert in_step["weaver_calls"] > 1 and records[f"{mode} run ahead"]["ratios"][f"{mode} in step"] > 0
        if generation.weaves_in_reasoner_calls(mode, "cpu", 3):  # only the prompt weave is a call of its own
            assert run_ahead["weaver_calls"] <= 1
        else:
            assert run_ahead["weaver_calls"] > 1
    assert records["always run ahead"]["facts"]["weaver_calls"] == 1  # `always` weaves at the prompt
    schedules.main(["--preset", "tiny", "--batch", "3", "--new-tokens", "100", "--rounds", "1", "--modes", "head",
                    "--other-weaver", "--copies", "--out", str(tmp_path / "head")])
    results = json.loads((tmp_path / "head" / "results.json").read_text())
    joint_by_default = generation.weaves_in_reasoner_calls("head", "cpu", 3)
    other = f"head run ahead, {schedules.OTHER[not joint_by_default]}"
    copies = "head run ahead, a cache copy per item"
    records = {r["impl"]: r for r in results["records"]}
    assert list(records) == ["memory off", "head in step", "head run ahead", other, copies]
    for variant in (other, copies):
        facts = records[variant]["facts"]
        assert facts["insertions_per_row"] == records["head run ahead"]["facts"]["insertions_per_row"]
        assert records[variant]["ratios"]["head run ahead"] > 0
    joint, own = (records["head run ahead"], records[other])[:: 1 if joint_by_default else -1]
    assert joint["facts"]["weaver_calls"] <= 1 < own["facts"]["weaver_calls"]
    assert records[copies]["facts"]["weaver_calls"] == records["head run ahead"]["facts"]["weaver_calls"]
    assert "variant / run ahead" in (tmp_path / "head" / "results.md").read_text()
    report = (tmp_path / "results.md").read_text()
    assert "| head run ahead |" in report and "## Run ahead over in step" in report and "| `lora` |" in report


def test_step_ops_script_counts_each_configurations_ops_outside_and_inside_the_decoder(cache, tmp_path, capsys):
    step_ops = _script("step_ops")
    with pytest.raises(SystemExit):
        step_ops.main(["--new-tokens", "0"])
    assert "--new-tokens must be >= 1, got 0" in capsys.readouterr().err
    step_ops.main(["--preset", "tiny", "--batch", "2", "--new-tokens", "12", "--impls", "hf_generate", "memory_off",
                   "always", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    counts = results["step_ops"]
    assert list(counts) == ["hf_generate", "memory_off", "always"]
    for impl, figures in counts.items():
        assert figures["ops_outside"] > 0 and figures["ops_inside"] > 0, impl
        assert figures["launches_outside"] == figures["copies_inside"] == 0  # no CUDA here
    # memory adds work outside the layers: the trigger's decisions, the stream, the weaves
    assert counts["always"]["ops_outside"] > counts["memory_off"]["ops_outside"]
    # HF keeps its books on the device; a plain step of the engine sends only its rows' cache lengths there (the
    # prompt's read one more copy, once: 13 over 12 tokens)
    assert counts["hf_generate"]["transfers"] == 0
    assert 0 < counts["memory_off"]["transfers"] < 1.5 < counts["always"]["transfers"]
    assert "| memory_off |" in (tmp_path / "results.md").read_text()
    assert "ops outside" in capsys.readouterr().out


def test_step_ops_script_counts_a_gpus_layout_on_a_cpu(cache, tmp_path):
    """--layout cuda: the CPU runs the engine with a GPU's call layout (padded calls, the weaver in the reasoner's
    calls in every mode), restored afterwards; the counts differ from the CPU layout's."""
    from memgen import generation

    step_ops = _script("step_ops")
    before = dict(generation.PACKED_PADDING_ITEMS), dict(generation.JOINT_WEAVER_MODES)
    seen = []
    original = generation._Engine.__init__

    def spy(engine, *args, **kwargs):
        original(engine, *args, **kwargs)
        seen.append((engine.packed_padding, engine.joint_weaver))

    generation._Engine.__init__ = spy
    try:
        counts = {layout: step_ops.step_ops("tiny", "cpu", torch.float32, 3, 10, ("lora",), layout)
                  for layout in ("cpu", "cuda")}
        step_ops.main(["--preset", "tiny", "--batch", "3", "--new-tokens", "10", "--impls", "lora", "--layout",
                       "cuda", "--out", str(tmp_path)])
    finally:
        generation._Engine.__init__ = original
    assert (generation.PACKED_PADDING_ITEMS, generation.JOINT_WEAVER_MODES) == before
    cuda = (generation.PACKED_PADDING_ITEMS["cuda"], True)
    assert seen[:2] == [(0, False)] * 2 and seen[2:] == [cuda] * (len(seen) - 2)  # each impl runs twice
    assert counts["cpu"]["lora"]["ops_inside"] != counts["cuda"]["lora"]["ops_inside"]
    assert json.loads((tmp_path / "results.json").read_text())["layout"] == "cuda"
    assert "Calls laid out as on a cuda device." in (tmp_path / "results.md").read_text()


def test_sync_sites_script_refuses_a_cpu_and_names_a_site_by_its_innermost_memgen_frames(capsys):
    import traceback

    sync_sites = _script("sync_sites")
    with pytest.raises(SystemExit):
        sync_sites.main(["--device", "cpu"])
    assert "--device: a CUDA device is needed" in capsys.readouterr().err
    stack = [traceback.FrameSummary("/src/memgen/modeling.py", 5, "generate"),
             traceback.FrameSummary("/lib/torch/functional.py", 3, "f"),
             traceback.FrameSummary("/src/memgen/generation.py", 10, "generate"),
             traceback.FrameSummary("/src/memgen/benchmarks/sync_sites.py", 40, "record")]
    assert sync_sites._site(stack) == "generation.py:10 generate <- modeling.py:5 generate"
    assert sync_sites._site(stack[1:2]) == "?"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sync_sites_script_finds_the_steps_synchronisations_on_cuda(capsys):
    _script("sync_sites").main(["--preset", "tiny", "--batch", "2", "--new-tokens", "8", "--impls", "memory_off"])
    out = capsys.readouterr().out
    assert "== memory_off:" in out and "to_host" in out  # the step's one synchronisation


def test_step_ops_counts_leaves_that_do_work_and_places_them_by_the_decoders_ranges():
    step_ops = _script("step_ops")
    layer = torch.nn.Linear(4, 4)
    with torch.profiler.profile() as prof:
        x = torch.ones(3, 4)
        y = x.view(12).add(1)  # outside: a view (not counted) and an add
        with torch.profiler.record_function(step_ops.DECODER):
            layer(y.view(3, 4))  # inside: linear counts as the ops it runs
    counts = step_ops.count(prof.events())
    assert counts["ops_outside"] == 2  # ones' fill_ and the add
    assert counts["ops_inside"] >= 1 and counts["launches_inside"] == 0


def test_window_cost_script_times_each_arm_with_and_without_a_binding_window(cache, tmp_path, capsys):
    window_cost = _script("window_cost")
    with pytest.raises(SystemExit):
        window_cost.main(["--window", "0"])
    assert "--window must be >= 1, got 0" in capsys.readouterr().err
    window_cost.main(["--preset", "tiny", "--batch", "2", "--new-tokens", "24", "--window", "8", "--rounds", "2",
                      "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    records = {r["impl"]: r for r in results["records"]}
    assert list(records) == ["memory off", "memory off, window 8", "always", "always, window 8"]
    for arm in ("memory off", "always"):
        assert records[f"{arm}, window 8"]["paired_ratios"][arm]["median"] > 0
    assert records["always"]["facts"]["insertions_per_row"] > 0
    workload = load_workload("tiny")
    plain, windowed = workload.memgen_model("always"), workload.memgen_model("always", sliding_window=8)
    assert plain is not windowed and windowed is workload.memgen_model("always", sliding_window=8)
    assert sliding_window(windowed.reasoner.config) == 8 and sliding_window(plain.reasoner.config) is None
    input_ids, mask = prompt_batch(workload, 2)
    runs = [model.generate(input_ids, mask, max_new_tokens=24, memory=False) for model in (plain, windowed)]
    assert not torch.equal(*runs)  # the window binds: same weights, other tokens


def test_reward_scoring_script_scores_each_kind_of_completion_alike_at_every_worker_count(tmp_path, capsys):
    reward_scoring = _script("reward_scoring")
    with pytest.raises(SystemExit):
        reward_scoring.main(["--hanging", "5", "--completions", "4"])
    assert "--hanging must be in 0 .. --completions (4), got 5" in capsys.readouterr().err
    kinds = {kind: reward_scoring._reward(text, reward_scoring.TESTS, timeout=1.0)
             for kind, text in reward_scoring.ANSWERS.items()}
    assert kinds == {"passes": 1.0, "fails a test": 2 / 3, "crashes on import": 0.0, "hangs": 0.0}
    reward_scoring.main(["--completions", "6", "--hanging", "1", "--timeout", "1", "--workers", "3", "--rounds", "1",
                         "--out", str(tmp_path)])
    records = {r["impl"]: r for r in json.loads((tmp_path / "results.json").read_text())["records"]}
    assert list(records) == ["1 worker", "3 workers"]
    expected = (0 + 1 + 1 + 1 + 2 / 3 + 0) / 6  # one loop, then passes x3, a failed test, a crash
    assert all(r["facts"]["mean reward"] == pytest.approx(expected) for r in records.values())
    assert records["3 workers"]["ratios"]["1 worker"] > 0
