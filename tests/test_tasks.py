"""Tasks: loaders over small offline files shaped like each dataset, reward functions, the sandbox."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from memgen.tasks import TASKS, load_rows, load_task, rewards
from memgen.tasks.sandbox import count_tests, run_unit_tests

ROWS = {
    "gsm8k": [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
               "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
              {"question": "A shirt costs $1,200 after a 20% rise. What did it cost?",
               "answer": "It cost 1200/1.2 = 1,000 dollars.\n#### 1,000"}],
    "math": [{"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
              "solution": "We have $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\dfrac{3}{4}}$."},
             {"problem": "Find $x$ if $2x = 10$.", "solution": "Divide: $x = \\boxed{5}$.", "answer": "5"}],
    "gpqa": [{"Question": "Which particle mediates the electromagnetic force?", "Correct Answer": "Photon",
              "Incorrect Answer 1": "Gluon", "Incorrect Answer 2": "W boson", "Incorrect Answer 3": "Graviton",
              "Explanation": "Photons carry the electromagnetic interaction."}],
    "triviaqa": [{"question": "Which planet is known as the Red Planet?",
                  "answer": {"value": "Mars", "aliases": ["Mars", "The Red Planet", "Planet Mars"]}}],
    "popqa": [{"question": "What is George Rankin's occupation?", "possible_answers": "[\"politician\", \"MP\"]"}],
    "kodcode": [{"question": "Write add(a, b) that returns the sum.",
                 "solution": "def add(a, b):\n    return a + b\n",
                 "test": "from solution import add\n\ndef test_small():\n    assert add(1, 2) == 3\n\n"
                         "def test_negative():\n    assert add(-1, 1) == 0\n"}],
    "qa": [{"prompt": "Capital of France?", "answer": "Paris"}],
    "bigcodebench": [{  # BigCodeBench's columns; its tests call task_func unimported, in unittest classes
        "task_id": "BigCodeBench/0", "entry_point": "task_func", "libs": "['collections']",
        "complete_prompt": "import collections\ndef task_func(words):\n    \"\"\"Count each word.\"\"\"\n",
        "instruct_prompt": "Count each word.\nYou should write self-contained code starting with:\n```\n"
                           "import collections\ndef task_func(words):\n```",
        "code_prompt": "import collections\ndef task_func(words):\n",
        "canonical_solution": "    return dict(collections.Counter(words))\n",
        "test": "import unittest\n\n\nclass TestCases(unittest.TestCase):\n    def setUp(self):\n"
                "        self.words = ['a', 'b', 'a']\n\n    def test_counts(self):\n"
                "        self.assertEqual(task_func(self.words), {'a': 2, 'b': 1})\n\n    def test_empty(self):\n"
                "        self.assertEqual(task_func([]), {})\n"}],
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_task_loads_offline_files_and_its_reference_answer_earns_full_reward(tmp_path, name):
    data = load_task(name, _write_jsonl(tmp_path / f"{name}.jsonl", ROWS[name]))
    assert data.column_names == ["prompt", "answer", "target"] and len(data) == len(ROWS[name])
    for row in data:
        assert row["prompt"] and row["answer"]
        assert TASKS[name].reward(row["answer"], row["target"]) == 1.0, row
        assert TASKS[name].reward("I do not know.", row["target"]) == 0.0


def test_targets_of_each_dataset_shape(tmp_path):
    gsm = load_task("gsm8k", _write_jsonl(tmp_path / "g.jsonl", ROWS["gsm8k"]))
    assert gsm["target"] == ["72", "1000"] and "<<" not in gsm[0]["answer"] and "\\boxed{72}" in gsm[0]["answer"]
    assert load_task("math", _write_jsonl(tmp_path / "m.jsonl", ROWS["math"]))["target"] == ["\\dfrac{3}{4}", "5"]
    trivia = load_task("triviaqa", _write_jsonl(tmp_path / "t.jsonl", ROWS["triviaqa"]))
    assert trivia[0]["target"] == ["Mars", "The Red Planet", "Planet Mars"]
    assert load_task("popqa", _write_jsonl(tmp_path / "p.jsonl", ROWS["popqa"]))[0]["target"] == ["politician", "MP"]


def test_gpqa_options_are_shuffled_the_same_way_every_time(tmp_path):
    path = _write_jsonl(tmp_path / "gpqa.jsonl", ROWS["gpqa"])
    first, again = load_task("gpqa", path)[0], load_task("gpqa", path)[0]
    assert first == again
    letter = first["target"]
    assert f"({letter}) Photon" in first["prompt"]
    assert all(f"({x})" in first["prompt"] for x in "ABCD")


def test_parquet_files_and_limit(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS["gsm8k"]).to_parquet(str(tmp_path / "g.parquet"))
    data = load_task("gsm8k", str(tmp_path / "g.parquet"), limit=1)
    assert len(data) == 1 and data[0]["target"] == "72"


def test_save_to_disk_directories_load_their_rows(tmp_path):
    """A `save_to_disk` directory (what offline clusters are handed) loads: a Dataset as it is, a DatasetDict's split
    (`load_dataset` refuses such a directory)."""
    import datasets

    datasets.Dataset.from_list(ROWS["gsm8k"]).save_to_disk(str(tmp_path / "one"))
    assert load_task("gsm8k", str(tmp_path / "one"))["target"] == ["72", "1000"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS["gsm8k"][:1]),
                          "test": datasets.Dataset.from_list(ROWS["gsm8k"][1:])}).save_to_disk(str(tmp_path / "both"))
    assert load_task("gsm8k", tmp_path / "both", split="test")["target"] == ["1000"]
    with pytest.raises(ValueError, match=r"split 'validation' is not in the dataset saved at .*; it has \['test', "
                                         r"'train'\]"):
        load_task("gsm8k", str(tmp_path / "both"), split="validation")


def _hub_copy(folder: Path) -> Path:
    """A local copy of a hub dataset with GSM8K's two configurations, laid out as the hub lays out openai/gsm8k."""
    socratic = [dict(r, answer=r["answer"].replace("####", "Why? Because.\n####")) for r in ROWS["gsm8k"]]
    for config, rows in (("main", ROWS["gsm8k"]), ("socratic", socratic)):
        (folder / config).mkdir(parents=True)
        _write_jsonl(folder / config / "train.jsonl", rows)
    (folder / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        for c in ("main", "socratic")) + "---\n")
    return folder


