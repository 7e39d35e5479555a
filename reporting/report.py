"""`python report.py DIR [DIR ...] --out OUT`: one comparison table and the plots for finished runs.

Writes `OUT/table.md`, `OUT/table.csv`, `OUT/radar.png`, `OUT/bars.png`, `OUT/port_per_hop.png`
(when any run has per-hop portability), `OUT/scores_vs_k.png` (when runs of one method differ in
K, as a lifelong run's checkpoints do) and `OUT/gaps.md` (lifelong runs' scores after each gap),
and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reporting import plots
from reporting.collect import ReportInputError, RunRow, collect
from reporting.table import csv_text, gap_markdown, markdown


def write_report(rows: list[RunRow], out: Path) -> list[Path]:
    """The table and plots of `rows` in `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "table.md", out / "table.csv"]
    written[0].write_text(markdown(rows), encoding="utf-8")
    written[1].write_text(csv_text(rows), encoding="utf-8")
    written.append(plots.radar(rows, out / "radar.png"))
    written.append(plots.bars(rows, out / "bars.png"))
    if any(v is not None for r in rows for v in r.port_per_hop.values()):
        written.append(plots.port_per_hop(rows, out / "port_per_hop.png"))
    ks = {(r.label.split(" (")[0], r.settings.get("k")) for r in rows}
    if len(ks) > len({m for m, _ in ks}):
        written.append(plots.scores_vs_k(rows, out / "scores_vs_k.png"))
    if any(r.gaps for r in rows):
        (out / "gaps.md").write_text(gap_markdown(rows), encoding="utf-8")
        written.append(out / "gaps.md")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="results folders (or parents of several), or summary.json files"
    )
    parser.add_argument("--out", default="reports/latest", help="folder for the table and the plots")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.runs)
    except ReportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    written = write_report(rows, Path(args.out))
    print(markdown(rows))
    if any(r.gaps for r in rows):
        print(gap_markdown(rows))
    print("wrote " + ", ".join(str(p) for p in written))
    return written
