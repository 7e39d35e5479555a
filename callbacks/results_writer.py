"""`ResultsWriter`: `cases.jsonl` written as cases finish, a rerun resumed from it, and `summary.json`.

The Lightning hooks it uses, in run order:

- `on_test_start`: check that the folder is empty or holds results of this very run (`run.json`,
  `callbacks/run_identity.py`; `overwrite` replaces another run's results instead), cut a torn last
  line (rank 0, before any rank appends) and read what an earlier run finished;
- `on_test_epoch_start`: hand those records to the module (`completed`), which skips their cases
  (it clears `completed` in its own `on_test_start`, which Lightning calls after this callback's);
- `on_test_batch_end`: append the step's new records (`outputs["records"]`), one line each;
- `on_test_end`: rank 0 rewrites the log in dataset order (cases of an earlier, larger run that
  this run did not ask for are kept after them), gathers this run's records of every rank into the
  module's `run`, and writes `summary.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callbacks.case_log import SUMMARY_FILE, CaseLog, write_atomic, write_summary
from callbacks.run_identity import RUN_FILE, RunMismatchError, check_same_run, read_identity, run_identity
from callbacks.summary import build_summary


class ResultsWriter(Callback):
    """Per-case results and the summary in `results_dir`; a rerun into the same folder resumes.

    Args:
        results_dir: the folder for `cases.jsonl` and `summary.json` (created, and proven writable,
            before any case is computed).
        overwrite: when the folder holds another run's results, delete them and start afresh
            (otherwise the run stops with one line naming what differs).
    """

    def __init__(self, results_dir: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.results_dir = str(results_dir)
        self.overwrite = overwrite
        self.log: CaseLog | None = None
        self._earlier: dict[str, dict[str, Any]] = {}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log = CaseLog(self.results_dir)
        folder = self.log.dir
        identity = run_identity(trainer, pl_module)
        stored = read_identity(folder)
        has_results = self.log.path.exists() or (folder / SUMMARY_FILE).exists()
        try:
            check_same_run(folder, stored, identity, has_results)
            same = True
        except RunMismatchError:
            if not self.overwrite:
                raise
            same = False
        trainer.strategy.barrier()  # every rank has compared before rank 0 changes the folder
        if trainer.is_global_zero:
            if not same:
                for name in (self.log.path.name, SUMMARY_FILE):
                    (folder / name).unlink(missing_ok=True)
            if stored != identity:
                write_atomic(folder / RUN_FILE, json.dumps(identity, indent=1, sort_keys=True) + "\n")
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
