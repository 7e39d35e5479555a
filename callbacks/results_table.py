"""The results table printed at the end of a run (and by the demo, one row per method)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.case import PROBE_KINDS, SCORE_LABELS

COLUMNS = tuple((SCORE_LABELS[kind], kind) for kind in PROBE_KINDS)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table: methods as rows; teacher-forced scores, then generation twins (EM)."""
    header = ["method", *[c for c, _ in COLUMNS], *[f"{c} EM" for c, _ in COLUMNS], "cases"]
    body = []
    for name, summary in rows:
        gen = summary.get("generation", {})
        body.append(
            [
                name,
                *[_cell(summary.get(k)) for _, k in COLUMNS],
                *[_cell(gen.get(k)) for _, k in COLUMNS],
                str(summary.get("n_cases", "")),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    protocol = rows[0][1].get("protocol", "") if rows else ""
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"(scores in %, teacher-forced then generation exact match; protocol: {protocol})")
    return "\n".join(lines)
