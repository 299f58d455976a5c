"""Turn a pytest-benchmark JSON of one of memgen's suites into a Markdown table (medians, ratios, machine).

Rows are the configurations (every extra_info field but the implementation and bookkeeping);
columns are the implementations, measured side by side in one run. Benchmarks that time baselines
interleaved with their own rounds record `over_<baseline>` ratios (and insertion counts); those
appear in a second table, one row per benchmark.

Usage: python benchmarks/report.py benchmarks/results/<suite>.json > benchmarks/results/<suite>.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BOOKKEEPING = {"impl", "torch", "machine", "rows_per_s", "tokens_per_s", "insertions_per_row", "bytes", "gb_per_s",
               "decision_points"}
BASELINES = ("torch", "reference", "hf_generate")  # the plain implementation each fast one is compared with


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    machine = data["machine_info"]
    cpu = machine.get("cpu", {})
    first = data["benchmarks"][0]
    suite = first["fullname"].split("::")[0].rsplit("/", 1)[-1].removeprefix("test_bench_").removesuffix(".py")
    rows: dict[tuple, dict[str, tuple[float, float]]] = defaultdict(dict)
    impls: list[str] = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = tuple((k, v) for k, v in sorted(info.items()) if k not in BOOKKEEPING and not k.startswith("over_"))
        rows[key][info["impl"]] = (bench["stats"]["median"], bench["stats"]["iqr"])
        if info["impl"] not in impls:
            impls.append(info["impl"])
    baseline = next((b for b in BASELINES if b in impls), None)
    fast = [i for i in impls if i != baseline]
    print(f"## {suite} ({machine.get('node', '?')}: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; "
          f"torch {first['extra_info'].get('torch', '?')}; {data['datetime'][:10]})\n")
    fields = list(dict.fromkeys(k for key in rows for k, _ in key))
    header = fields + [f"{i} (median ± IQR)" for i in impls] + [f"{baseline} / {i}" for i in fast if baseline]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, measured in sorted(rows.items(), key=lambda kv: str(kv[0])):
        values = dict(key)
        cells = [str(values.get(field, "-")) for field in fields]
        cells += [f"{_time(measured[i][0])} ± {_time(measured[i][1])}" if i in measured else "-" for i in impls]
        if baseline:
            cells += [f"{measured[baseline][0] / measured[i][0]:.1f}x" if i in measured and baseline in measured
                      else "-" for i in fast]
        print("| " + " | ".join(cells) + " |")
    rounds = sorted({b["stats"]["rounds"] for b in data["benchmarks"]})
    print(f"\nMedians of {'/'.join(map(str, rounds))} rounds, measured side by side in one run (`{path}`).")
    _interleaved(data["benchmarks"])


def _interleaved(benchmarks: list[dict]) -> None:
    """Per-benchmark ratios over baselines timed in alternation with its rounds, and what it produced."""
    rows = [b for b in benchmarks if any(k.startswith("over_") for k in b["extra_info"])]
    if not rows:
        return
    ratios = sorted({k for b in rows for k in b["extra_info"] if k.startswith("over_")})
    header = ["benchmark", "median", "tokens/s", "insertions per row"] + [r.replace("_", " ", 1) for r in ratios]
    print("\nInterleaved: each measured round follows one round of each baseline (ratios of medians).\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for b in rows:
        info = b["extra_info"]
        cells = [b["name"].removeprefix("test_"), _time(b["stats"]["median"]), f"{info.get('tokens_per_s', 0):.0f}",
                 f"{info.get('insertions_per_row', 0):.1f}"] + [f"{info[r]:.3f}" if r in info else "-" for r in ratios]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
