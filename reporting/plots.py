"""Plots of finished runs, written as PNG: what people would rather look at than read.

- `radar`: the six scores of each run on one radar chart (a method's shape at a glance);
- `bars`: the six scores side by side across runs;
- `port_per_hop`: portability against the number of hops, a line per run;
- `scores_vs_k`: each score against the sequence length K of sequential editing, or against the
  checkpoints K of a lifelong run;
- `heatmap` and `line`: a sweep's metric over two settings (alpha x beta) or one (top_k).

Matplotlib with the Agg backend: no display needed, same bytes-level figure on every machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)

from core.case import PROBE_KINDS, SCORE_LABELS  # noqa: E402
from reporting.collect import RunRow  # noqa: E402

DPI = 110


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _save(fig: plt.Figure, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def radar(rows: Sequence[RunRow], path: Path) -> Path:
    """One polygon per run over Rel, T-Gen, I-Gen, T-Loc, I-Loc, Port (0-100)."""
    angles = [2 * math.pi * i / len(PROBE_KINDS) for i in range(len(PROBE_KINDS))]
    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(projection="polar")
    for row in rows:
        values = [0.0 if row.scores.get(k) is None else float(row.scores[k]) for k in PROBE_KINDS]
        ax.plot([*angles, angles[0]], [*values, values[0]], label=row.label, linewidth=1.6)
        ax.fill([*angles, angles[0]], [*values, values[0]], alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels([SCORE_LABELS[k] for k in PROBE_KINDS])
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    ax.set_title("six scores per method (%)", pad=18)
    return _save(fig, path)


def bars(rows: Sequence[RunRow], path: Path) -> Path:
    """Grouped bars: a group per score, a bar per run."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(rows), 1)
    for j, row in enumerate(rows):
        xs = [i + j * width - 0.4 + width / 2 for i in range(len(PROBE_KINDS))]
        ax.bar(xs, [_value(row.scores.get(k)) for k in PROBE_KINDS], width, label=row.label)
    ax.set_xticks(range(len(PROBE_KINDS)))
    ax.set_xticklabels([SCORE_LABELS[k] for k in PROBE_KINDS])
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.legend(fontsize=8, ncol=min(len(rows), 4))
    ax.set_title("scores across methods")
    return _save(fig, path)


def port_per_hop(rows: Sequence[RunRow], path: Path) -> Path:
    """Portability against the hop count, one line per run (runs without per-hop probes are left out)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    seen: set[int] = set()
    for row in rows:
        hops = sorted((int(h), v) for h, v in row.port_per_hop.items() if v is not None)
        if hops:
            ax.plot([h for h, _ in hops], [v for _, v in hops], marker="o", label=row.label)
            seen.update(h for h, _ in hops)
    ax.set_xticks(sorted(seen))
    ax.set_xlabel("hops")
    ax.set_ylabel("Port (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("portability per hop")
    return _save(fig, path)


def scores_vs_k(rows: Sequence[RunRow], path: Path) -> Path:
    """Each score against K, one panel per score, one line per method (and per mode: a lifelong run's
    checkpoints and sequential runs of several K are different experiments, so different lines)."""
    by_method: dict[str, list[RunRow]] = defaultdict(list)
    for row in rows:
        lifelong = " (lifelong)" if row.settings.get("mode") == "lifelong" else ""
        by_method[row.label.split(" (")[0] + lifelong].append(row)
    ks = [int(r.settings.get("k") or 1) for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5), sharex=True)
    for ax, kind in zip(axes.flat, PROBE_KINDS, strict=True):
        for method, group in by_method.items():
            points = sorted((int(r.settings.get("k") or 1), _value(r.scores.get(kind))) for r in group)
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=method)
        ax.set_title(SCORE_LABELS[kind])
        ax.set_ylim(0, 105)
        ax.set_xlabel("K")
        if ks and max(ks) >= 100 * max(min(ks), 1):
            ax.set_xscale("log")  # K = 1 .. 1,000 of a lifelong run: equal room per decade
    # One legend under the panels: inside one, eight or more methods hide its lines.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), 4))
    fig.suptitle("scores against the number of sequential edits K")
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_rows = -(-len(labels) // ncol)
    return _save(fig, path, rect=(0, 0.04 * legend_rows + 0.02, 1, 1))


def heatmap(
    points: Sequence[dict[str, float]], x: str, y: str, metric: str, path: Path, title: str = ""
) -> Path:
    """A sweep's `metric` over settings `x` and `y` (the best over any other settings at each cell)."""
    xs = sorted({p[x] for p in points})
    ys = sorted({p[y] for p in points})
    grid = [[math.nan for _ in xs] for _ in ys]
    for p in points:
        i, j = ys.index(p[y]), xs.index(p[x])
        value = _value(p.get(metric))
        if math.isnan(grid[i][j]) or value > grid[i][j]:
            grid[i][j] = value
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 1.0 * len(ys) + 1.8))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([f"{v:g}" for v in ys])
    ax.set_xlabel(x.rsplit(".", 1)[-1])
    ax.set_ylabel(y.rsplit(".", 1)[-1])
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(title or f"{metric} over {x.rsplit('.', 1)[-1]} x {y.rsplit('.', 1)[-1]}")
    return _save(fig, path)


def line(points: Sequence[dict[str, float]], x: str, metric: str, path: Path, title: str = "") -> Path:
    """A sweep's `metric` against one setting (the best over any other settings at each value)."""
    best: dict[float, float] = {}
    for p in points:
        value = _value(p.get(metric))
        if not math.isnan(value):
            best[p[x]] = max(best.get(p[x], value), value)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    keys = sorted(best)
    ax.plot(keys, [best[k] for k in keys], marker="o")
    ax.set_xlabel(x.rsplit(".", 1)[-1])
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against {x.rsplit('.', 1)[-1]}")
    return _save(fig, path)
