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


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_unreadable_image_is_one_line_with_or_without_workers(tmp_path, monkeypatch, capsys, workers):
    monkeypatch.chdir(ROOT)
    images = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", images)
    record = json.loads((SAMPLE / "mmedit" / "vqa_eval.json").read_text())[0]
    damaged = images / record["image"]
    damaged.write_bytes(damaged.read_bytes()[:40])  # a truncated file: its header reads, its pixels do not
    args = ["--data.image_root", str(images), "--data.limit", "2", "--data.num_workers", workers]
    line = refused(capsys, tmp_path / "results", *args)
    assert str(damaged) in line and "record 0" in line, line


@pytest.mark.parametrize("where", ["alt", "id"])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_text_that_cannot_be_encoded_is_a_bad_field(tmp_path, monkeypatch, capsys, where, policy):
    monkeypatch.chdir(ROOT)
    records = json.loads((SAMPLE / "mmedit" / "vqa_eval.json").read_text())[:2]
    records[1][where] = "Rome \ud800"
    data = tmp_path / "surrogate.json"
    data.write_text(json.dumps(records))  # ASCII JSON: the lone surrogate is written as \\ud800
    args = ["--data.annotation_file", str(data), "--data.on_bad_record", policy]
    if policy == "error":
        line = refused(capsys, tmp_path / "results", *args)
        assert "record 1" in line and f"field '{where}'" in line and "\\ud800" in line, line
    else:
        summary = run(tmp_path / "results", *args)
        assert summary["n_cases"] == 1 and summary["n_skipped"] == 1
        assert summary["skipped"][0]["field"] == where


def test_a_huge_prompt_is_refused_before_tokenising(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    records = json.loads((SAMPLE / "mmedit" / "vqa_eval.json").read_text())[:2]
    records[0]["src"] = "why " * 1_500_000  # 6 MB; tokenising it whole would take tens of seconds
    data = tmp_path / "huge.json"
    data.write_text(json.dumps(records))
    line = refused(capsys, tmp_path / "results", "--data.annotation_file", str(data))
    assert "characters long" in line and "record 0" in line, line


def test_only_image_formats_are_opened(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    images = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", images)
    record = json.loads((SAMPLE / "mmedit" / "vqa_eval.json").read_text())[0]
    # An EPS file under an image's name: Pillow's EPS plugin would hand it to Ghostscript.
    (images / record["image"]).write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    line = refused(capsys, tmp_path / "results", "--data.image_root", str(images), "--data.limit", "1")
    assert "not an image in one of the formats this lab opens" in line, line


def test_mmedit_trainer_locality_compares_only_positions_whose_tokens_line_up():
    import torch

    from backbones.batching import TeacherForced
    from lightning_modules.case_scoring import _aligned

    def out(ids: list[int]) -> TeacherForced:
        topk = torch.tensor(ids).unsqueeze(-1).repeat(1, 3)  # stand-in top-3 ids per position
        return TeacherForced(torch.tensor([0]), torch.tensor([0]), topk, torch.tensor(ids))

    # An in-context row: context tokens 7 7 7, then a head (1) that the plain row has as (2), then the
    # question and answer (5 6 8 9) that both rows share token for token.
    post, pre = _aligned(out([7, 7, 7, 1, 5, 6, 8, 9]), out([2, 5, 6, 8, 9]))
    assert post.ids.tolist() == pre.ids.tolist() == [5, 6, 8, 9]
    assert post.all_topk.shape == pre.all_topk.shape == (4, 3)
    same = out([3, 4, 5])
    assert _aligned(same, out([3, 4, 5]))[0] is same  # rows of equal tokens keep every position


def test_ike_under_mmedit_trainer_scores_aligned_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    summary = run(
        tmp_path / "results", "--data.limit", "3", "--model.protocol", "mmedit_trainer", method="ike"
    )
    assert summary["protocol"] == "mmedit_trainer"
    assert 0 <= summary["t_loc"] <= 100 and 0 <= summary["i_loc"] <= 100


def test_a_setting_only_the_config_holds_is_part_of_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    run(results, "--data.limit", "2")
    line = refused(capsys, results, "--data.limit", "2", "--model.backbone.init_args.max_new_tokens", "3")
    assert "config.model.backbone.init_args.max_new_tokens" in line, line
    # Output and run-time settings are not: another progress bar setting still resumes.
    summary = run(results, "--data.limit", "2", "--trainer.enable_progress_bar", "true")
    assert summary["n_resumed_rank0"] == 2
