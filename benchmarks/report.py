"""Turn a pytest-benchmark JSON of the ops suite into a Markdown table (medians, ratios, machine).

Usage: python benchmarks/report.py benchmarks/results/trigger_scoring_cpu.json > benchmarks/results/trigger_scoring_cpu.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    machine = data["machine_info"]
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "unknown CPU"))
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["device"], info["batch"], info["mode"])
        rows[key][info["impl"]] = (bench["stats"]["median"], bench["stats"]["iqr"], info["machine"])
    print(f"## trigger_scoring ({machine.get('node', '?')}: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; "
          f"torch {data['benchmarks'][0]['extra_info'].get('torch', '?')}; {data['datetime'][:10]})\n")
    print("| device | batch | mode | torch reference (us) | native (us) | triton (us) | reference / native |")
    print("|---|---|---|---|---|---|---|")
    for (device, batch, mode), impls in sorted(rows.items()):
        def cell(impl):
            if impl not in impls:
                return "-"
            median, iqr, _ = impls[impl]
            return f"{median * 1e6:.1f} ± {iqr * 1e6:.1f}"
        ratio = (f"{impls['torch'][0] / impls['native'][0]:.1f}x" if "torch" in impls and "native" in impls else "-")
        name = device if device == "cpu" else next(iter(impls.values()))[2]
        print(f"| {name} | {batch} | {mode} | {cell('torch')} | {cell('native')} | {cell('triton')} | {ratio} |")
    print("\nMedians over 200 rounds of 10 calls (± interquartile range), measured side by side in one run.")


if __name__ == "__main__":
    main(sys.argv[1])
