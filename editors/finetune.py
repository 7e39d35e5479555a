"""FT (LLM) and FT (Vis): write an edit by fine-tuning one group of the backbone's weights.

One class serves both baselines; they differ only in which parameter groups they ask the VLM for
(`["ffn:-1"]` for the last language MLP, `["projector"]` or `["vision"]` for the vision side). The
budget is a fixed number of optimiser steps per case, recorded with the result, because FT's scores
swing with the learning rate and the stopping rule.

The loss at each step comes from `VLM.training_loss(trained).over(case.edits)`: the backbone runs
what stays frozen once per case where that is exact (the layers below FT (LLM)'s trained MLP, FT
(Vis)'s vision tower), so the losses and edited weights are those of running the whole model, bit
for bit, at a fraction of the cost. The editor only chooses what to train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from backbones.base import VLM
from backbones.training_loss import TrainingLoss
from core.case import EditCase
from editors.base import Editor, ParameterSnapshot, WeightEditHandle
from editors.tuning import make_optimizer, only_these_trainable


class FineTune(Editor):
    """Fine-tune the target parameter groups on each case's edits, in order.

    Args:
        targets: parameter groups of the VLM to train (vision, projector, language, lm_head,
            layer:<i>, ffn:<i>; negative i counts from the last layer).
        lr: learning rate.
        steps: optimiser steps per case (the references use 10-15).
        optimizer: "adamw" or "sgd"; a fresh one per case, so no momentum leaks between edits.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        stop_loss: stop a case early once the mean NLL of its edits falls below this; None runs
            the whole budget. The steps actually used are recorded in `handle.stats`.
        cache_frozen: when every trained parameter lies in language layers from some layer i up,
            the final norm or lm_head, run the frozen rest (vision tower, projector, embeddings,
            layers below i) once per case and only layers i.. per step (their frozen parts whose
            inputs do not change, such as layer i's attention when only its MLP trains, once per
            case too); the losses and edited weights do not change. Falls back to the whole model by itself where that cannot be
            exact (vision or projector targets, an lm_head tied to the input embeddings, a backbone
            that names no final modules). Otherwise the frozen modules below the language model
            (FT (Vis)'s vision tower) run once per case and hand back that output at later steps
            (`backbones/frozen_vision.py`), again without changing any number. False always runs
            the whole model.
        name: recorded in results.
    """

    def __init__(
        self,
        targets: list[str],
        lr: float = 5e-3,
        steps: int = 10,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        weight_decay: float = 0.0,
        stop_loss: float | None = None,
        cache_frozen: bool = True,
        name: str = "FT",
    ) -> None:
        if not targets:
            raise ValueError("FineTune: targets is empty; name at least one parameter group, e.g. ['ffn:-1']")
        if not lr > 0:
            raise ValueError(f"FineTune: lr must be > 0, got {lr}")
        if steps < 0:
            raise ValueError(f"FineTune: steps must be >= 0, got {steps}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"FineTune: optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.targets = list(targets)
        self.lr = lr
        self.steps = steps
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.stop_loss = stop_loss
        self.cache_frozen = cache_frozen
        self.name = name

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "targets": self.targets,
            "lr": self.lr,
            "steps": self.steps,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
            "stop_loss": self.stop_loss,
            "cache_frozen": self.cache_frozen,
        }

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> WeightEditHandle:
        params = vlm.parameter_group(*self.targets)
        training = vlm.training_loss(params.values(), reuse_frozen=self.cache_frozen and self.steps > 0)
        start = time.perf_counter()
        per_case = []
        # Lightning runs test loops under inference mode; an edit needs autograd whatever the caller.
        with torch.inference_mode(False), torch.enable_grad():
            # One snapshot before the first case: restore() returns to the state before the whole
            # call, which is what sequential editing (K cases, then score all) needs.
            snapshot = ParameterSnapshot(params)
            try:
                with only_these_trainable(vlm.model, params):
                    for case in cases:
                        per_case.append(self._edit_one(training, case, list(params.values())))
            except BaseException:
                # No handle reaches the caller when an edit fails (out of memory, a bad case), so
                # undo here: a half-written edit must never leak into the next case.
                snapshot.restore()
                raise
        for p in params.values():
            p.grad = None
        stats: dict[str, object] = {
            "time_s": time.perf_counter() - start,
            "steps": sum(c["steps"] for c in per_case),
            "final_loss": per_case[-1]["final_loss"] if per_case else math.nan,
            "cases": per_case,
        }
        return WeightEditHandle(snapshot, stats=stats)

    def _edit_one(
        self, training: TrainingLoss, case: EditCase, params: list[torch.nn.Parameter]
    ) -> dict[str, object]:
        optim = make_optimizer(self.optimizer, params, self.lr, self.weight_decay)
        start = time.perf_counter()
        # Each case gets its own closure, on the model as the earlier cases of a sequence left it.
        with training.over(case.edits) as loss_fn:
            steps_used, initial, final = self._optimise(loss_fn, optim)
        return {
            "case_id": case.case_id,
            "steps": steps_used,
            "initial_loss": initial,
            "final_loss": final,
            "stopped_early": steps_used < self.steps,
            # The first language layer run per step (None: the whole model ran at every step).
            "replayed_from_layer": loss_fn.replayed_from_layer,
            # Calls of frozen modules answered from their first output.
            "frozen_outputs_reused": loss_fn.frozen_outputs_reused,
            "time_s": time.perf_counter() - start,
        }

    def _optimise(
        self, loss_fn: Callable[[], torch.Tensor], optim: torch.optim.Optimizer
    ) -> tuple[int, float, float]:
        """`steps` updates (fewer with `stop_loss`), then one forward for the final loss.

        Returns the steps taken and the losses before the first and after the last update.
        """
        initial = math.nan
        loss_value = math.nan
        steps_used = 0
        # steps + 1 forwards: the last one only measures the loss after the final update, so the
        # recorded final loss describes the edited model rather than the one a step before it.
        for step in range(self.steps + 1):
            last = step == self.steps
            with torch.set_grad_enabled(not last):
                loss = loss_fn()
            loss_value = loss.item()
            if step == 0:
                initial = loss_value
            if last or (self.stop_loss is not None and loss_value < self.stop_loss):
                break
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            steps_used += 1
        return steps_used, initial, loss_value
