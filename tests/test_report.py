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
