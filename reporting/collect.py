"""Read finished results folders (`summary.json`) into comparable rows.

A row is one run: its label (the editor's name, unless given), the settings that tell runs apart
(backbone, protocol, mode, sequence length, data file), the six scores and their generation twins,
portability per hop, and the case counts. A lifelong run gives one row per checkpoint K (and its
scores after each gap on the last). Folders are found by their `summary.json`, so a parent
folder (`results/demo/llava`) stands for every run below it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.case import PROBE_KINDS


class ReportInputError(ValueError):
    """A path given to the report holds no readable run."""


@dataclass
class RunRow:
    """One finished run, as the report sees it."""

    label: str
    folder: Path
    scores: dict[str, float | None]
    generation: dict[str, float | None]
    port_per_hop: dict[str, float | None]
    settings: dict[str, Any] = field(default_factory=dict)
    n_cases: int = 0
    n_skipped: int = 0
    #: A lifelong run's scores after each gap g (`summary.json`'s `lifelong.gaps`), on its K = N row.
    gaps: dict[str, dict[str, Any]] = field(default_factory=dict)


def find_summaries(paths: list[str | Path]) -> list[Path]:
    """Every `summary.json` at or below the given paths, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == "summary.json":
            found.append(path)
        elif path.is_dir():
            below = sorted(path.rglob("summary.json"))
            if not below:
                raise ReportInputError(
                    f"{path}: no summary.json at or below this folder (is the run finished?)"
                )
            found += below
        else:
            raise ReportInputError(f"{path}: neither a results folder nor a summary.json")
    return list(dict.fromkeys(found))


def read_row(summary_path: Path, label: str | None = None) -> RunRow:
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportInputError(f"{summary_path}: not a readable summary.json ({exc})") from exc
    if not isinstance(summary, dict) or "rel" not in summary:
        raise ReportInputError(f"{summary_path}: not a summary.json written by edit.py (no 'rel' field)")
    editor = summary.get("editor") or {}
    datasets = (summary.get("data") or {}).get("datasets") or [{}]
    config = summary.get("config") or {}
    settings = {
        "backbone": (summary.get("backbone") or {}).get("model_class", ""),
        "protocol": summary.get("protocol", ""),
        "mode": summary.get("mode", ""),
        "k": (config.get("data") or {}).get("batch_size") if summary.get("mode") == "sequential" else 1,
        "data": Path(str(datasets[0].get("file", ""))).name,
    }
    return RunRow(
        label=label or str(editor.get("name") or summary_path.parent.name),
        folder=summary_path.parent,
        scores={k: summary.get(k) for k in PROBE_KINDS},
        generation={k: (summary.get("generation") or {}).get(k) for k in PROBE_KINDS},
        port_per_hop=dict(summary.get("port_per_hop") or {}),
        settings=settings,
        n_cases=int(summary.get("n_cases") or 0),
        n_skipped=int(summary.get("n_skipped") or 0),
    )


def lifelong_rows(row: RunRow, summary_path: Path) -> list[RunRow]:
    """A lifelong run as one row per checkpoint K (labelled `method (K=k)`); another run as itself.

    The scores against K of a lifelong run then go into the same table and `scores_vs_k` plot as
    sequential runs of several K. The K = N row (the run's headline) carries the gap scores.
    """
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    block = summary.get("lifelong") if summary.get("mode") == "lifelong" else None
    if not isinstance(block, dict):
        return [row]
    out = []
    for k, scores in sorted(block.get("checkpoints", {}).items(), key=lambda item: int(item[0])):
        out.append(
            RunRow(
                label=f"{row.label} (K={k})",
                folder=row.folder,
                scores={kind: scores.get(kind) for kind in PROBE_KINDS},
                generation={kind: (scores.get("generation") or {}).get(kind) for kind in PROBE_KINDS},
                port_per_hop=dict(scores.get("port_per_hop") or {}),
                settings={**row.settings, "k": int(k)},
                n_cases=int(scores.get("n_cases") or 0),
                n_skipped=row.n_skipped,
                gaps=dict(block.get("gaps") or {}) if int(k) == int(block.get("length") or -1) else {},
            )
        )
    return out or [row]


def collect(paths: list[str | Path]) -> list[RunRow]:
    """Rows of every run at or below `paths`; labels made unique by the folder name where they clash."""
    rows = [r for p in find_summaries(paths) for r in lifelong_rows(read_row(p), p)]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    for row in rows:
        if counts[row.label] > 1:
            row.label = f"{row.label} ({row.folder.name})"
    return rows