def test_the_task_s_own_configuration_is_the_default_for_its_dataset(tmp_path, monkeypatch):
    """GSM8K's hub dataset has two configurations: `load_task("gsm8k", "openai/gsm8k")` (or a local copy of it)
    failed with "Config name is missing"; the task's own ("main") is now the default, and `config` picks another."""
    folder = _hub_copy(tmp_path / "gsm8k")
    assert "Why? Because." not in load_task("gsm8k", str(folder))[0]["answer"]
    assert "Why? Because." in load_task("gsm8k", str(folder), config="socratic")[0]["answer"]
    plain = tmp_path / "plain"  # a directory of data files, without configurations: its splits by file name
    plain.mkdir()
    _write_jsonl(plain / "train.jsonl", ROWS["gsm8k"])
    _write_jsonl(plain / "test.jsonl", ROWS["gsm8k"][1:])
    assert len(load_task("gsm8k", str(plain))) == 2 and len(load_task("gsm8k", str(plain), split="test")) == 1
    import datasets

    asked = []
    def offline_hub(path, name=None, split=None):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(ROWS["gsm8k"])
    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    load_task("gsm8k", "openai/gsm8k", split="test")
    load_task("gsm8k")
    load_task("gsm8k", "someone/gsm8k-mirror")
    load_task("gsm8k", "openai/gsm8k", config="socratic")
    assert asked == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train"),
                     ("someone/gsm8k-mirror", None, "train"), ("openai/gsm8k", "socratic", "train")]


