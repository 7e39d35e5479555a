"""The results table printed at the end of a run (`ResultsTable`), and by the demo with one row per method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callbacks.summary import build_summary
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


class ResultsTable(Callback):
    """Print the run's results table on rank 0 when `edit.py test` ends.

    Runs after `ResultsWriter` (when there is one), so it prints the summary that was saved.
    """

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run = pl_module.run
        if run.summary is None:
            run.summary = build_summary(trainer, pl_module)
        print(format_table([(pl_module.editor.name, run.summary)]))
