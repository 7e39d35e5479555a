"""The offline sweep runner: every point of a W&B sweep file through `edit.py test`, then the best on evaluation.

Each point runs in this process with its own results folder (`OUT/points/<key>/`), named by a hash
of its settings: a point whose `summary.json` exists is read back, not rerun, and a point killed
halfway resumes from its `cases.jsonl`. The best point by the file's metric (on the split the sweep
command names, the validation split in the shipped files) is then run once more with `--evaluate`'s
config stacked on top (the evaluation split) into `OUT/best/`. Every point's scores go into one table
(`OUT/points.md`, `OUT/points.csv`), and the metric into a heatmap (two swept settings or more) and a
line (per setting).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

import edit
from core.case import PROBE_KINDS, SCORE_LABELS
from reporting import plots
from sweeps.spec import Point, SweepSpec

#: Every point runs without a W&B run of its own and without Lightning's progress bar; the sweep
#: shows its own progress over the points.
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


@dataclass
class PointResult:
    point: Point
    summary: dict[str, Any]
    reused: bool

    def metric(self, name: str) -> float:
        value = self.summary.get(name.removeprefix("test/"))
        return math.nan if value is None else float(value)


def run_point(spec: SweepSpec, point: Point, folder: Path, extra: list[str] = ()) -> PointResult:
    """The point's summary: read back when the point already finished, else computed (resuming)."""
    summary_file = folder / "summary.json"
    if summary_file.is_file() and (folder / "point.json").is_file():
        return PointResult(point, json.loads(summary_file.read_text()), reused=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "point.json").write_text(json.dumps(point.params, indent=1, sort_keys=True, default=str) + "\n")
    summary_file.unlink(missing_ok=True)  # a summary without point.json is not this point's
    args = ["test", *spec.base_args, *extra, *point.args(), *QUIET, "--results_dir", str(folder)]
    with warnings.catch_warnings():
        # Lightning warns when a CLI gets args while sys.argv holds others: here they are the sweep's own.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        edit.main(args)
    return PointResult(point, json.loads(summary_file.read_text()), reused=False)


def best_of(spec: SweepSpec, results: list[PointResult]) -> PointResult:
    scored = [r for r in results if not math.isnan(r.metric(spec.metric))]
    if not scored:
        raise ValueError(f"{spec.path}: no point produced {spec.metric}")
    sign = 1.0 if spec.goal == "maximize" else -1.0
    # Ties go to the earlier point, so the choice does not depend on float noise in the order.
    return max(scored, key=lambda r: (sign * r.metric(spec.metric), -results.index(r)))


def points_table(spec: SweepSpec, results: list[PointResult]) -> tuple[str, str]:
    """The points as Markdown and CSV: settings, the metric, the six scores, cases."""
    names = sorted(spec.parameters)
    head = [
        *(n.rsplit(".", 1)[-1] for n in names),
        spec.metric,
        *(SCORE_LABELS[k] for k in PROBE_KINDS),
        "cases",
    ]
    rows = []
    for r in results:
        cells = [str(r.point.params[n]) for n in names]
        cells.append(_fmt(r.metric(spec.metric)))
        cells += [_fmt(r.summary.get(k)) for k in PROBE_KINDS]
        rows.append([*cells, str(r.summary.get("n_cases", ""))])
    md = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([head, *rows])
    return "\n".join(md) + "\n", buffer.getvalue()


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.1f}"


def sweep_plots(spec: SweepSpec, results: list[PointResult], out: Path) -> list[Path]:
    """A heatmap of the metric over the first two numeric settings, and a line per numeric setting."""
    numeric = [
        n for n in sorted(spec.parameters)
        if all(isinstance(r.point.params[n], int | float) and not isinstance(r.point.params[n], bool) for r in results)
    ]  # fmt: skip
    points = [
        {**{n: float(r.point.params[n]) for n in numeric}, spec.metric: r.metric(spec.metric)}
        for r in results
    ]
    written = []
    if len(numeric) >= 2:
        written.append(plots.heatmap(points, numeric[0], numeric[1], spec.metric, out / "heatmap.png"))
    for name in numeric:
        written.append(plots.line(points, name, spec.metric, out / f"line_{name.rsplit('.', 1)[-1]}.png"))
    return written


def run_sweep(
    spec: SweepSpec, out: Path, evaluate: list[str], count: int | None = None, seed: int = 0
) -> tuple[PointResult, PointResult | None, list[Path]]:
    """Run (or read back) every point, pick the best, evaluate it; returns (best, its evaluation, files)."""
    points = spec.points(count, seed)
    results = [
        run_point(spec, point, out / "points" / point.key)
        for point in tqdm(points, desc=f"sweep {spec.path.name}", unit="point")
    ]
    best = best_of(spec, results)
    md, csv_text = points_table(spec, results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "points.md").write_text(md, encoding="utf-8")
    (out / "points.csv").write_text(csv_text, encoding="utf-8")
    written = [out / "points.md", out / "points.csv", *sweep_plots(spec, results, out)]
    evaluated = None
    if evaluate:
        extra = [a for config in evaluate for a in ("--config", config)]
        evaluated = run_point(spec, best.point, out / "best", extra)
    (out / "best.json").write_text(
        json.dumps(
            {
                "metric": spec.metric,
                "goal": spec.goal,
                "params": best.point.params,
                "tuned": {k: best.summary.get(k) for k in (*PROBE_KINDS, "avg")},
                "evaluation": {k: evaluated.summary.get(k) for k in (*PROBE_KINDS, "avg")}
                if evaluated
                else None,
                "points": len(results),
                "points_run_now": sum(not r.reused for r in results),
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    written.append(out / "best.json")
    return best, evaluated, written
