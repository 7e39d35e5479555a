"""The edit-and-score loop of a batch of cases, shared by `edit.py test` and editor validation.

`EditEval.test_step` and `EditorTraining.validation_step` both call `edit_and_score`, so a
validation score during training is computed exactly as the test score that is later reported:
pre-edit locality answers in one batched pass, then the edits (one sequence of K, one-step edits
restored bit for bit after each other, or one lifelong sequence scored as it grows,
`lifelong.py`), then every probe scored in as few passes as the handles' answerers allow. Plain
functions over a backbone and an editor; no Lightning state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from backbones.base import VLM, PromptTooLongError
from core.case import EditCase, Probe
from datamodules.records import BadRecordError
from editors.base import EditHandle, Editor
from lightning_modules.case_scoring import ProbeOutputs, reference_outputs, score_cases
from lightning_modules.lifelong import LifelongSettings, LifelongTiming, run_sequence

Mode = Literal["one_step", "sequential", "lifelong"]
OnBadRecord = Literal["error", "skip"]


@dataclass(frozen=True)
class LoopSettings:
    """How cases are edited and scored.

    Args:
        mode: `one_step` (each case edited alone, the model restored before the next),
            `sequential` (the cases given together are one sequence of K edits, scored after all K)
            or `lifelong` (the cases given together are one sequence, added edit by edit and
            scored at `lifelong`'s checkpoints and gaps).
        protocol: `strict` or `mmedit_trainer` (see `metrics.protocols`).
        generation: also score the generation twins (greedy answers, normalised exact match).
        on_bad_record: a case whose probe does not fit the model ends the run (`error`) or is
            recorded as skipped (`skip`), as the data module's setting of the same name.
        lifelong: the checkpoints and gaps of `lifelong` mode.
    """

    mode: Mode = "one_step"
    protocol: str = "strict"
    generation: bool = True
    on_bad_record: OnBadRecord = "error"
    lifelong: LifelongSettings = field(default_factory=LifelongSettings)


@dataclass
class EditCounters:
    """Time spent in `Editor.apply` and the number of cases edited (results report the mean).

    `lifelong`: where a lifelong run's time went (edit seconds at each checkpoint, scoring).
    """

    edit_seconds: float = 0.0
    n_edits: int = 0
    lifelong: LifelongTiming = field(default_factory=LifelongTiming)

    @property
    def seconds_per_case(self) -> float:
        return self.edit_seconds / max(self.n_edits, 1)


def edit_and_score(
    vlm: VLM,
    editor: Editor,
    cases: Sequence[EditCase],
    settings: LoopSettings,
    counters: EditCounters | None = None,
) -> list[dict[str, Any]]:
    """Reference pass, edits and scores of `cases`; one record per case (scored, or skipped).

    Only the backbone can tell that a prompt (with its image tokens and any in-context
    demonstrations) does not fit, and only here is it known which case and record the prompt came
    from. Under `on_bad_record: error` that ends the run naming them; under `skip` the case gets a
    skip record and the others are scored again without it. Editors restore the model themselves
    when `apply` fails.
    """
    counters = counters if counters is not None else EditCounters()
    todo = [c for c in cases if c.skip_reason is None]
    records = [skip_record(c, c.skip_reason) for c in cases if c.skip_reason is not None]
    while todo:
        try:
            reference = reference_outputs(vlm, todo, settings.protocol, settings.generation)
            return records + _edit_and_score(vlm, editor, todo, reference, settings, counters)
        except PromptTooLongError as exc:
            case = _owner(todo, exc.probe)
            if case is None:
                raise
            error = _located(case, exc)
            if settings.on_bad_record != "skip":
                raise error from exc
            records.append(skip_record(case, error.as_dict()))
            todo = [c for c in todo if c is not case]
    return records


def _edit_and_score(
    vlm: VLM,
    editor: Editor,
    cases: list[EditCase],
    reference: dict[str, list[ProbeOutputs]],
    settings: LoopSettings,
    counters: EditCounters,
) -> list[dict[str, Any]]:
    """Edit and score `cases`: one sequence, or one-step edits restored after each other.

    One-step edits of a `side_by_side` editor are live together and scored in shared passes; the
    others are scored one case at a time, each on its own edited model.
    """
    if settings.mode == "lifelong":
        timing = LifelongTiming()
        try:
            return run_sequence(
                vlm,
                editor,
                cases,
                settings.lifelong,
                settings.protocol,
                settings.generation,
                reference,
                timing,
            )
        finally:
            counters.edit_seconds += timing.edit_seconds
            counters.n_edits += timing.n_edits
            counters.lifelong = timing
    if settings.mode == "sequential":
        groups = [cases]
    elif editor.side_by_side:
        groups = [cases]
    else:
        groups = [[c] for c in cases]
    records: list[dict[str, Any]] = []
    for group in groups:
        if settings.mode == "sequential" or len(group) == 1:
            handles = [_apply(vlm, editor, group, counters)] * len(group)
        else:
            handles = []
            try:
                for case in group:
                    handles.append(_apply(vlm, editor, [case], counters))
            except BaseException:
                for handle in reversed(handles):
                    handle.restore()
                raise
        try:
            records += score_cases(
                vlm, list(zip(group, handles, strict=True)), reference, settings.protocol, settings.generation
            )
        finally:
            for handle in reversed(list(dict.fromkeys(handles))):  # each distinct handle once, last first
                handle.restore()
    return records


def _apply(vlm: VLM, editor: Editor, cases: list[EditCase], counters: EditCounters) -> EditHandle:
    start = time.perf_counter()
    with torch.enable_grad():
        handle = editor.apply(vlm, cases)
    counters.edit_seconds += time.perf_counter() - start
    counters.n_edits += len(cases)
    return handle


def _owner(cases: Sequence[EditCase], probe: Probe) -> EditCase | None:
    """The case a probe belongs to; editors may hand the backbone a copy with context added."""
    for case in cases:
        if any(p is probe for p in (*case.edits, *case.all_probes())):
            return case
    key = (probe.prompt, probe.answer, probe.kind, probe.hop)
    for case in cases:
        if any((p.prompt, p.answer, p.kind, p.hop) == key for p in (*case.edits, *case.all_probes())):
            return case
    return None


def _located(case: EditCase, exc: PromptTooLongError) -> BadRecordError:
    """The backbone's length error with the file, record index and case id the probe came from."""
    return BadRecordError(
        case.meta.get("annotation_file", case.source or "<cases>"),
        str(exc),
        index=case.meta.get("record_index", case.index),
        case_id=case.case_id,
        field=f"{exc.probe.kind} prompt",
    )


def skip_record(case: EditCase, reason: dict[str, Any]) -> dict[str, Any]:
    """The cases.jsonl line of a skipped case: kept so resumed and multi-process runs report it."""
    return {"case_id": case.case_id, "index": case.index, "source": case.source, "skipped": reason}
