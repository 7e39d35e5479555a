"""`EditRun`: what one `edit.py test` run found, handed from the edit loop to the result callbacks.

It sits here, below the LightningModule that fills it, so that callbacks read a run without
importing the module that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EditRun:
    """The results of one `trainer.test` run.

    `scores`: every score in percent, synced across ranks (`ScoreSet.compute`). `records`: this
    process's case records (scored or skipped, resumed ones included); the results writer replaces
    them with every rank's, in dataset order. `summary`: built once at the end, by the results writer
    when there is a results folder, else by the table.
    """

    scores: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    n_resumed: int = 0
    edit_seconds_per_case: float = 0.0
    summary: dict[str, Any] | None = None
    #: A lifelong run's timing (`lightning_modules.lifelong.LifelongTiming`): edit seconds at each
    #: checkpoint and scoring seconds. Typed loosely so callbacks need not import the loop.
    lifelong_timing: Any = None
    #: Set by the module's `on_test_start`. Lightning runs no hook at all for a test loop without
    #: batches, so a run that is still not started afterwards had no case to edit.
    started: bool = False
