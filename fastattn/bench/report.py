"""Turning result rows into what people read: a terminal table, CSV/JSON and PNG plots.

Plots per suite: time, throughput (TFLOP/s or GB/s) and peak memory against the suite's main
axis (sequence length, cache length or density; the sparse suite shows its speedup over dense
instead of throughput), one colour per implementation in every plot, one marker per
configuration; and the speedup of fastattn over each peer, grouped by suite.

    python -m fastattn.bench.report DIR    # redraw DIR's plots from its results.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import zlib
from pathlib import Path

AXES = ("density", "seq_len")  # the first one a suite's rows carry is its x axis
TABLE_COLUMNS = ["suite", "config", "impl", "median_ms", "min_ms", "max_ms", "tflops", "gbps",
                 "pct_of_ceiling", "peak_mem_mb"]
MEASURED = set(TABLE_COLUMNS) | {"reps"}  # a row's other fields are its case's params


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


OURS = ("fastattn", "sparse")  # the impl name of fastattn's row in a suite's config


def speedups(rows: list[dict]) -> list[dict]:
    """peer median / fastattn median for every (suite, config) where both ran."""
    ours = {(r["suite"], r["config"]): r["median_ms"] for r in rows if r["impl"] in OURS}
    return [{"suite": r["suite"], "config": r["config"], "peer": r["impl"],
             "speedup": r["median_ms"] / ours[(r["suite"], r["config"])]}
            for r in rows if r["impl"] not in OURS and "ceiling" not in r["impl"]
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


# One colour per implementation, the same in every plot: fastattn's own in warm colours, torch's
# in blues and greys, other libraries in greens; no two names that can meet in one plot share one.
# Names not listed get a fixed colour from their hash.
COLOURS = {
    "fastattn": "#d62728", "sparse": "#d62728", "fastattn-flash": "#d62728", "flash": "#d62728",
    "fastattn-linear": "#ff7f0e", "linear": "#ff7f0e", "fastattn-nosync": "#ff9896",
    "fastattn-performer": "#e377c2", "performer": "#e377c2", "fastattn-linformer": "#8c564b",
    "kv-cache": "#9467bd", "recompute": "#7f7f7f",
    "torch-flash": "#1f77b4", "torch-sdpa": "#1f77b4", "torch-math": "#7f7f7f", "torch-efficient": "#17becf",
    "torch-cudnn": "#aec7e8", "dense": "#393b79", "sdpa-masked": "#8c6d31", "torch-layer": "#6b6ecf",
    "cumsum-linear": "#525252", "copy-ceiling": "#000000",
    "flex": "#2ca02c", "flash-attn": "#637939", "performer-pytorch": "#2ca02c", "linformer-layer": "#bcbd22",
    "fla-linear": "#98df8a", "padded-masked": "#8c6d31", "loop": "#393b79",
}
OTHER_COLOURS = ("#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#a55194")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LABELS = {"head_dim": "d", "block_size": "block", "features": "m", "width": "width", "batch": "batch"}


def colour(impl: str) -> str:
    return COLOURS.get(impl) or OTHER_COLOURS[zlib.crc32(impl.encode()) % len(OTHER_COLOURS)]


def _series_labels(rows: list[dict], axis: str) -> dict:
    """A row's configuration without the plot's axis: its params that vary within the plot,
    as a short label ("causal, gqa=4"). Returns id(row) -> label."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in MEASURED and k != axis]
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]

    def label(row):
        parts = []
        for k in varying:
            v = row.get(k)
            if isinstance(v, bool):
                parts.append(k if v else f"non-{k}")
            elif isinstance(v, str):
                parts.append(v)
            else:
                parts.append(f"{LABELS.get(k, k)}={v:g}" if isinstance(v, float) else f"{LABELS.get(k, k)}={v}")
        return ", ".join(parts)
    return {id(r): label(r) for r in rows}


def _tokens(v, _pos=None) -> str:
    return f"{v / 1024:g}k" if v >= 1024 else f"{v:g}"


def _number(v, _pos=None) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:g}"


def _percent(v, _pos=None) -> str:
    return f"{100 * v:g}%"


