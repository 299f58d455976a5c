"""Turn a pytest-benchmark JSON of one of memgen's suites into a Markdown table (medians, ratios, machine).

Rows are the configurations (every extra_info field but the implementation and bookkeeping);
columns are the implementations, measured side by side in one run.

Usage: python benchmarks/report.py benchmarks/results/<suite>.json > benchmarks/results/<suite>.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BOOKKEEPING = {"impl", "torch", "machine", "rows_per_s", "tokens_per_s", "insertions_per_row"}
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
        key = tuple((k, v) for k, v in sorted(info.items()) if k not in BOOKKEEPING)
        rows[key][info["impl"]] = (bench["stats"]["median"], bench["stats"]["iqr"])
        if info["impl"] not in impls:
            impls.append(info["impl"])
    baseline = next((b for b in BASELINES if b in impls), None)
    fast = [i for i in impls if i != baseline]
    print(f"## {suite} ({machine.get('node', '?')}: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; "
          f"torch {first['extra_info'].get('torch', '?')}; {data['datetime'][:10]})\n")
    fields = [k for k, _ in next(iter(rows))]
    header = fields + [f"{i} (median ± IQR)" for i in impls] + [f"{baseline} / {i}" for i in fast if baseline]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, measured in sorted(rows.items(), key=lambda kv: str(kv[0])):
        cells = [str(v) for _, v in key]
        cells += [f"{_time(measured[i][0])} ± {_time(measured[i][1])}" if i in measured else "-" for i in impls]
        if baseline:
            cells += [f"{measured[baseline][0] / measured[i][0]:.1f}x" if i in measured and baseline in measured
                      else "-" for i in fast]
        print("| " + " | ".join(cells) + " |")
    print(f"\nMedians of {first['stats']['rounds']} rounds, measured side by side in one run (`{path}`).")


if __name__ == "__main__":
    main(sys.argv[1])
