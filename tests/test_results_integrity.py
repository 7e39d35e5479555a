"""A rerun never mixes or deletes results, and every bad option or results file ends in one clear line.

Through the real entry point (`edit.main`), as a user would run it: another editor or edited data
into an existing results folder, a smaller rerun, a run with no cases, option values the classes
refuse, and a hand-damaged `cases.jsonl`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edit

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
EDIT = ROOT / "configs" / "edit"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
#: One FT step, no generation twins: the folder's behaviour is under test, not the scores.
FAST = ["--model.editor.init_args.steps", "1", "--model.generation", "false"]


def run(results: Path, *args: str, method: str = "ft_llm") -> dict:
    extra = FAST if method == "ft_llm" else ["--model.generation", "false"]
    edit.main(
        [
            "test",
            "--config",
            str(EDIT / f"{method}.yaml"),
            *QUIET,
            *extra,
            "--results_dir",
            str(results),
            *args,
        ]
    )
    return json.loads((results / "summary.json").read_text())


def refused(capsys, results: Path, *args: str, method: str = "ft_llm") -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(results, *args, method=method)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def case_ids(results: Path) -> list[str]:
    return [json.loads(line)["case_id"] for line in (results / "cases.jsonl").read_text().splitlines()]


def test_another_editor_into_the_folder_is_refused_then_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    run(results, "--data.limit", "3")
    before = (results / "cases.jsonl").read_bytes()
    line = refused(capsys, results, "--data.limit", "3", method="ike")
    assert "holds results of another run" in line and "editor.class" in line and "--overwrite" in line
    assert (results / "cases.jsonl").read_bytes() == before  # nothing was touched
    summary = run(results, "--data.limit", "3", "--overwrite", "true", method="ike")
    assert summary["editor"]["class"] == "IKE" and summary["n_resumed_rank0"] == 0
    lines = [json.loads(x) for x in (results / "cases.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and (results / "cases.jsonl").read_bytes() != before


def test_an_edited_annotation_file_is_noticed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "vqa.json"
    shutil.copy(SAMPLE / "mmedit" / "vqa_eval.json", data)
    results = tmp_path / "results"
    args = ["--data.annotation_file", str(data), "--data.limit", "2"]
    run(results, *args)
    records = json.loads(data.read_text())
    records[0]["alt"] = records[0]["alt"] + " (edited)"
    data.write_text(json.dumps(records))
    line = refused(capsys, results, *args)
    assert "datasets[0].sha256" in line


def test_a_smaller_rerun_keeps_every_computed_case(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    run(results, "--data.limit", "5")
    all_ids = case_ids(results)
    summary = run(results, "--data.limit", "2")
    assert summary["n_cases"] == 2 and summary["n_resumed_rank0"] == 2
    assert case_ids(results) == all_ids  # the subset first (it is the dataset's head), nothing lost
    summary = run(results, "--data.limit", "5")
    assert summary["n_cases"] == 5 and summary["n_resumed_rank0"] == 5


def test_a_run_with_no_cases_writes_its_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    run(results, "--data.limit", "2")
    summary = run(results, "--data.limit", "0")
    assert summary["n_cases"] == 0 and summary["rel"] is None
    assert "no case to edit" in capsys.readouterr().out
    assert len(case_ids(results)) == 2  # the earlier cases are kept


def test_a_file_whose_every_record_is_skipped_reports_the_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    records = json.loads((SAMPLE / "mmedit" / "vqa_eval.json").read_text())[:2]
    for record in records:
        del record["alt"]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    args = [
        "--data.annotation_file",
        str(data),
        "--data.format",
        "mmedit_vqa",
        "--data.on_bad_record",
        "skip",
    ]
    summary = run(tmp_path / "results", *args)
    assert summary["n_cases"] == 0 and summary["n_skipped"] == 2
    assert all("alt" in str(skip) for skip in summary["skipped"])


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--data.batch_size", "0", "batch_size must be >= 1"),
        ("--model.editor.init_args.steps", "-3", "steps must be >= 0"),
        ("--data.limit", "-1", "limit must be None or >= 0"),
        ("--data.format", "nope", "format must be one of"),
        ("--data.prompt_template", "no placeholder", "prompt_template must be a string with exactly one"),
        ("--data.num_workers", "-1", "num_workers must be >= 0"),
        ("--data.max_image_pixels", "0", "max_image_pixels must be positive"),
    ],
)
def test_option_values_the_classes_refuse_are_one_line(tmp_path, monkeypatch, capsys, option, value, says):
    monkeypatch.chdir(ROOT)
    line = refused(capsys, tmp_path / "results", option, value)
    assert says in line, line


@pytest.mark.parametrize(
    "damage, says",
    [
        ({"index": 0, "scores": {}}, "line 2 has no string 'case_id'"),
        ({"case_id": "x", "index": 0}, "line 2 has neither a 'scores' nor a 'skipped' object"),
        ([1, 2], "line 2 is a JSON list"),
    ],
)
def test_a_damaged_case_line_is_named_with_its_number(tmp_path, monkeypatch, capsys, damage, says):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    run(results, "--data.limit", "2")
    lines = (results / "cases.jsonl").read_text().splitlines()
    lines[1] = json.dumps(damage)
    (results / "cases.jsonl").write_text("\n".join(lines) + "\n")
    line = refused(capsys, results, "--data.limit", "2")
    assert str(results / "cases.jsonl") in line and says in line, line


def test_results_without_a_run_file_are_not_trusted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    run(results, "--data.limit", "2")
    (results / "run.json").unlink()
    line = refused(capsys, results, "--data.limit", "2")
    assert "without a run.json" in line
