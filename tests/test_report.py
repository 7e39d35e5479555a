"""`report.py`: the comparison table (Markdown, CSV) and the plots of finished runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

import edit
from reporting.report import main

ROOT = Path(__file__).resolve().parent.parent
EDIT = ROOT / "configs" / "edit"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--model.generation", "false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for name, extra in {
        "ft_llm": ["--config", str(EDIT / "ft_llm.yaml"), "--model.editor.init_args.steps", "2"],
        "ike": ["--config", str(EDIT / "ike.yaml")],
        "ft_llm_k2": ["--config", str(EDIT / "ft_llm.yaml"), "--model.editor.init_args.steps", "2",
                      "--model.mode", "sequential", "--data.batch_size", "2"],
    }.items():  # fmt: skip
        edit.main(["test", *extra, *QUIET, "--data.limit", "4", "--results_dir", str(root / name)])
    return root


def test_report_writes_the_table_and_plots(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "report"
    written = main([str(runs), "--out", str(out)])
    names = {p.name for p in written}
    assert {"table.md", "table.csv", "radar.png", "bars.png", "scores_vs_k.png"} <= names
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert len(rows) == 3
    summary = json.loads((runs / "ike" / "summary.json").read_text())
    ike = next(r for r in rows if r["method"] == "ike")
    assert ike["Rel"] == f"{summary['rel']:.1f}" and ike["cases"] == "4"
    k2 = next(r for r in rows if r["mode"] == "sequential")
    assert k2["k"] == "2"
    for png in (p for p in written if p.suffix == ".png"):
        with Image.open(png) as image:
            assert image.width > 200 and image.height > 200
    assert "| ike |" in capsys.readouterr().out


def test_a_folder_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_lifelong_run_gives_a_row_per_checkpoint_and_the_gap_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "ft_llm_lifelong"
    lifelong = ["--config", str(EDIT / "lifelong.yaml"), "--model.lifelong.checkpoints", "[1, 2]"]
    edit.main(
        ["test", "--config", str(EDIT / "ft_llm.yaml"), *lifelong, "--model.lifelong.gaps", "[1, 3]", *QUIET]
        + ["--model.editor.init_args.steps", "2", "--data.limit", "4", "--results_dir", str(run)]
    )
    written = main([str(run), "--out", str(tmp_path / "report")])
    assert {"scores_vs_k.png", "gaps.md"} <= {p.name for p in written}
    rows = list(csv.DictReader((tmp_path / "report" / "table.csv").open()))
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["method"], r["k"], r["cases"]) for r in rows] == [
        ("ft_llm (K=1)", "1", "1"),
        ("ft_llm (K=2)", "2", "2"),
        ("ft_llm (K=4)", "4", "4"),
    ]
    assert rows[-1]["Rel"] == f"{summary['rel']:.1f}"  # the end of the sequence is the headline
    gaps = (tmp_path / "report" / "gaps.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[1] for line in gaps] == ["1", "3"]
    # Gap 3: only the first case has three edits after it; the other three are scored at the end.
    assert gaps[1].endswith("| 4 | 3 |")
    assert "| ft_llm | 3 |" in capsys.readouterr().out
