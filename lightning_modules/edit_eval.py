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

from backbones.base import VLM, PromptTooLongError
from callbacks.case_log import CaseLog, write_summary
from callbacks.results_table import format_table
from core.case import PROBE_KINDS, EditCase, Probe
from datamodules.records import BadRecordError
from editors.base import EditHandle, Editor
from lightning_modules.case_scoring import reference_outputs, score_cases
from metrics.scores import ScoreSet


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
        self._run_skipped: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- lifecycle
    def on_test_start(self) -> None:
        self.backbone.model.eval()
        self.editor.setup(self.backbone)
        # Counters are per run: a module tested twice (benchmark rounds) reports each run alone.
        self._done, self._edit_seconds, self._n_edits, self._n_resumed = {}, 0.0, 0, 0
        self._run_skipped = []
        self.backbone.generation_counts = dict.fromkeys(self.backbone.generation_counts, 0)
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
        for case in [c for c in missing if c.skip_reason is not None]:
            self._record(_skip_record(case, case.skip_reason), write=True)
        missing = [c for c in missing if c.skip_reason is None]
        if not missing:
            return
        for record in self._score_or_skip(missing):
            self._record(record, write=record["case_id"] not in self._done)

    def _score_or_skip(self, cases: list[EditCase]) -> list[dict[str, Any]]:
        """Reference pass, edit and scores of `cases`, leaving out cases with a probe too long for the model.

        Only the backbone can tell that a prompt (with its image tokens and any in-context
        demonstrations) does not fit, and only here is it known which case and record the prompt came
        from. Under `on_bad_record: error` that ends the run naming them; under `skip` the case gets a
        skip record (kept in cases.jsonl, so resumed and multi-process runs report it too) and the
        others are scored again without it. Editors restore the model themselves when `apply` fails.
        """
        skipped: list[dict[str, Any]] = []
        while cases:
            try:
                reference = reference_outputs(
                    self.backbone, cases, self.hparams.protocol, self.hparams.generation
                )
                return skipped + self._edit_and_score(cases, reference)
            except PromptTooLongError as exc:
                case = _owner(cases, exc.probe)
                if case is None:
                    raise
                error = _located(case, exc)
                if self._on_bad_record() != "skip":
                    raise error from exc
                skipped.append(_skip_record(case, error.as_dict()))
                cases = [c for c in cases if c is not case]
        return skipped

    def _on_bad_record(self) -> str:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", {})
        return str(hparams.get("on_bad_record", "error"))

    def _edit_and_score(self, cases: list[EditCase], reference) -> list[dict[str, Any]]:
        """Edit and score `cases`: one sequence, or one-step edits restored after each other.

        One-step edits of an editor that changes no weights are applied side by side and scored in
        shared forward passes; weight edits are scored one case at a time, each on its own model.
        """
        if self.hparams.mode == "sequential":
            groups = [cases]
        elif self.editor.changes_weights:
            groups = [[c] for c in cases]
        else:
            groups = [cases]
        records: list[dict[str, Any]] = []
        for group in groups:
            if self.hparams.mode == "sequential" or len(group) == 1:
                handles = [self._apply_edits(group)] * len(group)
            else:
                handles = [self._apply_edits([case]) for case in group]
            try:
                records += score_cases(
                    self.backbone,
                    list(zip(group, handles, strict=True)),
                    reference,
                    self.hparams.protocol,
                    self.hparams.generation,
                    self.backbone.tokenizer.decode,
                )
            finally:
                for handle in dict.fromkeys(handles):  # each distinct handle once
                    handle.restore()
        return records

    def _apply_edits(self, cases: list[EditCase]) -> EditHandle:
        start = time.perf_counter()
        with torch.enable_grad():
            handle = self.editor.apply(self.backbone, cases)
        self._edit_seconds += time.perf_counter() - start
        self._n_edits += len(cases)
        return handle

    def _record(self, record: dict[str, Any], write: bool) -> None:
        if "skipped" in record:
            self._run_skipped.append(record["skipped"])
        else:
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
        # Cases skipped while scoring: from the log when there is one (it holds every rank's cases).
        run_skipped = [r["skipped"] for r in records if "skipped" in r] if self._log else self._run_skipped
        skipped = (list(datamodule.skipped) if datamodule is not None else []) + run_skipped
        summary = build_summary(scores, self.hparams, records, len(order) - len(run_skipped))
        summary.update(
            {
                "n_skipped": len(skipped),
                "skipped": skipped,
                "data": datamodule.describe() if datamodule is not None else {},
                "backbone": self.backbone.describe(),
                "editor": self.editor.describe(),
                "edit_seconds_per_case_rank0": self._edit_seconds / max(self._n_edits, 1),
                "n_resumed_rank0": self._n_resumed,
                # How the greedy answers (pre-edit locality references included) were obtained.
                "generated_rows_rank0": dict(self.backbone.generation_counts),
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
    summary: dict[str, Any] = {key: pct(key) for key in PROBE_KINDS}
    summary["port_per_hop"] = hops
    summary["generation"] = {key: pct(f"gen_{key}") for key in PROBE_KINDS}
    summary["generation"]["port_per_hop"] = {
        str(h): pct(f"gen_port_hop{h}") for h in range(1, hparams.max_hops + 1)
    }
    summary["protocol"] = hparams.protocol
    summary["mode"] = hparams.mode
    summary["n_cases"] = n_cases
    return summary


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


def _skip_record(case: EditCase, reason: dict[str, Any]) -> dict[str, Any]:
    """The cases.jsonl line of a skipped case: kept so resumed and multi-process runs report it."""
    return {"case_id": case.case_id, "index": case.index, "source": case.source, "skipped": reason}
