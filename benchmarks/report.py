"""Print the Markdown tables of a pytest-benchmark JSON written by memgen's suites (`benchmarks/test_bench_*.py`).

The tables are the ones `memgen bench` prints: each benchmark's extra_info holds its record's
fields, and pytest-benchmark's statistics give the median and interquartile range.

Usage: python benchmarks/report.py OUT.json [OUT.md]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memgen.bench.report import add_ratios, markdown


def results_from_pytest(data: dict) -> dict:
    """memgen's results ({"meta", "records"}) from pytest-benchmark's JSON."""
    records = []
    for bench in data["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        records.append(dict(suite=info["suite"], case=info["case"], params=info["params"], impl=info["impl"],
                            rounds=stats["rounds"], times_s=stats.get("data", []), median_s=stats["median"],
                            iqr_s=stats["iqr"], iterations=stats["iterations"], work=info["work"], unit=info["unit"],
                            rate_per_s=info["work"] / stats["median"], peak_memory_mib=info["peak_memory_mib"],
                            facts=info["facts"], baselines=info["baselines"]))
    add_ratios(records, paired=False)  # pytest-benchmark runs each implementation's rounds back to back
    first = data["benchmarks"][0]["extra_info"]
    meta = dict(workload=first["workload"], device=first["device"], dtype=first["dtype"], date=data["datetime"][:16],
                machine=first["machine"], command="pytest benchmarks/", interleaved=False)
    return {"meta": meta, "records": records}


def main(path: str, out: str | None = None) -> None:
    text = markdown(results_from_pytest(json.loads(Path(path).read_text())))
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
