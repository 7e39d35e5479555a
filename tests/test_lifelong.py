"""Lifelong editing: `Editor.extend` against one `apply` call, the loop's schedule, restore, refusals.

Every method of the method matrix on the tiny LLaVA: a sequence added edit by edit must score what
one `apply` of the same cases scores (and, for weight editors, leave the very same weights), and a
lifelong run must give the model back bit for bit. The schedule test pins which case is scored
after how many edits; the run test checks that a score recorded at a checkpoint or gap is the score
of the model as it was then.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_method_matrix import IMAGES, SAMPLE, make_editor
from tiny_families import FAMILIES

from datamodules.edit_datamodule import EditDataModule
from lightning_modules.case_scoring import reference_outputs, score_cases
from lightning_modules.edit_cli import edit_trainer
from lightning_modules.edit_eval import EditEval
from lightning_modules.lifelong import (
    Event,
    LifelongSettings,
    LifelongSetupError,
    effective_checkpoints,
    schedule,
)

METHODS = [
    "ft_llm",
    "ft_vis",
    "ike",
    "ke",
    "mend",
    "serac",
    "tpatcher",
    "kn",
    "calinet",
    "rome",
    "memit",
    "alphaedit",
]


@pytest.fixture(scope="module")
def vlm():
    return FAMILIES["llava"]()


@pytest.fixture(scope="module")
def cases():
    data = EditDataModule(str(SAMPLE / "mmedit" / "vqa_eval.json"), IMAGES, limit=3, batch_size=3)
    data.setup("test")
    return [case for batch in data.test_dataloader() for case in batch]


def _state(vlm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vlm.model.state_dict().items()}


def _edited_and_scored(vlm, editor, cases, reference, incremental: bool):
    """Scores (and weights) of the K cases edited as one sequence, then the model restored."""
    if incremental:
        handle = editor.apply(vlm, cases[:1])
        for case in cases[1:]:
            handle = editor.extend(vlm, handle, [case])
    else:
        handle = editor.apply(vlm, cases)
    try:
        weights = _state(vlm)
        records = score_cases(vlm, [(c, handle) for c in cases], reference, "strict", True)
    finally:
        handle.restore()
    return [(r["scores"], r["predictions"]) for r in records], weights


@pytest.mark.parametrize("method", METHODS)
def test_incremental_equals_one_apply(vlm, cases, method):
    before = _state(vlm)
    editor = make_editor(method)
    editor.setup(vlm)
    reference = reference_outputs(vlm, cases, "strict", True)
    one_call, weights_one = _edited_and_scored(vlm, editor, cases, reference, incremental=False)
    assert all(torch.equal(before[k], v) for k, v in vlm.model.state_dict().items())
    stepwise, weights_inc = _edited_and_scored(vlm, editor, cases, reference, incremental=True)
    # Bit for bit: the same weights while edited, the same scores and predictions.
    assert [k for k in weights_one if not torch.equal(weights_one[k], weights_inc[k])] == []
    assert stepwise == one_call
    assert [k for k, v in vlm.model.state_dict().items() if not torch.equal(before[k], v)] == []
    # The weight editors did edit: otherwise the equality above would say nothing.
    if method not in ("ike", "serac", "tpatcher", "calinet"):
        assert any(not torch.equal(before[k], weights_one[k]) for k in before), method


def test_schedule_says_which_case_is_scored_when():
    plan = schedule(5, LifelongSettings(checkpoints=[1, 3, 10], gaps=[2]))
    assert effective_checkpoints(5, [1, 3, 10]) == [1, 3, 5]
    by_step = {
        t: sorted((p, e.kind, e.value, e.edits_after, e.at_end) for p, e in due) for t, due in enumerate(plan)
    }
    assert by_step[0] == [] and by_step[2] == [] and by_step[4] == [(1, "gap", 2, 2, False)]
    assert by_step[1] == [(0, "checkpoint", 1, 0, False)]
    assert by_step[3] == [
        (0, "checkpoint", 3, 2, False),
        (0, "gap", 2, 2, False),
        (1, "checkpoint", 3, 1, False),
        (2, "checkpoint", 3, 0, False),
    ]
    # The end: every case at K = 5; case 2 has its gap of 2 exactly; cases 3 and 4 too few edits after.
    assert [x for x in by_step[5] if x[1] == "gap"] == [
        (2, "gap", 2, 2, False),
        (3, "gap", 2, 1, True),
        (4, "gap", 2, 0, True),
    ]
    assert sorted(x[0] for x in by_step[5] if x[1] == "checkpoint") == [0, 1, 2, 3, 4]
    assert Event("gap", 2, 1, True).at_end


def _lifelong_run(vlm, editor, tmp_path, checkpoints, gaps, limit):
    data = EditDataModule(str(SAMPLE / "mmedit" / "vqa_eval.json"), IMAGES, limit=limit, batch_size=1000)
    module = EditEval(vlm, editor, mode="lifelong", lifelong=LifelongSettings(checkpoints, gaps))
    edit_trainer(results_dir=str(tmp_path)).test(module, datamodule=data, verbose=False)
    lines = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    return module, lines, json.loads((tmp_path / "summary.json").read_text())


def test_scores_are_those_of_the_model_at_the_time(vlm, cases, tmp_path):
    """A checkpoint's or gap's score equals the case's score after exactly that many edits."""
    _, lines, summary = _lifelong_run(vlm, make_editor("ft_llm"), tmp_path, [1, 2], [1], limit=3)
    assert [r["lifelong"]["position"] for r in lines] == [1, 2, 3]
    assert sorted(lines[0]["lifelong"]["checkpoints"]) == ["1", "2", "3"]
    assert sorted(lines[2]["lifelong"]["checkpoints"]) == ["3"]
    assert lines[2]["lifelong"]["gaps"]["1"] == {
        "edits_after": 0,
        "at_end": True,
        "scores": lines[2]["scores"],
    }
    assert lines[0]["lifelong"]["gaps"]["1"]["edits_after"] == 1
    reference = reference_outputs(vlm, cases, "strict", True)
    editor = make_editor("ft_llm")
    for k in (1, 2, 3):
        # The first k cases as one sequential apply: what checkpoint k must have seen.
        got, _ = _edited_and_scored(vlm, editor, cases[:k], reference, incremental=False)
        assert [line["lifelong"]["checkpoints"][str(k)] for line in lines[:k]] == [s for s, _ in got]
    # Case 1's gap of 1 is the second checkpoint's score of case 1 (two edits written by then).
    assert lines[0]["lifelong"]["gaps"]["1"]["scores"] == lines[0]["lifelong"]["checkpoints"]["2"]
    # The headline is the end of the sequence; the summary's rows count what they cover.
    block = summary["lifelong"]
    assert summary["mode"] == "lifelong" and block["length"] == 3
    assert {k: v["n_cases"] for k, v in block["checkpoints"].items()} == {"1": 1, "2": 2, "3": 3}
    assert block["checkpoints"]["3"]["rel"] == summary["rel"]
    assert block["gaps"]["1"]["n_cases"] == 3 and block["gaps"]["1"]["n_scored_at_end"] == 1
    assert block["checkpoints"]["1"]["rel"] == pytest.approx(
        100 * lines[0]["lifelong"]["checkpoints"]["1"]["rel"]
    )


