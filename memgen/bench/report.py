"""Reports of `memgen bench`: ratios between implementations, Markdown tables, a PNG chart, JSON.

Results are a dict `{"meta": {...}, "records": [...]}` (records as `harness.measure` makes them), and
optionally `"sections": [...]`, Markdown a script appends to the tables.
Ratios are always of the same case, measured side by side in one run: an implementation's time over
a baseline's (below 1: faster than the baseline). Two are reported: the ratio of the medians, and
the paired ratio, the median over rounds of each round's ratio (the two ran minutes apart at most,
so a machine's slow drift cancels) with a distribution-free 95% confidence interval, which says
whether a target such as 1.10 lies outside the machine's noise.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

SUITE_TITLES = {"ops": "Compiled ops", "decode": "Decoding", "train": "Training step (forward + backward)",
                "rewards": "Reward scoring"}
_RATE_UNITS = {"GB": "GB/s", "tokens": "tokens/s", "rows": "rows/s", "steps": "steps/s", "calls": "calls/s"}


def add_ratios(records: list[dict[str, Any]], paired: bool = True) -> None:
    """Set each record's `ratios` ({baseline: its median / the baseline's median}) within its case, and with
    `paired` (rounds interleaved, as `harness.measure` runs them) its `paired_ratios` ({baseline: {"median",
    "low", "high"}}: the median of the per-round ratios and its 95% interval, None where there are too few
    rounds for one). Rounds pair up in order: a capped implementation's rounds are the first ones."""
    by_case: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        by_case[r["suite"], r["case"]][r["impl"]] = r
    for r in records:
        case = by_case[r["suite"], r["case"]]
        compared = [b for b in r["baselines"] if b in case and b != r["impl"]]
        r["ratios"] = {b: r["median_s"] / case[b]["median_s"] for b in compared}
        r.pop("paired_ratios", None)
        if not paired:
            continue
        r["paired_ratios"] = {}
        for b in compared:
            per_round = [t / tb for t, tb in zip(r["times_s"], case[b]["times_s"])]
            interval = median_interval(per_round)
            r["paired_ratios"][b] = {"median": statistics.median(per_round), "low": interval and interval[0],
                                     "high": interval and interval[1]}


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The narrowest pair of order statistics (x_(j), x_(n+1-j)) that covers the median of the values' law with
    at least `confidence`, whatever that law (a binomial argument); None when n is too small for one."""
    xs, n = sorted(values), len(values)
    best = None
    for j in range(1, n // 2 + 1):
        below = sum(math.comb(n, i) for i in range(j)) / 2 ** n  # P(fewer than j of n values under the median)
        if 1 - 2 * below < confidence:
            break
        best = j
    return None if best is None else (xs[best - 1], xs[n - best])


def by_suite(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by suite, in the order the suites ran."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["suite"]].append(r)
    return groups


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def machine_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} threads"
    return (f"{meta['workload']} on {meta['device']} ({meta['dtype']}): {where}; torch {m['torch']}, "
            f"transformers {m['transformers']}, memgen {m['memgen']}; {meta['date']}")


def suite_table(records: list[dict[str, Any]]) -> str:
    """One Markdown table: a row per case and implementation, a ratio column per baseline, and the paired
    ratio over the first baseline with its 95% interval."""
    params = list(dict.fromkeys(k for r in records for k in r["params"]))
    baselines = list(dict.fromkeys(b for r in records for b in r["baselines"]))
    facts = list(dict.fromkeys(k for r in records for k in r["facts"]))
    paired = baselines[:1] if any("paired_ratios" in r for r in records) else []
    rate = _RATE_UNITS.get(records[0]["unit"], f"{records[0]['unit']}/s")
    header = (params + ["implementation", "median ± IQR", rate] + [f.replace("_", " ") for f in facts]
              + ["peak MiB"] + [f"/ {b}" for b in baselines] + [f"paired / {b} (95% CI)" for b in paired])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        peak = r["peak_memory_mib"]
        cells = [str(r["params"].get(p, "-")) for p in params]
        cells += [r["impl"], f"{format_time(r['median_s'])} ± {format_time(r['iqr_s'])}", _rate(r["rate_per_s"])]
        cells += [f"{r['facts'][f]:.1f}" if f in r["facts"] else "-" for f in facts]
        cells += ["-" if peak is None else f"{peak:,.0f}"]
        cells += [f"{r['ratios'][b]:.2f}" if b in r.get("ratios", {}) else "-" for b in baselines]
        cells += [paired_cell(r.get("paired_ratios", {}).get(b)) for b in paired]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_cell(ratio: dict[str, float | None] | None) -> str:
    """A paired ratio ({"median", "low", "high"}) as a table cell: the median, then its interval when there is one."""
    if ratio is None:
        return "-"
    if ratio["low"] is None:
        return f"{ratio['median']:.2f}"
    return f"{ratio['median']:.2f} ({ratio['low']:.2f}-{ratio['high']:.2f})"


def markdown(results: dict[str, Any]) -> str:
    """Every suite's table under a heading naming the machine, with how the numbers were taken, then the results'
    own Markdown `sections` (a script's derived figures), if any."""
    meta = results["meta"]
    out = [f"# memgen bench: {machine_line(meta)}", ""]
    for suite, records in by_suite(results["records"]).items():
        rounds = sorted({r["rounds"] for r in records})
        out += [f"## {SUITE_TITLES.get(suite, suite)}", "", suite_table(records), "",
                f"Medians of {'/'.join(map(str, rounds))} rounds, "
                + ("interleaved" if meta.get("interleaved", True) else "each implementation's back to back")
                + "; `/ X` is the median over X's median in the same case (below 1: faster)"
                + ("; `paired / X` the median of the rounds' own ratios, with its 95% confidence interval (from 6 "
                   "rounds on)" if meta.get("interleaved", True) else "") + ". Peak memory: "
                + ("allocated by torch on the GPU." if meta["device"].startswith("cuda")
                   else "the process's peak resident set."), ""]
    for section in results.get("sections", []):
        out += [section, ""]
    out.append(f"Command: `{meta['command']}`")
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: str | Path) -> None:
    """A PNG: one panel per suite, a bar per case and implementation, time per unit of work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_suite(results["records"])
    heights = [max(2.0, 0.28 * len(rs) + 1.0) for rs in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (suite, records) in zip(axes[:, 0], groups.items()):
        per_token = suite == "decode"
        values = [r["median_s"] / r["work"] * 1e3 if per_token else r["median_s"] * 1e3 for r in records]
        labels = [f"{r['case']} · {r['impl']}" for r in records]
        colors = [f"C{sorted({r['impl'] for r in records}).index(r['impl']) % 10}" for r in records]
        ax.barh(range(len(records)), values, color=colors)
        ax.set_yticks(range(len(records)), labels, fontsize=7)
        ax.invert_yaxis()
        if suite == "ops":
            ax.set_xscale("log")
        ax.set_xlabel("ms per generated token (median)" if per_token else "ms per call (median)")
        ax.set_title(SUITE_TITLES.get(suite, suite), fontsize=10)
        for y, (v, r) in enumerate(zip(values, records)):
            note = ", ".join(f"{v2:.2f}x {b}" for b, v2 in r.get("ratios", {}).items())
            ax.annotate(f" {v:.3g}" + (f"  ({note})" if note else ""), (v, y), va="center", fontsize=6)
    fig.suptitle(machine_line(results["meta"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json, results.md and results.png in `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["markdown"].write_text(markdown(results))
    chart(results, paths["chart"])
    return paths
