"""The offline sweep runner on a 2-point grid with a tiny backbone: points, best, evaluation, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sweep import main
from sweeps.spec import SweepSpecError, read_spec

ROOT = Path(__file__).resolve().parent.parent


def sweep_file(tmp_path: Path, **overrides) -> Path:
    spec = {
        "program": "edit.py",
        "method": "grid",
        "metric": {"name": "test/rel", "goal": "maximize"},
        "parameters": {"model.editor.init_args.steps": {"values": [0, 3]}, "data.limit": {"value": 3}},
        "command": ["${env}", "python", "${program}", "test", "--config", "configs/edit/ft_llm.yaml",
                    "--model.generation", "false", "${args}"],
    }  # fmt: skip
    spec.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_point_grid_runs_picks_evaluates_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    evaluate = tmp_path / "eval.yaml"
    evaluate.write_text(
        yaml.safe_dump({"data": {"annotation_file": "data/sample/mmedit/caption_eval_edit.json"}})
    )
    args = [str(sweep_file(tmp_path)), "--out", str(out), "--evaluate", str(evaluate)]
    main(args)
    best = json.loads((out / "best.json").read_text())
    assert best["points"] == 2 and best["points_run_now"] == 2
    tuned = {
        json.loads((p / "point.json").read_text())["model.editor.init_args.steps"]: json.loads(
            (p / "summary.json").read_text()
        )["rel"]
        for p in (out / "points").iterdir()
    }
    assert best["params"]["model.editor.init_args.steps"] == max(tuned, key=tuned.get)
    assert best["tuned"]["rel"] == tuned[best["params"]["model.editor.init_args.steps"]]
    evaluation = json.loads((out / "best" / "summary.json").read_text())
    assert evaluation["data"]["datasets"][0]["file"].endswith("caption_eval_edit.json")
    assert best["evaluation"]["rel"] == evaluation["rel"]
    table = (out / "points.md").read_text().splitlines()
    assert len(table) == 4 and "test/rel" in table[0]
    assert (out / "line_steps.png").is_file()
    assert "best point by test/rel" in capsys.readouterr().out
    main(args)  # a rerun of the same command reruns nothing
    assert json.loads((out / "best.json").read_text())["points_run_now"] == 0


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"method": "bayes"}, "needs W&B's server"),
        ({"metric": {"name": "rel"}}, "metric.name must name a score"),
        ({"parameters": {"x": {"distribution": "uniform"}}}, "parameters.x needs value"),
        ({"command": ["python", "edit.py", "test"]}, "command must be a list holding ${args}"),
    ],
)
def test_sweep_files_the_runner_cannot_run_are_named(tmp_path, overrides, says):
    with pytest.raises(SweepSpecError, match=None) as info:
        read_spec(sweep_file(tmp_path, **overrides))
    assert str(tmp_path / "sweep.yaml") in str(info.value) and says in str(info.value)


def test_shipped_sweep_files_parse():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        spec = read_spec(path)
        assert spec.points(), path
    assert len(read_spec(ROOT / "configs" / "sweeps" / "ft_llm.yaml").points()) == 27
