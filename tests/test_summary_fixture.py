"""Reshaping the code must not change a result: the sample-data runs equal their committed fixture.

The fixture (`tests/fixtures/summaries.json`) was written by `python -m tests.summary_fixture --write`
before the trained-editor architecture landed; it holds every summary's result fields and every case
line (scores, teacher-forced and generated predictions) of nine runs: three methods, sequential,
cross-task, the MMEdit-trainer protocol, VLKEB multi-hop and a BLIP-2 backbone.
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
