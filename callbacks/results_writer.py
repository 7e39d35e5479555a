"""`ResultsWriter`: `cases.jsonl` written as cases finish, a rerun resumed from it, and `summary.json`.

The Lightning hooks it uses, in run order:

- `on_test_start`: cut a torn last line (rank 0, before any rank appends) and read what an earlier
  run finished;
- `on_test_epoch_start`: hand those records to the module (`completed`), which skips their cases
  (it clears `completed` in its own `on_test_start`, which Lightning calls after this callback's);
- `on_test_batch_end`: append the step's new records (`outputs["records"]`), one line each;
- `on_test_end`: rank 0 rewrites the log in dataset order, gathers every rank's records into the
  module's `run`, and writes `summary.json`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callbacks.case_log import CaseLog, write_summary
from callbacks.summary import build_summary


class ResultsWriter(Callback):
    """Per-case results and the summary in `results_dir`; a rerun into the same folder resumes.

    Args:
        results_dir: the folder for `cases.jsonl` and `summary.json` (created, and proven writable,
            before any case is computed).
    """

    def __init__(self, results_dir: str | os.PathLike[str]) -> None:
        self.results_dir = str(results_dir)
        self.log: CaseLog | None = None
        self._earlier: dict[str, dict[str, Any]] = {}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log = CaseLog(self.results_dir)
        if trainer.is_global_zero:
            self.log.repair()
        trainer.strategy.barrier()  # no rank appends before the torn tail is cut
        self._earlier = self.log.read()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.completed = dict(self._earlier)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.log is not None
        for record in (outputs or {}).get("records", []):
            self.log.append(record)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank has appended its cases; wait for all before rank 0 rewrites the file in order.
        trainer.strategy.barrier()
        if not trainer.is_global_zero or self.log is None:
            return
        order = trainer.datamodule.case_ids() if trainer.datamodule is not None else []
        pl_module.run.records = self.log.finalize(order)
        pl_module.run.summary = build_summary(trainer, pl_module)
        path = write_summary(self.results_dir, pl_module.run.summary)
        print(f"results: {path}")
