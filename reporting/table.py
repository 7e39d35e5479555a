"""The comparison table of a report: runs as rows, the six scores (and their generation twins) as columns.

Written as Markdown (for a README or a paper draft, like VLKEB's Table 2) and as CSV (for a
spreadsheet), from the same rows so the two never disagree; lifelong runs also get the gap table.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from core.case import PROBE_KINDS, SCORE_LABELS
from reporting.collect import RunRow

SETTING_COLUMNS = ("backbone", "protocol", "mode", "k", "data")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def header(generation: bool = True) -> list[str]:
    cols = ["method", *SETTING_COLUMNS, *(SCORE_LABELS[k] for k in PROBE_KINDS)]
    if generation:
        cols += [f"{SCORE_LABELS[k]} EM" for k in PROBE_KINDS]
    return [*cols, "cases", "skipped"]


def cells(row: RunRow, generation: bool = True) -> list[str]:
    out = [row.label, *(str(row.settings.get(c, "")) for c in SETTING_COLUMNS)]
    out += [_cell(row.scores.get(k)) for k in PROBE_KINDS]
    if generation:
        out += [_cell(row.generation.get(k)) for k in PROBE_KINDS]
    return [*out, str(row.n_cases), str(row.n_skipped)]


def markdown(rows: Sequence[RunRow], generation: bool = True) -> str:
    head = header(generation)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells(r, generation)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[RunRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header(True))
    for row in rows:
        writer.writerow(cells(row, True))
    return buffer.getvalue()


def gap_markdown(rows: Sequence[RunRow]) -> str:
    """VLKEB's gap table: per lifelong run and gap g, the six scores of each case g edits after its own.

    `at end` counts the cases with fewer than g edits after them, scored at the end of the sequence.
    """
    head = ["method", "gap", *(SCORE_LABELS[k] for k in PROBE_KINDS), "cases", "at end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        for gap, scores in sorted(row.gaps.items(), key=lambda item: int(item[0])):
            cells = [row.label.split(" (K=")[0], gap, *(_cell(scores.get(k)) for k in PROBE_KINDS)]
            cells += [str(scores.get("n_cases", "")), str(scores.get("n_scored_at_end", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