def test_bad_sources_and_rows_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("nope")
    with pytest.raises(ValueError, match="source files not found"):
        load_task("gsm8k", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="all be .json/.jsonl or all .parquet"):
        load_task("gsm8k", [str(_write_jsonl(tmp_path / "a.jsonl", ROWS["gsm8k"])), str(tmp_path / "b.parquet")])
    with pytest.raises(ValueError, match="limit must be"):
        load_task("gsm8k", str(tmp_path / "a.jsonl"), limit=0)
    csv = tmp_path / "rows.csv"  # an existing file of another kind was taken for a hub name ("couldn't find")
    csv.write_text("question,answer\nq,#### 1\n")
    with pytest.raises(ValueError, match=r"source files must be .json, .jsonl, .parquet files, got \['.*rows.csv'\]"):
        load_task("gsm8k", str(csv))
    with pytest.raises(ValueError, match="source takes one hub dataset name"):  # the second was dropped
        load_task("gsm8k", ["openai/gsm8k", "other/gsm8k"])
    with pytest.raises(ValueError, match="has no public dataset"):
        load_task("qa")
    with pytest.raises(ValueError, match="local files and save_to_disk directories have none"):
        load_task("gsm8k", str(tmp_path / "a.jsonl"), config="main")
    with pytest.raises(ValueError, match="config must be a non-empty string"):
        load_task("gsm8k", config="")
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['solution'\]"):
        load_task("math", _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}]))
    with pytest.raises(ValueError, match="#### <number>"):
        load_task("gsm8k", _write_jsonl(tmp_path / "bad2.jsonl", [{"question": "q", "answer": "42"}]))
    empty = tmp_path / "empty.jsonl"  # `datasets` raised a bare StopIteration
    empty.write_text("")
    with pytest.raises(ValueError, match=r"source files are empty: \['.*empty.jsonl'\]"):
        load_task("gsm8k", str(empty))
    with pytest.raises(ValueError, match="limit must be an int >= 1, got True"):
        load_task("gsm8k", str(tmp_path / "a.jsonl"), limit=True)


