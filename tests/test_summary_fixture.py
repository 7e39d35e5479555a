"""Reshaping the code must not change a result: sample-data runs and the world demo equal their fixtures.

Both fixtures were written by the code before the trained-editor architecture landed:
`tests/fixtures/summaries.json` (by `python -m tests.summary_fixture --write`) holds every summary's
result fields and every case line (scores, teacher-forced and generated predictions) of nine runs:
three methods, sequential, cross-task, the MMEdit-trainer protocol, VLKEB multi-hop and a BLIP-2
backbone. `tests/fixtures/world_demo.json` holds `python demo.py`'s three summaries and the SHA-256
of each `cases.jsonl`.
"""

from __future__ import annotations

import json

import pytest
from summary_fixture import FIXTURE, ROOT, RUNS, run

EXPECTED = json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_results_equal_the_fixture(tmp_path, monkeypatch, name):
    monkeypatch.chdir(ROOT)
    found = run(name, tmp_path)
    expected = EXPECTED[name]
    assert found["summary"] == expected["summary"]
    assert len(found["cases"]) == len(expected["cases"])
    for got, want in zip(found["cases"], expected["cases"], strict=True):
        assert got == want, f"case {want['case_id']} of run {name} changed"


def test_world_demo_equals_its_fixture(tmp_path, monkeypatch):
    """`python demo.py` on the world backbone: every method's summary and its cases.jsonl, byte for byte."""
    import hashlib

    import demo

    monkeypatch.chdir(ROOT)
    expected = json.loads((FIXTURE.parent / "world_demo.json").read_text(encoding="utf-8"))
    # The fixture's methods only: the whole demo (13 methods, ~5 minutes) is README command 1's job.
    demo.main(["--out", str(tmp_path), "--fresh", "--methods", *expected])
    for method, want in expected.items():
        folder = tmp_path / "llava" / method
        summary = json.loads((folder / "summary.json").read_text())
        assert {k: summary.get(k) for k in want["summary"]} == want["summary"], method
        assert hashlib.sha256((folder / "cases.jsonl").read_bytes()).hexdigest() == want["cases_sha256"], (
            method
        )