@pytest.mark.parametrize("method", METHODS)
def test_lifelong_run_restores_bit_for_bit(vlm, method, tmp_path):
    before = _state(vlm)
    module, lines, summary = _lifelong_run(vlm, make_editor(method), tmp_path, [1, 2], [1, 2], limit=4)
    assert len(lines) == 4 and summary["lifelong"]["length"] == 4
    assert module.counters.n_edits == 4
    changed = [k for k, v in vlm.model.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"{method} left edits in {changed[:3]}"


def test_rerun_of_a_finished_lifelong_run_recomputes_nothing(vlm, tmp_path):
    module, lines, first = _lifelong_run(vlm, make_editor("ft_llm"), tmp_path, [1], [1], limit=3)
    again, lines_again, second = _lifelong_run(vlm, make_editor("ft_llm"), tmp_path, [1], [1], limit=3)
    assert again.counters.n_edits == 0 and second["n_resumed_rank0"] == 3
    assert second["lifelong"]["checkpoints"] == {
        k: {key: v for key, v in row.items() if key != "edit_seconds_total"}
        for k, row in first["lifelong"]["checkpoints"].items()
    }
    assert lines_again == lines


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"checkpoints": []}, "model.lifelong.checkpoints is empty"),
        ({"checkpoints": [0, 5]}, "model.lifelong.checkpoints must be integers >= 1, got [0]"),
        ({"gaps": [-1]}, "model.lifelong.gaps must be integers >= 0, got [-1]"),
        ({"gaps": [10, 10]}, "model.lifelong.gaps names a value twice"),
    ],
)
def test_bad_settings_are_refused_naming_them(settings, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        LifelongSettings(**settings)


def test_a_sequence_split_over_batches_is_refused(vlm, tmp_path):
    data = EditDataModule(str(SAMPLE / "mmedit" / "vqa_eval.json"), IMAGES, limit=4, batch_size=2)
    module = EditEval(vlm, make_editor("ft_llm"), mode="lifelong")
    with pytest.raises(ValueError, match="data.batch_size"):
        edit_trainer(results_dir=str(tmp_path)).test(module, datamodule=data, verbose=False)


def test_several_processes_are_refused(vlm):
    """A lifelong sequence is one sequence: devices > 1 would split or duplicate it, so it is refused."""
    module = EditEval(vlm, make_editor("ft_llm"), mode="lifelong")
    module._trainer = SimpleNamespace(world_size=2, num_test_batches=[1])
    with pytest.raises(LifelongSetupError, match="--trainer.devices 1"):
        module._check_one_sequence()
