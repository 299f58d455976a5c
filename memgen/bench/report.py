"""Reports of `memgen bench`: ratios between implementations, Markdown tables, a PNG chart, JSON.

Results are a dict `{"meta": {...}, "records": [...]}` (records as `harness.measure` makes them).
Ratios are always of medians of the same case, measured side by side in one run: an
implementation's time over a baseline's (below 1: faster than the baseline).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

SUITE_TITLES = {"ops": "Compiled ops", "decode": "Decoding", "train": "Training step (forward + backward)"}
_RATE_UNITS = {"GB": "GB/s", "tokens": "tokens/s", "rows": "rows/s", "steps": "steps/s", "calls": "calls/s"}


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Set each record's `ratios`: {baseline: its median / the baseline's median} within its case."""
    medians: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in records:
        medians[r["suite"], r["case"]][r["impl"]] = r["median_s"]
    for r in records:
        case = medians[r["suite"], r["case"]]
        r["ratios"] = {b: r["median_s"] / case[b] for b in r["baselines"] if b in case and b != r["impl"]}


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
    """One Markdown table: a row per case and implementation, a ratio column per baseline."""
    params = list(dict.fromkeys(k for r in records for k in r["params"]))
    baselines = list(dict.fromkeys(b for r in records for b in r["baselines"]))
    facts = list(dict.fromkeys(k for r in records for k in r["facts"]))
    rate = _RATE_UNITS.get(records[0]["unit"], f"{records[0]['unit']}/s")
    header = (params + ["implementation", "median ± IQR", rate] + [f.replace("_", " ") for f in facts]
              + ["peak MiB"] + [f"/ {b}" for b in baselines])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        peak = r["peak_memory_mib"]
        cells = [str(r["params"].get(p, "-")) for p in params]
        cells += [r["impl"], f"{format_time(r['median_s'])} ± {format_time(r['iqr_s'])}", _rate(r["rate_per_s"])]
        cells += [f"{r['facts'][f]:.1f}" if f in r["facts"] else "-" for f in facts]
        cells += ["-" if peak is None else f"{peak:,.0f}"]
        cells += [f"{r['ratios'][b]:.2f}" if b in r.get("ratios", {}) else "-" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """Every suite's table under a heading naming the machine, with how the numbers were taken."""
    meta = results["meta"]
    out = [f"# memgen bench: {machine_line(meta)}", ""]
    for suite, records in by_suite(results["records"]).items():
        rounds = sorted({r["rounds"] for r in records})
        out += [f"## {SUITE_TITLES.get(suite, suite)}", "", suite_table(records), "",
                f"Medians of {'/'.join(map(str, rounds))} rounds, "
                + ("interleaved" if meta.get("interleaved", True) else "each implementation's back to back")
                + "; `/ X` is the median over X's median in the same case (below 1: faster). Peak memory: "
                + ("allocated by torch on the GPU." if meta["device"].startswith("cuda")
                   else "the process's peak resident set."), ""]
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
