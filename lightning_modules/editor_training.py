"""`EditorTraining`: train any `TrainableEditor` on a frozen backbone, validate it as `edit.py test` scores.

`train.py fit` runs it with `EditorTrainData`. The backbone is frozen (no gradients, eval mode, its
weights checked unchanged around every validation and at the end); only the editor's parameters are
optimised, on `editor.training_loss(backbone, cases)`. Validation hands each batch to
`edit_and_score`, the very loop `edit.py test` runs, so `val/rel` during training is the number a
later evaluation reports for the same cases and settings. The scores accumulate in the torchmetrics
objects of a `ScoreSet` and are computed (synced across DDP ranks) and logged as `val/<score>`
(`val/rel`, `val/t_gen`, ..., in percent) at the epoch's end.

Two kinds of checkpoint, for two jobs:

- Lightning's `.ckpt` (a `ModelCheckpoint` in the YAML, monitoring e.g. `val/rel`, mode max) is for
  resuming only. It holds the editor, optimizer and loop states but not the backbone's weights
  (dropped on save, put back from the live backbone on load), and refuses to resume on another
  backbone.
- At the end of fit the best editor weights (the best `.ckpt`'s when a `ModelCheckpoint` kept one,
  else the last) are exported to `export_path` as a safetensors editor checkpoint, which
  `checkpoint:` in an edit config loads (`TrainableEditor.setup`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from backbones.base import VLM
from core.case import EditCase
from editors.checkpoint import EditorCheckpointError, fingerprint_diff
from editors.trainable import REQUIRED_LOSS_KEYS, TrainableEditor
from lightning_modules.edit_loop import EditCounters, LoopSettings, Mode, OnBadRecord, edit_and_score
from metrics.protocols import Protocol
from metrics.scores import ScoreSet, average

#: Where the backbone's fingerprint is kept in a Lightning `.ckpt` of this module.
CKPT_BACKBONE_KEY = "editor_backbone_fingerprint"
_BACKBONE_PREFIX = "backbone."
_EDITOR_PREFIX = "editor."


class EditorTraining(pl.LightningModule):
    """Train a trainable editor (MEND, KE, SERAC, UniKE encoders...) on a frozen backbone.

    Args:
        backbone: the model the editor learns to edit, behind the `VLM` interface; frozen.
        editor: the editor to train; its `checkpoint` (when set) is the starting point.
        lr: peak AdamW learning rate of the editor's parameters.
        weight_decay: AdamW (decoupled) weight decay.
        warmup_steps: linear warm-up of the learning rate over the first optimiser steps (0: none).
        export_path: where the best editor weights are written at the end of fit, as a safetensors
            editor checkpoint for `checkpoint:`; None writes nothing.
        mode: validation editing mode, as `edit.py test` (`one_step` or `sequential`).
        protocol: validation scoring protocol (`strict` or `mmedit_trainer`).
        generation: also score the generation twins in validation (slower; off by default).
        max_hops: portability is also reported per hop up to this count.
        on_bad_record: a validation case whose probe does not fit the model ends the run (`error`)
            or is skipped (`skip`), as the data module's setting.
        torch_threads: intra-op threads (None: torch's default).
    """

    def __init__(
        self,
        backbone: VLM,
        editor: TrainableEditor,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        export_path: str | None = None,
        mode: Mode = "one_step",
        protocol: Protocol = "strict",
        generation: bool = False,
        max_hops: int = 4,
        on_bad_record: OnBadRecord = "error",
        torch_threads: int | None = None,
    ) -> None:
        super().__init__()
        if torch_threads is not None:
            # On 2 shared cores a second intra-op thread spins against other jobs (MEND's training
            # ran 25x slower with torch's default of two threads on a loaded machine).
            torch.set_num_threads(torch_threads)
        if not lr > 0:
            raise ValueError(f"EditorTraining: lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"EditorTraining: weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"EditorTraining: warmup_steps must be >= 0, got {warmup_steps}")
        if not isinstance(editor, TrainableEditor):
            raise TypeError(
                f"EditorTraining: editor must be a TrainableEditor (learned parts to train), got "
                f"{type(editor).__name__}"
            )
        self.save_hyperparameters(ignore=["backbone", "editor"])
        self.backbone = backbone
        self.editor = editor
        # Frozen for good: the optimizer only ever sees the editor's parameters, and gradients
        # editors need w.r.t. backbone weights (MEND's inputs) they switch on themselves for a block.
        self.backbone.requires_grad_(False)
        self.backbone.model.eval()
        self.settings = LoopSettings(mode, protocol, generation, on_bad_record)
        self.val_scores = ScoreSet(max_hops=max_hops)
        self.counters = EditCounters()
        self._digest_before_validation: str | None = None
        self._digest_at_fit_start: str | None = None

    # ----------------------------------------------------------------- life cycle
    def setup(self, stage: str) -> None:
        # Before configure_optimizers and before a .ckpt is restored: the editor's backbone-shaped
        # parameters must exist for both.
        self.editor.setup(self.backbone)

    def on_fit_start(self) -> None:
        self._digest_at_fit_start = self.backbone.weights_digest()

    def train(self, mode: bool = True) -> EditorTraining:
        # Lightning switches the whole module to train mode for every training epoch; the backbone
        # must stay in eval mode (no dropout), so the editor learns on the function it will edit.
        super().train(mode)
        self.backbone.eval()
        return self

    def configure_optimizers(self) -> Any:
        params = [p for p in self.editor.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"EditorTraining: editor {type(self.editor).__name__} has no trainable parameters after build()"
            )
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.warmup_steps:
            return optimizer
        warmup = hp.warmup_steps
        # A plain function (not a bound method): LambdaLR stores no state for it in the .ckpt.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: Sequence[EditCase], batch_idx: int) -> torch.Tensor | None:
        cases = [c for c in batch if c.skip_reason is None]
        if not cases:
            return None  # every case of the batch was a counted skip: nothing to learn from
        losses = self.editor.training_loss(self.backbone, cases)
        missing = [k for k in REQUIRED_LOSS_KEYS if k not in losses]
        if missing:
            raise KeyError(
                f"{type(self.editor).__name__}.training_loss must return {list(REQUIRED_LOSS_KEYS)}; "
                f"missing {missing}"
            )
        for key, value in losses.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=len(cases))
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self.val_scores.reset()
        self._digest_before_validation = self.backbone.weights_digest()

    def validation_step(self, batch: Sequence[EditCase], batch_idx: int) -> None:
        if not batch:
            return  # a rank's padding batch (see EditorTrainData.val_dataloader)
        # Lightning may validate under inference mode; editors need autograd inside `apply`.
        with torch.inference_mode(False):
            records = edit_and_score(self.backbone, self.editor, batch, self.settings, self.counters)
        scored = [r["scores"] for r in records if "skipped" not in r]
        if scored:
            self.val_scores.update_cases(scored)

    def on_validation_epoch_end(self) -> None:
        before, self._digest_before_validation = self._digest_before_validation, None
        if before is not None and self.backbone.weights_digest() != before:
            raise RuntimeError(
                f"validation left an edit in the backbone: {type(self.editor).__name__}'s edit handles did "
                "not restore every tensor they changed"
            )
        # Every metric computes on every rank, in the same order: torchmetrics syncs each one's
        # states across DDP ranks there, so all ranks hold the same scores (and a rank that saw
        # fewer cases still takes part). Scores no case had (nan: no portability probes, the
        # generation twins with `generation: false`) are not logged.
        scores = self.val_scores.compute()
        self.val_scores.reset()
        scores["avg"] = average(scores)  # mean of Rel, T-Gen, I-Gen, T-Loc, I-Loc, as test/avg
        for key, value in scores.items():
            if not math.isnan(value):
                # The values are already synced and equal; sync_dist only keeps every rank's logged
                # value (what ModelCheckpoint reads on each rank) the same by construction.
                self.log(f"val/{key}", value, sync_dist=True)

    # ----------------------------------------------------------------- .ckpt (resuming)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The backbone is frozen and comes from its own config; a copy of it in every .ckpt would
        # make a 7B backbone's checkpoints 14 GB each. Its fingerprint stays, to refuse resuming
        # on another model.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = type(state)(
            (k, v) for k, v in state.items() if not k.startswith(_BACKBONE_PREFIX)
        )
        checkpoint[CKPT_BACKBONE_KEY] = self.editor.backbone_fingerprint(self.backbone)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.editor.ensure_built(self.backbone)
        stored = checkpoint.get(CKPT_BACKBONE_KEY)
        if stored is not None:
            differ = fingerprint_diff(stored, self.editor.backbone_fingerprint(self.backbone))
            if differ:
                raise EditorCheckpointError(
                    f"training checkpoint of {type(self.editor).__name__} was written for another "
                    f"backbone (differs in {', '.join(differ)}); it cannot be resumed on this one"
                )
        # Put the live backbone's tensors back, so the strict load checks every editor key.
        state = checkpoint["state_dict"]
        for key, value in self.backbone.state_dict(prefix=_BACKBONE_PREFIX).items():
            state.setdefault(key, value)

    # ----------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        start = self._digest_at_fit_start
        if start is not None and self.backbone.weights_digest() != start:
            raise RuntimeError(
                f"training changed the backbone's weights: {type(self.editor).__name__}.training_loss or its "
                "edits must leave them as they were"
            )
        source = self._restore_best_editor()
        if self.hparams.export_path is None or not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        best_score = getattr(callback, "best_model_score", None)
        self.editor.export(
            self.hparams.export_path,
            self.backbone,
            extra_meta={
                "training": {
                    "weights_from": source,
                    "global_step": int(self.global_step),
                    "epoch": int(self.current_epoch),
                    "monitor": getattr(callback, "monitor", None),
                    "best_score": None if best_score is None else _finite_or_none(float(best_score)),
                    # Without jsonargparse's bookkeeping entries (`_class_path`, `_instantiator`).
                    "hparams": {k: v for k, v in self.hparams.items() if not k.startswith("_")},
                }
            },
        )

    def _restore_best_editor(self) -> str:
        """Load the best `.ckpt`'s editor weights into the editor, when a ModelCheckpoint kept one.

        Returns where the weights now come from: the best checkpoint's path, or "last" (the weights
        as training left them: no ModelCheckpoint, or none saved yet).
        """
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not path:
            return "last"
        # weights_only: a .ckpt is a pickle; only tensors and plain containers are read from it.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = {
            k[len(_EDITOR_PREFIX) :]: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(_EDITOR_PREFIX)
        }
        self.editor.load_state_dict(state, strict=True)
        return str(path)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