def _log_axis(axis, formatter, limits, base=10):
    """Major ticks labelled as plain numbers: powers of two, or 1, 2, 5 x 10^k (every integer
    multiple where the axis spans less than a decade); no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = limits
    subs = (1.0,) if base == 2 else (1.0, 2.0, 5.0) if hi >= 10 * lo else tuple(range(1, 10))
    axis.set_major_locator(LogLocator(base=base, subs=subs))
    axis.set_major_formatter(FuncFormatter(formatter))
    axis.set_minor_formatter(NullFormatter())


def _suite_figure(plt, suite: str, sub: list[dict], axis: str, device: str):
    """Three panels against ``axis``; for the sparse suite the first is the speedup over dense."""
    from matplotlib.lines import Line2D

    dense = {r["config"]: r["median_ms"] for r in sub if r["impl"] == "dense"}
    vs_dense = suite.startswith("sparse") and bool(dense)
    flop_bound = any(not math.isnan(r["tflops"]) for r in sub)
    if vs_dense:
        first = ("speedup over dense (dense time / time)", lambda r: dense.get(r["config"], math.nan) / r["median_ms"])
    else:
        first = ("TFLOP/s" if flop_bound else "GB/s", lambda r: r["tflops"] if flop_bound else r["gbps"])
    panels = [first, ("median time (ms)", lambda r: r["median_ms"]), ("peak memory (MB)", lambda r: r["peak_mem_mb"])]
    labels = _series_labels(sub, axis)
    series = sorted(set(labels.values()))
    marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(series)}
    impls = list(dict.fromkeys(r["impl"] for r in sub))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for impl in impls:
        for s in series:
            pts = sorted(((r[axis], r) for r in sub if r["impl"] == impl and labels[id(r)] == s), key=lambda p: p[0])
            if not pts:
                continue
            style = dict(color=colour(impl), marker=marker[s], linestyle="--" if "ceiling" in impl else "-",
                         zorder=3 if impl in OURS else 2)  # fastattn's line on top where lines meet
            for ax, (_, value) in zip(axes, panels):
                ax.plot([x for x, _ in pts], [value(r) for _, r in pts], **style)
    xlabel = {"seq_len": "cache length (tokens)" if suite == "decode" else "sequence length (tokens)",
              "density": "fraction of blocks kept"}[axis]
    base = 2 if axis == "seq_len" else 10
    for ax, (ylabel, _) in zip(axes, panels):
        ax.set_xscale("log", base=base)
        _log_axis(ax.xaxis, _tokens if axis == "seq_len" else _percent, ax.get_xlim(), base=base)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("log")
        _log_axis(ax.yaxis, _number, ax.get_ylim())
    axes[2].set_ylim(bottom=0)
    fig.suptitle(f"{suite} ({device})")
    impl_handles = [Line2D([], [], color=colour(i), linewidth=3, label=i) for i in impls]
    series_handles = [Line2D([], [], color="black", marker=marker[s], linestyle="", label=s) for s in series]
    fig.tight_layout()
    fig.legend(handles=impl_handles, title="implementation (colour)", loc="upper left",
               bbox_to_anchor=(1.0, 0.95), fontsize=8)
    if series != [""]:
        fig.legend(handles=series_handles, title="configuration (marker)", loc="lower left",
                   bbox_to_anchor=(1.0, 0.05), fontsize=8)
    return fig


def _speedup_figure(plt, ups: list[dict], device: str):
    """Horizontal bars, one group per suite (in run order), each sorted fastest first."""
    from matplotlib.lines import Line2D

    groups = {}
    for u in ups:
        groups.setdefault(u["suite"], []).append(u)
    ys, labels, bars, headers, y = [], [], [], [], 0
    for suite, group in groups.items():
        headers.append((y, suite))
        y += 1
        for u in sorted(group, key=lambda u: -u["speedup"]):
            ys.append(y)
            labels.append(f"{u['config']}  vs {u['peer']}")
            bars.append(u)
            y += 1
        y += 0.5
    fig, ax = plt.subplots(figsize=(10, 0.24 * y + 1.6))
    ax.barh(ys, [u["speedup"] for u in bars], color=[colour(u["peer"]) for u in bars], height=0.8)
    for yy, u in zip(ys, bars):
        ax.text(u["speedup"], yy, f" {u['speedup']:.2g}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(ys + [h for h, _ in headers], labels + [s for _, s in headers], fontsize=7)
    for tick in ax.get_yticklabels()[len(ys):]:
        tick.set_fontweight("bold")
        tick.set_fontsize(9)
    for h, _ in headers[1:]:
        ax.axhline(h - 0.75, color="grey", linewidth=0.5)
    ax.set_ylim(y - 0.5, -1)
    ax.set_xscale("log")
    ax.set_xlim(right=ax.get_xlim()[1] * 1.3)  # room for the value labels
    _log_axis(ax.xaxis, _number, ax.get_xlim())
    ax.set(xlabel="speedup of fastattn (peer time / fastattn time; > 1: fastattn is faster)",
           title=f"fastattn vs peers ({device})")
    ax.grid(True, axis="x", which="major", alpha=0.3)
    peers = list(dict.fromkeys(u["peer"] for u in bars))
    ax.legend(handles=[Line2D([], [], color=colour(p), linewidth=6, label=p) for p in peers], title="peer",
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    return fig


def plots(rows: list[dict], out: Path, environment: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastattn bench: matplotlib is not installed, so no plots (pip install matplotlib)")
        return []
    device = environment.get("gpu") or environment.get("device", "")
    figures = {}
    for suite in dict.fromkeys(r["suite"] for r in rows):
        sub = [r for r in rows if r["suite"] == suite]
        axis = next((a for a in AXES if all(a in r for r in sub)), None)
        if axis is not None:
            figures[f"{suite}.png"] = _suite_figure(plt, suite, sub, axis, device)
    ups = speedups(rows)
    if ups:
        figures["speedup.png"] = _speedup_figure(plt, ups, device)
    written = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Redraw the plots of a fastattn bench run from its results.json")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    run = json.loads((args.folder / "results.json").read_text())
    for path in plots(run["results"], args.folder, run["environment"]):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
