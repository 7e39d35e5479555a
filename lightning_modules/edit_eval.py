"""`EditEval`: the test-time edit loop, run by `python edit.py test`.

Each test step takes a batch of cases. It first asks the *unedited* model for the locality probes'
answers (one batched pass for the whole batch), then edits: in one-step mode each case alone
(apply, score, restore bit for bit); in sequential mode the whole batch is one sequence of K edits
(apply all K in order, score all K, restore). Scores accumulate in torchmetrics objects that are
attributes of this module, so Lightning moves them and they sync across DDP ranks. Per-case
records go to `results_dir/cases.jsonl` as they finish, and a rerun resumes from them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from backbones.base import VLM
from callbacks.case_log import CaseLog, write_summary
from callbacks.results_table import format_table
from datamodules.case import EditCase
from editors.base import Editor
from lightning_modules.case_scoring import reference_outputs, score_cases
from metrics.scores import ScoreSet

SCORE_KEYS = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "port")


class EditEval(pl.LightningModule):
    """Edit a vision-language model case by case and score Rel, T-Gen, I-Gen, T-Loc, I-Loc, Port.

    Args:
        backbone: the model to edit, behind the `VLM` interface.
        editor: the editing method.
        mode: `one_step` (each case edited alone, model restored before the next) or `sequential`
            (each batch of `data.batch_size` cases is one sequence of K edits, scored after all K).
        protocol: `strict` (answer positions, top-1; the default) or `mmedit_trainer` (locality over
            all positions, top-10 for image locality), to set results beside published tables.
        generation: also score the generation twins (greedy decoding, normalised exact match).
        results_dir: where `cases.jsonl` and `summary.json` go; a rerun into the same folder resumes.
        max_hops: portability is also reported per hop, for hops 1..max_hops.
    """

    def __init__(
        self,
        backbone: VLM,
        editor: Editor,
        mode: Literal["one_step", "sequential"] = "one_step",
        protocol: Literal["strict", "mmedit_trainer"] = "strict",
        generation: bool = True,
        results_dir: str | None = None,
        max_hops: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "editor"])
        self.backbone = backbone
        self.editor = editor
        self.scores = ScoreSet(max_hops=max_hops)
        self.run_config: dict[str, Any] = {}
        self._log: CaseLog | None = None
        self._done: dict[str, dict[str, Any]] = {}
        self._edit_seconds = 0.0
        self._n_edits = 0
        self._n_resumed = 0

    # ----------------------------------------------------------------- lifecycle
    def on_test_start(self) -> None:
        self.backbone.model.eval()
        self.editor.setup(self.backbone)
        if self.hparams.results_dir:
            self._log = CaseLog(self.hparams.results_dir)
            if self.trainer.is_global_zero:
                self._log.repair()
            self.trainer.strategy.barrier()  # no rank appends before the torn tail is cut
            self._done = self._log.read()
        self.scores.reset()

    def test_step(self, batch: Sequence[EditCase], batch_idx: int) -> None:
        done = [c for c in batch if c.case_id in self._done]
        missing = [c for c in batch if c.case_id not in self._done]
        if self.hparams.mode == "sequential" and missing:
            # A sequence is only meaningful whole: recompute all of it, write only what is missing.
            done, missing = [], list(batch)
        for case in done:
            self._record(self._done[case.case_id], write=False)
        self._n_resumed += len(done)
        if not missing:
            return
        reference = reference_outputs(self.backbone, missing, self.hparams.protocol, self.hparams.generation)
        groups = [[c] for c in missing] if self.hparams.mode == "one_step" else [missing]
        for group in groups:
            for record in self._edit_and_score(group, reference):
                self._record(record, write=record["case_id"] not in self._done)

    def _edit_and_score(self, group: list[EditCase], reference) -> list[dict[str, Any]]:
        start = time.perf_counter()
        with torch.enable_grad():
            handle = self.editor.apply(self.backbone, group)
        self._edit_seconds += time.perf_counter() - start
        self._n_edits += len(group)
        try:
            return score_cases(
                self.backbone,
                handle,
                group,
                reference,
                self.hparams.protocol,
                self.hparams.generation,
                self.backbone.tokenizer.decode,
            )
        finally:
            handle.restore()

    def _record(self, record: dict[str, Any], write: bool) -> None:
        self.scores.update_case(record["scores"])
        if write and self._log is not None:
            self._log.append(record)

    def on_test_epoch_end(self) -> None:
        summary = self.scores.compute()
        for key, value in summary.items():
            if not math.isnan(value):
                self.log(f"test/{key}", value, rank_zero_only=True)
        # Every rank has appended its cases; wait for all before rank 0 rewrites the file in order.
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            self._write_results(summary)

    # ----------------------------------------------------------------- results
    def _write_results(self, scores: dict[str, float]) -> None:
        datamodule = self.trainer.datamodule
        order = datamodule.case_ids() if datamodule is not None else []
        records = self._log.finalize(order) if self._log is not None else []
        summary = build_summary(scores, self.hparams, records, len(order))
        summary.update(
            {
                "n_skipped": len(datamodule.skipped) if datamodule is not None else 0,
                "skipped": list(datamodule.skipped) if datamodule is not None else [],
                "data": datamodule.describe() if datamodule is not None else {},
                "backbone": self.backbone.describe(),
                "editor": self.editor.describe(),
                "edit_seconds_per_case_rank0": self._edit_seconds / max(self._n_edits, 1),
                "n_resumed_rank0": self._n_resumed,
                "world_size": self.trainer.world_size,
                "config": self.run_config,
            }
        )
        if self.hparams.results_dir:
            path = write_summary(self.hparams.results_dir, summary)
            print(f"results: {path}")
        print(format_table([(self.editor.name, summary)]))


def build_summary(scores: dict[str, float], hparams: Any, records: list, n_cases: int) -> dict[str, Any]:
    """The summary keys: the six scores, per-hop portability, generation twins, protocol, counts."""

    def pct(key: str) -> float | None:
        value = scores.get(key, float("nan"))
        return None if math.isnan(value) else round(value, 4)

    hops = {str(h): pct(f"port_hop{h}") for h in range(1, hparams.max_hops + 1)}
    summary: dict[str, Any] = {key: pct(key) for key in SCORE_KEYS}
    summary["port_per_hop"] = hops
    summary["generation"] = {key: pct(f"gen_{key}") for key in SCORE_KEYS}
    summary["generation"]["port_per_hop"] = {
        str(h): pct(f"gen_port_hop{h}") for h in range(1, hparams.max_hops + 1)
    }
    summary["protocol"] = hparams.protocol
    summary["mode"] = hparams.mode
    summary["n_cases"] = n_cases
    return summary
