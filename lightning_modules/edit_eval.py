"""`EditEval`: the test-time edit loop, run by `python edit.py test`.

Each test step takes a batch of cases and hands the ones not already done to `edit_and_score`
(`lightning_modules/edit_loop.py`): the *unedited* model's locality answers in one batched pass,
then the edits (each case alone, restored bit for bit, the batch as one sequence of K edits, or the
batch as one lifelong sequence scored at checkpoints and gaps as it grows), then every probe
scored. Scores accumulate in torchmetrics objects that are attributes of this
module, so Lightning moves them and they sync across DDP ranks.

This module edits and scores; what reaches the disk and the screen is the callbacks' job
(`callbacks/results_writer.py`: `cases.jsonl` as cases finish, resume, `summary.json`;
`callbacks/results_table.py`: the printed table). A test step returns its new records so the
writer sees them, and the writer hands cases finished by an earlier run back through `completed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from backbones.base import VLM
from callbacks.edit_run import EditRun
from core.case import EditCase
from editors.base import Editor
from lightning_modules.edit_loop import EditCounters, LoopSettings, Mode, OnBadRecord, edit_and_score
from lightning_modules.lifelong import DEFAULT_LIFELONG, LifelongSettings, LifelongSetupError
from metrics.protocols import Protocol
from metrics.scores import ScoreSet, average


class EditEval(pl.LightningModule):
    """Edit a vision-language model case by case and score Rel, T-Gen, I-Gen, T-Loc, I-Loc, Port.

    Args:
        backbone: the model to edit, behind the `VLM` interface.
        editor: the editing method.
        mode: `one_step` (each case edited alone, model restored before the next), `sequential`
            (each batch of `data.batch_size` cases is one sequence of K edits, scored after all K) or
            `lifelong` (all cases, in order, are one sequence, added edit by edit and scored at
            `lifelong.checkpoints` and after `lifelong.gaps`; one process, one batch:
            configs/edit/lifelong.yaml sets both).
        protocol: `strict` (answer positions, top-1; the default) or `mmedit_trainer` (locality over
            all positions, top-10 for image locality), to set results beside published tables.
        generation: also score the generation twins (greedy decoding, normalised exact match).
        max_hops: portability is also reported per hop, for hops 1..max_hops.
        on_bad_record: what a case whose probe does not fit the model does: end the run naming it
            (`error`) or become a counted skip (`skip`). `edit.py` sets it from `data.on_bad_record`.
        lifelong: checkpoints and gaps of `lifelong` mode (ignored by the other modes).
    """

    def __init__(
        self,
        backbone: VLM,
        editor: Editor,
        mode: Mode = "one_step",
        protocol: Protocol = "strict",
        generation: bool = True,
        max_hops: int = 4,
        on_bad_record: OnBadRecord = "error",
        lifelong: LifelongSettings = DEFAULT_LIFELONG,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "editor"])
        self.backbone = backbone
        self.editor = editor
        self.settings = LoopSettings(mode, protocol, generation, on_bad_record, lifelong)
        self.scores = ScoreSet(max_hops=max_hops)
        #: The resolved configuration of the run (`edit.py` fills it; summary.json records it).
        self.run_config: dict[str, Any] = {}
        #: Records of cases an earlier run finished, by case id (the results writer fills it).
        self.completed: dict[str, dict[str, Any]] = {}
        self.run = EditRun()
        self.counters = EditCounters()

    # ----------------------------------------------------------------- lifecycle
    def on_test_start(self) -> None:
        self.backbone.model.eval()
        self.editor.setup(self.backbone)
        # Per run: a module tested twice (benchmark rounds) reports each run alone. Callbacks'
        # on_test_start runs before this hook, so the results writer fills `completed` later, at
        # on_test_epoch_start.
        self.run = EditRun(started=True)
        self.counters = EditCounters()
        self.completed = {}
        self.backbone.generation_counts = dict.fromkeys(self.backbone.generation_counts, 0)
        self.scores.reset()
        if self.settings.mode == "lifelong":
            self._check_one_sequence()

    def _check_one_sequence(self) -> None:
        """A lifelong sequence is one sequence: one process, and all of its cases in one batch.

        Split over ranks or batches it would become several shorter sequences (or duplicates), and
        its scores would silently mean something else.
        """
        trainer = self.trainer
        if trainer.world_size > 1:
            raise LifelongSetupError(
                f"model.mode lifelong runs one sequence of edits in one process; got {trainer.world_size} "
                "processes: set --trainer.devices 1 (run several methods side by side instead)"
            )
        batches = sum(int(b) for b in (trainer.num_test_batches or []))
        if batches > 1:
            raise LifelongSetupError(
                f"model.mode lifelong needs the whole sequence in one batch, but the data gives {batches} "
                "batches: set data.batch_size to at least the number of cases (configs/edit/lifelong.yaml "
                "sets 1000000)"
            )

    def test_step(self, batch: Sequence[EditCase], batch_idx: int) -> dict[str, list[dict[str, Any]]]:
        """Edit and score the batch's unfinished cases; returns the new records (`{"records": [...]}`)."""
        done = [c for c in batch if c.case_id in self.completed]
        missing = [c for c in batch if c.case_id not in self.completed]
        if self.settings.mode in ("sequential", "lifelong") and missing:
            # A sequence is only meaningful whole: recompute all of it, report only what is missing.
            done, missing = [], list(batch)
        for case in done:
            self._count(self.completed[case.case_id])
        self.run.n_resumed += len(done)
        new = (
            edit_and_score(self.backbone, self.editor, missing, self.settings, self.counters)
            if missing
            else []
        )
        for record in new:
            self._count(record)
        return {"records": [r for r in new if r["case_id"] not in self.completed]}

    def _count(self, record: dict[str, Any]) -> None:
        self.run.records.append(record)
        if "skipped" not in record:
            self.scores.update_case(record["scores"])

    def on_test_epoch_end(self) -> None:
        self.run.scores = self.scores.compute()
        self.run.scores["avg"] = average(self.run.scores)
        self.run.edit_seconds_per_case = self.counters.seconds_per_case
        if self.settings.mode == "lifelong":
            self.run.lifelong_timing = self.counters.lifelong
        for key, value in self.run.scores.items():
            if not math.isnan(value):
                self.log(f"test/{key}", value, rank_zero_only=True)
