"""Turning result rows into what people read: a terminal table, CSV/JSON and PNG plots.

Plots per suite: time, throughput (TFLOP/s or GB/s) and peak memory against the suite's main
axis (sequence length, density, or cache length), one line per implementation and series;
and the speedup of fastattn over each peer per configuration.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

AXES = ("density", "seq_len")  # the first one a suite's rows carry is its x axis
TABLE_COLUMNS = ["suite", "config", "impl", "median_ms", "min_ms", "max_ms", "tflops", "gbps",
                 "pct_of_ceiling", "peak_mem_mb"]


def _fmt(x) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def table(rows: list[dict]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in TABLE_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def speedups(rows: list[dict]) -> list[dict]:
    """peer median / fastattn median for every (suite, config) where both ran."""
    ours = {(r["suite"], r["config"]): r["median_ms"] for r in rows if r["impl"] == "fastattn"}
    return [{"suite": r["suite"], "config": r["config"], "peer": r["impl"],
             "speedup": r["median_ms"] / ours[(r["suite"], r["config"])]}
            for r in rows if r["impl"] != "fastattn" and "ceiling" not in r["impl"]
            and (r["suite"], r["config"]) in ours]


def write(rows: list[dict], skipped: list[dict], environment: dict, out: Path) -> list[Path]:
    """results.json, results.csv and the plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    (out / "results.json").write_text(json.dumps(
        {"environment": environment, "results": rows, "speedups": speedups(rows), "skipped": skipped}, indent=1))
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        written.append(out / "results.csv")
    return written + plots(rows, out, environment)


def _series(row: dict, axis: str) -> str:
    """A config name without its value on the plot's axis: one line per series."""
    name = re.sub(r"-l\d+", "", row["config"]) if axis == "seq_len" else row["config"]
    return re.sub(r"-density[\d.]+", "", name)


def plots(rows: list[dict], out: Path, environment: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastattn bench: matplotlib is not installed, so no plots (pip install matplotlib)")
        return []
    device = environment.get("gpu") or environment.get("device", "")
    written = []
    for suite in sorted({r["suite"] for r in rows}):
        sub = [r for r in rows if r["suite"] == suite]
        axis = next((a for a in AXES if all(a in r for r in sub)), None)
        if axis is None:
            continue
        flop_bound = any(not math.isnan(r["tflops"]) for r in sub)
        fig, axes = plt.subplots(1, 3, figsize=(18, 5))
        for impl in sorted({r["impl"] for r in sub}):
            for series in sorted({_series(r, axis) for r in sub}):
                pts = sorted((r[axis], r["median_ms"], r["tflops"] if flop_bound else r["gbps"], r["peak_mem_mb"])
                             for r in sub if r["impl"] == impl and _series(r, axis) == series)
                if not pts:
                    continue
                label = f"{impl} {series}"
                for ax, column in zip(axes, (1, 2, 3)):
                    ax.plot([p[0] for p in pts], [p[column] for p in pts], marker="o", label=label)
        xlabel = {"seq_len": "sequence length (tokens)", "density": "fraction of blocks kept"}[axis]
        axes[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median time (ms)")
        axes[1].set(xscale="log", xlabel=xlabel, ylabel="TFLOP/s" if flop_bound else "GB/s")
        axes[2].set(xscale="log", xlabel=xlabel, ylabel="peak memory (MB)")
        for ax, what in zip(axes, ("time", "throughput", "memory")):
            ax.set_title(f"{suite}: {what} ({device})")
            ax.grid(True, which="both", alpha=0.3)
        axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        path = out / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    ups = speedups(rows)
    if ups:
        labels = [f"{u['suite']} {u['config']} vs {u['peer']}" for u in ups]
        fig, ax = plt.subplots(figsize=(10, 0.25 * len(ups) + 1.5))
        ax.barh(range(len(ups)), [u["speedup"] for u in ups],
                color=["tab:green" if u["speedup"] >= 1 else "tab:red" for u in ups])
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(ups)), labels, fontsize=6)
        ax.set_xscale("log")
        ax.set(xlabel="speedup of fastattn (peer time / fastattn time; > 1 means fastattn is faster)",
               title=f"fastattn vs peers ({device})")
        fig.tight_layout()
        path = out / "speedup.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
