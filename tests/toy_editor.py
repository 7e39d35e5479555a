"""A small but real trainable editor for the tests: one gradient step with learned step sizes.

`LearnedStepEditor` edits by one gradient step of the edit's NLL on the last language layer's FFN,
with a learned (log) step size per output row of each weight: the "learned learning rate" baseline
of MAML / Meta-SGD that MEND improves on. It has every part the `TrainableEditor` contract asks for,
at a few hundred parameters: backbone-shaped parameters (`build`: one step size per row, so their
shapes follow the backbone's FFN), an edit that restores bit for bit, and a training loss that
differentiates through the edit without writing it (`editors.meta_objectives`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from backbones.base import VLM
from backbones.training_loss import TrainingLoss
from core.case import EditCase
from editors.base import ParameterSnapshot, WeightEditHandle
from editors.meta_objectives import edit_term, locality_term
from editors.trainable import TrainableEditor
from editors.tuning import only_these_trainable


def _key(name: str) -> str:
    # ParameterDict keys may not hold dots; parameter names of the backbone do.
    return name.replace(".", "__")


class LearnedStepEditor(TrainableEditor):
    """Edit = `w - exp(log_lr) * grad` on the target groups, `log_lr` learned per output row.

    Args:
        targets: the parameter groups stepped on (and attached to).
        init_lr: the step size every row starts from before training.
        loc_weight: weight of the locality term (KL from the unedited model's predictions).
        checkpoint: a trained editor checkpoint (see `TrainableEditor`).
    """

    name = "learned_step"

    def __init__(
        self,
        targets: list[str] | None = None,
        init_lr: float = 0.01,
        loc_weight: float = 1.0,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        if not init_lr > 0:
            raise ValueError(f"LearnedStepEditor: init_lr must be > 0, got {init_lr}")
        self.targets = list(targets or ["ffn:-1"])
        self.init_lr = init_lr
        self.loc_weight = loc_weight
        self.log_lr = nn.ParameterDict()

    def attached_groups(self) -> list[str]:
        return list(self.targets)

    def build(self, vlm: VLM) -> None:
        self.log_lr = nn.ParameterDict(
            {
                _key(name): nn.Parameter(torch.full((p.shape[0],), math.log(self.init_lr), device=p.device))
                for name, p in vlm.parameter_group(*self.targets).items()
            }
        )

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "targets": self.targets,
            "init_lr": self.init_lr,
            "loc_weight": self.loc_weight,
        }

    # ----------------------------------------------------------------- the edit
    def step(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The update of parameter `name` for its gradient `grad` (differentiable in `log_lr`)."""
        rate = self.log_lr[_key(name)].exp().to(grad.dtype)
        return rate.view(-1, *[1] * (grad.dim() - 1)) * grad

    def _gradient(
        self, vlm: VLM, training: TrainingLoss, case: EditCase, params: dict[str, nn.Parameter]
    ) -> list[torch.Tensor]:
        """The gradient of the edit NLL w.r.t. `params` on the model as it is now (a constant)."""
        with torch.inference_mode(False), torch.enable_grad(), only_these_trainable(vlm.model, params):
            with training.over(case.edits) as loss_fn:
                return list(torch.autograd.grad(loss_fn(), list(params.values())))

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> WeightEditHandle:
        params = vlm.parameter_group(*self.targets)
        training = vlm.training_loss(params.values())
        start = time.perf_counter()
        # Lightning may call this under inference mode (validation, test); the snapshot and the
        # steps must be ordinary tensors.
        with torch.inference_mode(False):
            snapshot = ParameterSnapshot(params)
            try:
                for case in cases:  # in order: each case's step sees the earlier cases' edits
                    grads = self._gradient(vlm, training, case, params)
                    with torch.no_grad():
                        for (name, p), g in zip(params.items(), grads, strict=True):
                            p.sub_(self.step(name, g).to(p.dtype))
            except BaseException:
                # No handle reaches the caller, so a half-written edit is undone here.
                snapshot.restore()
                raise
        return WeightEditHandle(snapshot, stats={"time_s": time.perf_counter() - start, "steps": len(cases)})

    # ----------------------------------------------------------------- meta-training
    def training_loss(self, vlm: VLM, cases: Sequence[EditCase]) -> dict[str, torch.Tensor]:
        params = vlm.parameter_group(*self.targets)
        training = vlm.training_loss(params.values())
        edit_terms, loc_terms = [], []
        for case in cases:
            grads = self._gradient(vlm, training, case, params)
            # The edited weights as tensors, never written into the model: the loss is a function
            # of `log_lr` through them, and the backbone stays as it was.
            edited = {
                name: p.detach() - self.step(name, g)
                for (name, p), g in zip(params.items(), grads, strict=True)
            }
            edit_terms.append(edit_term(vlm, edited, case))
            loc = locality_term(vlm, edited, case)
            if loc is not None:
                loc_terms.append(loc)
        loss_edit = torch.stack(edit_terms).mean()
        loss_loc = torch.stack(loc_terms).mean() if loc_terms else loss_edit.new_zeros(())
        return {"loss": loss_edit + self.loc_weight * loss_loc, "loss_edit": loss_edit, "loss_loc": loss_loc}
