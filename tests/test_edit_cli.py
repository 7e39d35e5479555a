"""End to end: `edit.py test` on the shipped sample data, every method config, DDP and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edit

ROOT = Path(__file__).resolve().parent.parent
METHOD_CONFIGS = ["ft_llm", "ft_vis", "ike"]
SCORES = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "port")


def run_edit(tmp_path: Path, *extra: str, config: str = "ft_llm") -> dict:
    results = tmp_path / "results"
    edit.main(
        [
            "test",
            "--config",
            str(ROOT / "configs" / "edit" / f"{config}.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--results_dir",
            str(results),
            *extra,
        ]
    )
    return json.loads((results / "summary.json").read_text())


def case_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "results" / "cases.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_every_method_runs_end_to_end(tmp_path, monkeypatch, config):
    monkeypatch.chdir(ROOT)
    summary = run_edit(tmp_path, "--data.limit", "4", config=config)
    for key in SCORES:
        assert key in summary and key in summary["generation"]
    assert summary["rel"] is not None and 0 <= summary["rel"] <= 100
    assert summary["protocol"] == "strict"
    assert summary["n_cases"] == 4
    assert summary["n_skipped"] == 0
    assert summary["config"]["model"]["editor"]["class_path"].startswith("editors.")
    lines = case_lines(tmp_path)
    assert [r["index"] for r in lines] == sorted(r["index"] for r in lines)  # dataset order
    assert len({r["case_id"] for r in lines}) == 4
    assert all("rel" in r["scores"] and "generated" in r["predictions"]["rel"][0] for r in lines)


def test_sequential_and_mmedit_protocol(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    summary = run_edit(
        tmp_path,
        "--config",
        str(ROOT / "configs" / "edit" / "sequential_k3.yaml"),
        "--model.protocol",
        "mmedit_trainer",
        "--data.limit",
        "6",
    )
    assert summary["mode"] == "sequential" and summary["protocol"] == "mmedit_trainer"
    assert summary["n_cases"] == 6


def test_rerun_resumes_without_recomputing(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    first = run_edit(tmp_path, "--data.limit", "4")
    rows = first["generated_rows_rank0"]
    assert set(rows) == {"read_off_teacher_forced", "decoded"} and sum(rows.values()) > 0
    lines_before = (tmp_path / "results" / "cases.jsonl").read_bytes()
    # Drop the last case and tear the line before it: a run killed mid-write looks like this.
    kept = lines_before.splitlines(keepends=True)[:-1]
    kept[-1] = kept[-1][:10]
    (tmp_path / "results" / "cases.jsonl").write_bytes(b"".join(kept))
    second = run_edit(tmp_path, "--data.limit", "4")
    assert (tmp_path / "results" / "cases.jsonl").read_bytes() == lines_before
    assert {k: second[k] for k in SCORES} == {k: first[k] for k in SCORES}
    assert second["n_resumed_rank0"] == 2


def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    summaries, ids = [], []
    for devices in ("1", "2"):
        out = tmp_path / f"d{devices}"
        cmd = [
            sys.executable,
            str(ROOT / "edit.py"),
            "test",
            "--config",
            str(ROOT / "configs" / "edit" / "ft_llm.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.devices",
            devices,
            "--trainer.strategy",
            "ddp" if devices == "2" else "auto",
            "--data.limit",
            "5",
            "--data.batch_size",
            "2",
            "--results_dir",
            str(out),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries.append(json.loads((out / "summary.json").read_text()))
        ids.append([json.loads(line)["case_id"] for line in (out / "cases.jsonl").read_text().splitlines()])
    one, two = summaries
    assert two["world_size"] == 2
    for key in SCORES:
        assert one[key] == two[key], key
    assert one["generation"] == two["generation"]
    assert one["port_per_hop"] == two["port_per_hop"]
    assert ids[0] == ids[1] and len(ids[0]) == len(set(ids[0])) == 5