def test_load_rows_reads_rows_as_they_are(tmp_path):
    conversations = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                     for i in range(3)]
    rows = load_rows(_write_jsonl(tmp_path / "chat.jsonl", conversations), limit=2)
    assert list(rows) == conversations[:2]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(conversations)}).save_to_disk(saved)
    assert list(load_rows(str(saved), split="test")) == conversations
    with pytest.raises(ValueError, match="source must name local files"):
        load_rows(None)
    with pytest.raises(ValueError, match="source files not found"):
        load_rows(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("completion,target,expected", [
    ("so the total is 72.", "72", 1.0),
    ("First 10, then 20, so 1,000 in all", "1000", 1.0),
    ("The answer is \\boxed{72.0}", "72", 1.0),
    ("\\boxed{\\frac{3}{4}}", "\\dfrac{3}{4}", 1.0),
    ("\\boxed{0.75}", "\\frac34", 1.0),
    ("\\boxed{3/4}", "0.75", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{\\text{(B)}}", "(B)", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("it is 71, not \\boxed{73}", "72", 0.0),
    ("nothing here", "72", 0.0),
])
def test_math_reward(completion, target, expected):
    assert rewards.math_reward(completion, target) == expected


def test_last_boxed_matches_nested_braces():
    assert rewards.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert rewards.last_boxed("no box") is None
    assert rewards.last_boxed("\\boxed{72") is None  # unbalanced: no boxed answer, so the last number counts
    assert rewards.math_answer("\\boxed{72") == "72"


@pytest.mark.parametrize("completion,letter", [
    ("The photon... The answer is (C).", "C"), ("Answer: B", "B"), ("so \\boxed{D}", "D"),
    ("between (A) and (B) I pick (B)", "B"), ("A photon carries it, the answer is (D)", "D"),
    ("Thinking.\nC", "C"), ("A cat sat.", None), ("the answer is (E)", None),
])
def test_option_letter(completion, letter):
    assert rewards.option_letter(completion) == letter


def test_qa_reward_normalises_and_accepts_any_alias():
    assert rewards.normalize_qa("The  Red-Planet!") == "redplanet"
    aliases = ["Mars", "The Red Planet"]
    assert rewards.qa_reward("The answer is the red planet.", aliases) == 1.0
    assert rewards.qa_reward("\\boxed{MARS}", aliases) == 1.0
    assert rewards.qa_reward("Mars\nbecause it is red", aliases) == 1.0
    assert rewards.qa_reward("Jupiter", aliases) == 0.0
    assert rewards.qa_reward("", aliases) == 0.0
    assert rewards.qa_reward("Paris", "paris") == 1.0


def test_code_block_takes_the_last_fenced_block():
    text = "Try:\n```python\nx = 1\n```\nBetter:\n```\ndef f():\n    return 2\n```\n"
    assert rewards.code_block(text) == "def f():\n    return 2\n"
    assert rewards.code_block("def f(): pass") == "def f(): pass"


TESTS = ("from solution import add\n\ndef test_a():\n    assert add(1, 2) == 3\n\n"
         "def test_b():\n    assert add(2, 2) == 4\n\nclass TestMore:\n    def test_c(self):\n        assert add(0, 0) == 1\n")


def test_sandbox_counts_passes_and_gives_partial_credit():
    assert count_tests(TESTS) == 3 and count_tests("def (") == 0
    run = run_unit_tests("def add(a, b):\n    return a + b\n", TESTS)
    assert (run.passed, run.total, run.status) == (2, 3, "ok")
    assert rewards.code_reward("```python\ndef add(a, b):\n    return a + b\n```", TESTS) == pytest.approx(2 / 3)


def test_sandbox_survives_broken_and_hanging_code():
    broken = run_unit_tests("def add(a, b) return", TESTS)
    assert (broken.passed, broken.total, broken.status) == (0, 3, "error") and "SyntaxError" in broken.detail
    hang = run_unit_tests("def add(a, b):\n    while True:\n        pass\n", TESTS, timeout=1.5)
    assert (hang.passed, hang.status) == (0, "timeout")
    partial = run_unit_tests("import time\ndef add(a, b):\n    if a == 2:\n        time.sleep(60)\n    return a + b\n",
                             TESTS, timeout=1.5)
    assert (partial.passed, partial.status) == (1, "timeout")  # test_a passed before test_b hung


@pytest.mark.parametrize("attack,event", [
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket."),
    ("import os\nos.fork()", "os.fork"),
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import os\nos.system('true')", "os.system"),
    ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
    ("open({outside!r}, 'w').write('x')", "writing"),
    ("import os\nos.remove({outside!r})", "os.remove"),
    ("x = bytearray(8 << 30)", "MemoryError"),
    # (allowed without the hook: lowering a limit, and reading memory through a ctypes type made without dlopen)
    ("import resource\nresource.setrlimit(resource.RLIMIT_CORE, (0, 0))", "sandbox: resource.setrlimit is not allowed"),
    ("import _ctypes\nclass C(_ctypes._SimpleCData):\n    _type_ = 'c'\nC.from_address(id(1))",
     "sandbox: ctypes.cdata is not allowed"),
    ("import ctypes\nctypes.CDLL('libc.so.6').setrlimit", "sandbox: ctypes.dlopen is not allowed"),
    ("import ctypes\nctypes.pythonapi.PySys_ResetWarnOptions", "sandbox: ctypes.dlsym is not allowed"),
    ("import ctypes\nctypes.string_at(id(1), 8)", "sandbox: ctypes.string_at is not allowed"),
])
def test_sandbox_refuses_harm(tmp_path, attack, event):
    outside = tmp_path / "victim.txt"
    outside.write_text("keep")
    run = run_unit_tests(attack.format(outside=str(outside)) + "\ndef add(a, b):\n    return a + b\n", TESTS,
                         memory_mb=512)
    assert run.passed == 0 and run.status == "error" and event in run.detail, run.detail
    assert outside.read_text() == "keep" and os.getppid() > 0


def test_sandbox_counts_cannot_be_rewritten_from_inside():
    forge = ("import __main__, sys\nfor name in dir(__main__):\n    pass\n"
             "sys.modules['__main__'].__dict__['passed'] = 99\n"
             "def add(a, b):\n    return 0\n")
    assert run_unit_tests(forge, TESTS).passed == 0


PYTEST_STYLE = """import unittest

import pytest
from solution import add


@pytest.fixture
def base():
    yield 10


@pytest.mark.parametrize("a,b,want", [(1, 2, 3), (2, 2, 4), pytest.param(0, 0, 0, id="zeros")])
def test_cases(a, b, want):
    assert add(a, b) == want


def test_fixture(base, tmp_path, capsys):
    (tmp_path / "x").write_text("written")
    print(add(base, 1))
    assert capsys.readouterr().out == "11\\n" and (tmp_path / "x").read_text() == "written"


def test_raises():
    with pytest.raises(TypeError):
        add(1)


class TestSetup:
    def setup_method(self):
        self.offset = 5

    def test_method(self):
        assert add(self.offset, 1) == 6


class TestUnittest(unittest.TestCase):
    def setUp(self):
        self.pair = (3, 4)

    def test_case(self):
        self.assertEqual(add(*self.pair), 7)
"""


def test_sandbox_runs_tests_as_pytest_does():
    """KodCode's tests are pytest's: parametrized cases, fixtures (the test's own and pytest's: tmp_path, capsys),
    setup methods and unittest classes. The sandbox ran each test function once with no arguments, so a correct
    solution failed every parametrized or fixture-taking test, and a unittest class ran without its setUp."""
    run = run_unit_tests("def add(a, b):\n    return a + b\n", PYTEST_STYLE)
    assert (run.passed, run.total, run.status) == (7, 7, "ok"), run.detail  # 3 parametrized cases + 4
    wrong = run_unit_tests("def add(a, b):\n    return a + b if a else 1\n", PYTEST_STYLE)
    assert (wrong.passed, wrong.total, wrong.status) == (6, 7, "ok")  # only the (0, 0) case fails
    broken = run_unit_tests("def add(a, b) return", PYTEST_STYLE)  # nothing collected: the functions' count
    assert (broken.passed, broken.total, broken.status) == (0, 5, "error") and "SyntaxError" in broken.detail


def test_numpy_and_pandas_run_in_the_sandbox():
    """Importing ctypes (numpy and pandas do) opens the process's own symbols, which the hook refused: no solution
    using numpy could pass, and most of BigCodeBench uses it."""
    code = ("import numpy as np\nimport pandas as pd\n\n\ndef total(n):\n"
            "    return int(pd.DataFrame({'x': np.arange(n)}).x.sum())\n")
    run = run_unit_tests(code, "from solution import total\n\n\ndef test_total():\n    assert total(4) == 6\n")
    assert (run.passed, run.total, run.status) == (1, 1, "ok"), run.detail


def test_the_sandbox_needs_pytest(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else find_spec(name, *a))
    with pytest.raises(ImportError, match="the sandbox runs tests with pytest, which is not installed"):
        run_unit_tests("def add(a, b):\n    return a + b\n", TESTS)


def test_code_that_empties_its_directory_does_not_crash_the_caller():
    """The caller read the child's output back from a file in the sandbox: a solution that deleted the files of
    its working directory (file-handling tasks do) raised FileNotFoundError in the caller, and so stopped GRPO."""
    for cleanup in ("import os\nfor f in os.listdir('.'):\n    os.remove(f)\n", "import shutil\nshutil.rmtree('.')\n"):
        run = run_unit_tests(cleanup + "def add(a, b):\n    return a + b\n", TESTS)
        assert run.passed == 0 and run.status == "error" and run.detail, run


def test_a_forged_count_cannot_lower_the_total():
    forge = "import sys\nimport os\nos.write(int(sys.argv[1]), b'total:1\\n0:P\\n')\ndef add(a, b):\n    return 0\n"
    run = run_unit_tests(forge, TESTS)
    assert run.total == 3 and run.passed <= 1


def test_sandbox_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout must be"):
        run_unit_tests("", TESTS, timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be"):
        run_unit_tests("", TESTS, memory_mb=1)
    with pytest.raises(ValueError, match="strings of Python source"):
        run_unit_tests(None, TESTS)
