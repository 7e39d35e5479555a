"""Lifelong editing: one long sequence of edits, scored at checkpoints K and after gaps of further edits.

The cases, in order, are one sequence. Edit t is added to the live state with `Editor.extend`
(`apply` for the first), so N edits cost N edits. Two protocols are read off the same pass:

- **checkpoints** K (default 1, 10, 100, 1000): after K edits, the first K cases are scored. A K
  above the sequence length N is capped to N, and N itself is always a checkpoint: the end of the
  sequence is the run's headline, the number sequential mode gives with K = N.
- **gaps** g (VLKEB's protocol; default 10, 20, 50, 100): each case is scored once g further edits
  have been written after it. A case with fewer than g edits after it is scored at the end of the
  sequence instead, and its record says so (`at_end`, `edits_after`).

Whatever is due after an edit (a checkpoint's cases and the cases whose gaps end there) is scored
in one batched call, each case once, however many protocols want it then. The locality references
come from the unedited model, for the whole sequence, before the first edit.

Plain functions over a backbone and an editor, like `edit_loop.py`; no Lightning state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from backbones.base import VLM
from core.case import EditCase
from editors.base import EditHandle, Editor
from lightning_modules.case_scoring import ProbeOutputs, score_cases

DEFAULT_CHECKPOINTS = (1, 10, 100, 1000)
DEFAULT_GAPS = (10, 20, 50, 100)


class LifelongSetupError(ValueError):
    """A lifelong run set up so that it would not be one sequence (several processes, several batches)."""


@dataclass(frozen=True)
class LifelongSettings:
    """The scoring points of a lifelong run (`model.mode: lifelong`).

    Args:
        checkpoints: numbers of edits K after which the first K cases are scored (each >= 1; a K
            above the sequence length is capped to it, and the end of the sequence is always scored).
        gaps: numbers of further edits g after which each case is scored (each >= 0; VLKEB uses 10,
            20, 50, 100); an empty list scores no gaps.
    """

    checkpoints: list[int] = field(default_factory=lambda: list(DEFAULT_CHECKPOINTS))
    gaps: list[int] = field(default_factory=lambda: list(DEFAULT_GAPS))

    def __post_init__(self) -> None:
        problems = []
        if not self.checkpoints:
            problems.append("model.lifelong.checkpoints is empty; give at least one K, e.g. [1, 10, 100]")
        for name, values, least in (("checkpoints", self.checkpoints, 1), ("gaps", self.gaps, 0)):
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < least]
            if bad:
                problems.append(f"model.lifelong.{name} must be integers >= {least}, got {bad}")
            elif len(set(values)) != len(values):
                problems.append(f"model.lifelong.{name} names a value twice: {values}")
        if problems:
            raise ValueError("; ".join(problems))


#: The settings a lifelong run uses unless told otherwise (never mutated: the class is frozen).
DEFAULT_LIFELONG = LifelongSettings()


@dataclass(frozen=True)
class Event:
    """One scoring of one case: at a checkpoint (`value` = K) or after a gap (`value` = g)."""

    kind: str  # "checkpoint" or "gap"
    value: int
    #: Edits written after the case's own when it was scored.
    edits_after: int
    #: A gap case scored at the end of the sequence because fewer than `value` edits followed it.
    at_end: bool = False


def effective_checkpoints(n: int, checkpoints: Sequence[int]) -> list[int]:
    """The checkpoints of a sequence of n edits: each capped to n, n always included, sorted, once each."""
    if n == 0:
        return []
    return sorted({min(k, n) for k in checkpoints} | {n})


def schedule(n: int, settings: LifelongSettings) -> list[list[tuple[int, Event]]]:
    """For each t = 0..n, the (position, event) pairs scored after t edits (positions 0-based).

    Entry 0 is always empty (nothing is scored before the first edit).
    """
    due: list[list[tuple[int, Event]]] = [[] for _ in range(n + 1)]
    for k in effective_checkpoints(n, settings.checkpoints):
        due[k] += [(p, Event("checkpoint", k, k - 1 - p)) for p in range(k)]
    for g in sorted(settings.gaps):
        for p in range(n):
            t = p + 1 + g
            if t <= n:
                due[t].append((p, Event("gap", g, g)))
            else:
                due[n].append((p, Event("gap", g, n - 1 - p, at_end=True)))
    return due


@dataclass
class LifelongTiming:
    """Where the time of a lifelong run went: cumulative edit seconds at each checkpoint, scoring in all."""

    edit_seconds_at: dict[int, float] = field(default_factory=dict)
    score_seconds: float = 0.0
    edit_seconds: float = 0.0
    n_edits: int = 0


def run_sequence(
    vlm: VLM,
    editor: Editor,
    cases: Sequence[EditCase],
    settings: LifelongSettings,
    protocol: str,
    generation: bool,
    reference: dict[str, list[ProbeOutputs]],
    timing: LifelongTiming | None = None,
) -> list[dict[str, Any]]:
    """Edit `cases` as one sequence, scoring as the schedule says; one record per case.

    A record is the case's record at the end of the sequence (scores and predictions after all N
    edits, as sequential mode writes it) plus `lifelong`: its position, its scores at each
    checkpoint that covered it and after each gap. The model is restored bit for bit afterwards,
    also when an edit or a scoring fails. `reference`: the unedited model's locality outputs of
    every case (`case_scoring.reference_outputs`), taken before the first edit.
    """
    timing = timing if timing is not None else LifelongTiming()
    n = len(cases)
    plan = schedule(n, settings)
    checkpoints = set(effective_checkpoints(n, settings.checkpoints))
    lifelong: list[dict[str, Any]] = [{"position": p + 1, "checkpoints": {}, "gaps": {}} for p in range(n)]
    final: dict[int, dict[str, Any]] = {}
    handle: EditHandle | None = None
    # A sequence is one Lightning step, so Lightning's bar cannot show how far it has got.
    bar = tqdm(range(1, n + 1), desc="lifelong: edits", unit="edit", mininterval=5.0, leave=False)
    try:
        for t in bar:
            live, handle = handle, None  # a failing `extend` has undone the whole state itself
            handle = _edit(vlm, editor, live, cases[t - 1], timing)
            if t in checkpoints:
                timing.edit_seconds_at[t] = timing.edit_seconds
            if not plan[t]:
                continue
            positions = sorted({p for p, _ in plan[t]})
            start = time.perf_counter()
            records = score_cases(
                vlm, [(cases[p], handle) for p in positions], reference, protocol, generation
            )
            timing.score_seconds += time.perf_counter() - start
            scored = dict(zip(positions, records, strict=True))
            for p, event in plan[t]:
                _note(lifelong[p], event, scored[p]["scores"])
            if t == n:
                final = scored
    finally:
        bar.close()
        if handle is not None:
            handle.restore()
    return [{**final[p], "lifelong": lifelong[p]} for p in range(n)]


def _edit(
    vlm: VLM, editor: Editor, handle: EditHandle | None, case: EditCase, timing: LifelongTiming
) -> EditHandle:
    """The live state with `case` added (`apply` for the first edit, `extend` after it)."""
    start = time.perf_counter()
    with torch.enable_grad():
        new = editor.apply(vlm, [case]) if handle is None else editor.extend(vlm, handle, [case])
    timing.edit_seconds += time.perf_counter() - start
    timing.n_edits += 1
    return new


def _note(entry: dict[str, Any], event: Event, scores: dict[str, float]) -> None:
    if event.kind == "checkpoint":
        entry["checkpoints"][str(event.value)] = scores
    else:
        entry["gaps"][str(event.value)] = {
            "edits_after": event.edits_after,
            "at_end": event.at_end,
            "scores": scores,
        }
