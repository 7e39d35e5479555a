"""KE / KnowledgeEditor (De Cao, Aziz, Titov, EMNLP 2021): a hypernetwork that turns the edit's gradient into an update.

An edit is written in one shot, with no optimisation at edit time:

1. the gradient G of the edit's NLL (the new answer given the edit's image and prompt) with respect
   to each target tensor (default: the last language layer's feed-forward weights, `ffn:-1`) is
   taken on the model as it is now;
2. the edit is encoded from the frozen backbone's own hidden states (`_features`): the state that
   predicts the answer, the mean state over the new answer's tokens and the mean state over the old
   answer's tokens (prompt + new answer and prompt + old answer, image included), giving a
   condition vector c (`ke_networks.EditEncoder`);
3. per target tensor, a head reads c and gates the gradient: delta W = -scale * sigmoid(eta(c)) *
   (alpha(c) * G + beta(c)), alpha and beta low-rank (`ke_networks.ConditionedUpdate`);
4. W += delta W.

Meta-training (`training_loss`) applies the update functionally (`VLM.logits_with`; the backbone is
never written) and minimises the NLL of the new answer on the edit, its rephrasings and its other
images (`meta_objectives.edit_probes`; optionally label-smoothed, as the reference implementation
does) under constraints, each handled by a Lagrangian as in the paper (gradient descent in the
editor's parameters, ascent in the multiplier lambda >= 0, which grows while its constraint is
violated on average and shrinks once it holds):

- locality, KL(unedited || edited) <= `kl_margin` on the case's unrelated text and image questions
  (`meta_objectives.locality_term`); `locality="weighted"` instead adds loc_weight * KL with a
  fixed weight (MEND's objective);
- optionally, size: the update's norm relative to the edited weights', ||delta W|| / ||W|| (over
  all edited tensors together) <= `update_margin` (the reference implementation's L_p constraint,
  p = 2, there in absolute units, which would not carry over between backbones).
  On the world backbone it is what keeps sequential edits apart: without it the learned updates
  grew to half the weights' norm (the offset beta did most of it) and ten edits in a row overwrote
  each other (Rel 43 after K = 10 against 71 with it), while one-step scores moved by a few points
  either way.

Loss = L_edit + lambda_kl * (KL - kl_margin) [+ lambda_u * (ratio / update_margin - 1)]. The gradient
G is a constant of the meta-objective (no second-order terms), as in the reference implementation.

`apply(vlm, cases)` edits the cases in order, each update computed on the model the earlier ones
left (sequential editing), after snapshotting the target tensors; `restore()` copies them back bit
for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import VLM
from backbones.batching import IGNORE_INDEX
from backbones.training_loss import TrainingLoss
from core.case import EditCase, Probe
from editors.base import ParameterSnapshot, WeightEditHandle
from editors.ke_networks import ConditionedUpdate, EditEncoder
from editors.meta_objectives import edit_probes, locality_term
from editors.trainable import TrainableEditor
from editors.tuning import only_these_trainable

#: How the KL locality term enters the meta-objective.
Locality = Literal["lagrangian", "weighted"]


def _key(name: str) -> str:
    # ModuleDict keys may not hold dots; the backbone's parameter names do.
    return name.replace(".", "__")


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class KnowledgeEditor(TrainableEditor):
    """KE: one update per edit, predicted from the edit's gradient by a hypernetwork conditioned on the edit.

    Args:
        targets: the parameter groups edited (and attached to); every 1-D or 2-D tensor in them gets
            its own update head.
        init_lr: the step size of the gradient-descent step the untrained editor makes (the heads
            start at alpha = 1, beta = 0); training learns the scale per tensor from there.
        rank: rank of the alpha and beta gates of each matrix (the paper: 1).
        cond_dim: size of the edit's condition vector.
        hidden_dim: width of each update head's hidden layer (the paper: 128).
        feature_layer: the language layer whose output states encode the edit (-1: the last).
        locality: `lagrangian` (the paper's constraint KL <= kl_margin with a learned multiplier)
            or `weighted` (L_edit + loc_weight * KL).
        loc_weight: the KL weight (`weighted`), or the multiplier's starting value (`lagrangian`).
        kl_margin: the KL the constraint allows (`lagrangian`).
        multiplier_gain: a multiplier is softplus(gain * raw) with `raw` trained by the same
            optimiser as the networks; Adam moves `raw` by about its learning rate per step, so the
            gain sets how fast the multiplier can react (gain x lr per step) without a second
            optimiser or learning rate.
        label_smoothing: label smoothing of the edit NLL (the reference: 0.1 over BART's 50k
            tokens; over the world's 169 tokens its uniform part dominated and grew the updates).
        update_margin: the largest relative update ||delta W|| / ||W|| (Frobenius, over all edited
            tensors together) the size constraint allows; None: no constraint.
        checkpoint: a trained editor checkpoint (see `TrainableEditor`).
    """

    name = "ke"

    def __init__(
        self,
        targets: list[str] | None = None,
        init_lr: float = 0.1,
        rank: int = 1,
        cond_dim: int = 256,
        hidden_dim: int = 128,
        feature_layer: int = -1,
        locality: Locality = "lagrangian",
        loc_weight: float = 1.0,
        kl_margin: float = 1e-3,
        multiplier_gain: float = 100.0,
        label_smoothing: float = 0.0,
        update_margin: float | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        if not init_lr > 0:
            raise ValueError(f"KnowledgeEditor: init_lr must be > 0, got {init_lr}")
        for option, value in (("rank", rank), ("cond_dim", cond_dim), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"KnowledgeEditor: {option} must be >= 1, got {value}")
        if locality not in ("lagrangian", "weighted"):
            raise ValueError(
                f"KnowledgeEditor: locality must be 'lagrangian' or 'weighted', got {locality!r}"
            )
        if loc_weight < 0 or (locality == "lagrangian" and not loc_weight > 0):
            raise ValueError(
                f"KnowledgeEditor: loc_weight must be > 0 (>= 0 when weighted), got {loc_weight}"
            )
        if kl_margin < 0:
            raise ValueError(f"KnowledgeEditor: kl_margin must be >= 0, got {kl_margin}")
        if update_margin is not None and not update_margin > 0:
            raise ValueError(f"KnowledgeEditor: update_margin must be None or > 0, got {update_margin}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"KnowledgeEditor: label_smoothing must be in [0, 1), got {label_smoothing}")
        if not multiplier_gain > 0:
            raise ValueError(f"KnowledgeEditor: multiplier_gain must be > 0, got {multiplier_gain}")
        self.targets = list(targets or ["ffn:-1"])
        self.init_lr = init_lr
        self.rank = rank
        self.cond_dim = cond_dim
        self.hidden_dim = hidden_dim
        self.feature_layer = feature_layer
        self.locality = locality
        self.loc_weight = loc_weight
        self.kl_margin = kl_margin
        self.multiplier_gain = multiplier_gain
        self.label_smoothing = label_smoothing
        self.update_margin = update_margin
        # Backbone-shaped parts come in `build`; placeholders keep the attributes registered.
        self.encoder: nn.Module = nn.Identity()
        self.heads = nn.ModuleDict()
        # The Lagrange multipliers (KL, update size): training state, never read by an edit, saved
        # with the rest so that a resumed training continues with them. Both always exist, whatever
        # the objective, so every KnowledgeEditor checkpoint has the same keys and an edit config
        # need not repeat the training objective's settings to load one (an unused multiplier gets
        # no gradient and stays as it starts).
        start = loc_weight if locality == "lagrangian" else 1.0
        self.multiplier_raw = nn.Parameter(torch.tensor(_inverse_softplus(start) / multiplier_gain))
        self.update_multiplier_raw = nn.Parameter(torch.tensor(_inverse_softplus(1.0) / multiplier_gain))

    def attached_groups(self) -> list[str]:
        return list(self.targets)

    def build(self, vlm: VLM) -> None:
        params = vlm.parameter_group(*self.targets)
        if not params:
            raise ValueError(
                f"KnowledgeEditor: the groups {self.targets} hold no parameters on this backbone"
            )
        device = vlm.device
        hidden = int(vlm.text_config().hidden_size)
        n = vlm.num_language_layers
        if not -n <= self.feature_layer < n:
            raise ValueError(
                f"KnowledgeEditor: feature_layer {self.feature_layer} is out of range for {n} layers"
            )
        # Three states of the edit (see `_features`), each as wide as the language model.
        self.encoder = EditEncoder(3 * hidden, self.cond_dim).to(device)
        self.heads = nn.ModuleDict(
            {
                _key(name): ConditionedUpdate(
                    p.shape, self.cond_dim, self.hidden_dim, self.rank, self.init_lr
                ).to(device)
                for name, p in params.items()
            }
        )
        for multiplier in (self.multiplier_raw, self.update_multiplier_raw):
            multiplier.data = multiplier.data.to(device)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "targets": self.targets,
            "init_lr": self.init_lr,
            "rank": self.rank,
            "cond_dim": self.cond_dim,
            "hidden_dim": self.hidden_dim,
            "feature_layer": self.feature_layer,
            "locality": self.locality,
            "loc_weight": self.loc_weight,
            "kl_margin": self.kl_margin,
            "multiplier_gain": self.multiplier_gain,
            "label_smoothing": self.label_smoothing,
            "update_margin": self.update_margin,
        }

    def multiplier(self) -> torch.Tensor:
        """The Lagrange multiplier of the locality constraint (>= 0); `loc_weight` when weighted."""
        if self.locality == "weighted":
            return torch.tensor(self.loc_weight)
        return F.softplus(self.multiplier_gain * self.multiplier_raw)

    # ----------------------------------------------------------------- the edit's encoding and gradient
    def _old_answers(self, vlm: VLM, case: EditCase) -> list[str]:
        """What the model answered before the edit, per edit of the case.

        The benchmarks record it (`pred`: MMEdit, VLKEB, the world) for the main edit; where they do
        not, and for extra edits, the backbone's own greedy answer is taken.
        """
        pred = case.meta.get("pred")
        answers: list[str | None] = [pred if isinstance(pred, str) and pred.strip() else None]
        answers += [None] * len(case.extra_edits)
        missing = [i for i, a in enumerate(answers) if a is None]
        if missing:
            generated = vlm.generate([case.edits[i] for i in missing])
            for i, text in zip(missing, generated, strict=True):
                answers[i] = text
        return [a or "" for a in answers]

    @torch.no_grad()
    def _features(self, vlm: VLM, case: EditCase) -> torch.Tensor:
        """The edit's features (3 x hidden, float32) from the backbone as it is now; a constant.

        Rows `prompt + new answer` and `prompt + old answer` (image included) run in one batch; the
        state at the last prompt position (what predicts the answer), and each row's mean state over
        its answer tokens, are concatenated. Several edits of one case are averaged. Plain no_grad,
        not inference mode: the features feed the editor's networks, whose training saves them for
        backward.
        """
        edits = case.edits
        olds = self._old_answers(vlm, case)
        rows: list[Probe] = [*edits, *(replace(p, answer=old) for p, old in zip(edits, olds, strict=True))]
        batch = vlm.build_batch(rows)
        layer = self.feature_layer
        with vlm.capture_hidden([layer]) as hidden:
            vlm.model(**batch.inputs)
        states = hidden[layer].float()
        n = len(edits)

        def answer_mean(row: int) -> torch.Tensor:
            start, end = batch.answer_spans[row]
            # An answer that tokenises to nothing (an empty old answer) falls back to the last
            # prompt state rather than a mean over no tokens (nan).
            return states[row, start:end].mean(0) if end > start else states[row, start - 1]

        features = [
            torch.cat([states[i, batch.answer_spans[i][0] - 1], answer_mean(i), answer_mean(n + i)])
            for i in range(n)
        ]
        return torch.stack(features).mean(0)

    def _gradient(
        self, vlm: VLM, training: TrainingLoss, case: EditCase, params: dict[str, nn.Parameter]
    ) -> list[torch.Tensor]:
        """The gradient of the edit NLL w.r.t. `params` on the model as it is now (a constant)."""
        with torch.enable_grad(), only_these_trainable(vlm.model, params):
            with training.over(case.edits) as loss_fn:
                return list(torch.autograd.grad(loss_fn(), list(params.values())))

    def updates(
        self, vlm: VLM, training: TrainingLoss, case: EditCase, params: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """The update of each target tensor for `case` (float32; differentiable in the editor's parameters)."""
        features = self._features(vlm, case)
        grads = self._gradient(vlm, training, case, params)
        cond = self.encoder(features)
        return {name: self.heads[_key(name)](cond, grad) for name, grad in zip(params, grads, strict=True)}

    # ----------------------------------------------------------------- editing
    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> WeightEditHandle:
        params = vlm.parameter_group(*self.targets)
        training = vlm.training_loss(params.values())
        start = time.perf_counter()
        per_case: list[dict[str, object]] = []
        # Lightning may call this under inference mode (validation, test); the snapshot, the
        # gradient and the writes must be ordinary tensors.
        with torch.inference_mode(False):
            snapshot = ParameterSnapshot(params)
            try:
                for case in cases:  # in order: each update is computed on the model the earlier ones left
                    deltas = self.updates(vlm, training, case, params)
                    with torch.no_grad():
                        for name, p in params.items():
                            p.add_(deltas[name].to(p.dtype))
                        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
                    per_case.append({"case_id": case.case_id, "update_norm": norm})
            except BaseException:
                # No handle reaches the caller, so a half-written edit is undone here.
                snapshot.restore()
                raise
        return WeightEditHandle(
            snapshot,
            stats={"time_s": time.perf_counter() - start, "steps": len(cases), "cases": per_case},
        )

    # ----------------------------------------------------------------- meta-training
    def edit_losses(
        self, vlm: VLM, weights: dict[str, torch.Tensor], case: EditCase
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit term that is minimised and the plain NLL of the new answer (reported), under `weights`.

        On the edit, its rephrasings and its other images (`meta_objectives.edit_probes`). The term
        is the NLL, label-smoothed when `label_smoothing` > 0 as in the reference implementation
        (epsilon 0.1 there; on the world's 169-token vocabulary its uniform part dominated the term
        and the learned updates grew, so it is off by default).
        """
        batch = vlm.build_batch(edit_probes(case))
        logits = vlm.logits_with(batch, weights)[:, :-1].flatten(0, 1).float()
        labels = batch.labels[:, 1:].flatten()
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        if not self.label_smoothing:
            return nll, nll
        smoothed = F.cross_entropy(
            logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )
        return smoothed, nll

    def training_loss(self, vlm: VLM, cases: Sequence[EditCase]) -> dict[str, torch.Tensor]:
        params = vlm.parameter_group(*self.targets)
        training = vlm.training_loss(params.values())
        edit_terms, nll_terms, loc_terms, ratio_terms = [], [], [], []
        weight_norm = torch.sqrt(sum(p.detach().float().pow(2).sum() for p in params.values()))
        for case in cases:
            deltas = self.updates(vlm, training, case, params)
            # The edited weights as tensors, never written into the model: the loss is a function of
            # the editor's parameters through them, and the backbone stays as it was.
            edited = {name: p.detach() + deltas[name].to(p.dtype) for name, p in params.items()}
            edit_loss, nll = self.edit_losses(vlm, edited, case)
            edit_terms.append(edit_loss)
            nll_terms.append(nll.detach())
            loc = locality_term(vlm, edited, case)
            if loc is not None:
                loc_terms.append(loc)
            # The reference's L_p term (p = 2), relative to the weights' own norm.
            ratio_terms.append(torch.sqrt(sum(d.pow(2).sum() for d in deltas.values())) / weight_norm)
        loss_edit = torch.stack(edit_terms).mean()
        loss_loc = torch.stack(loc_terms).mean() if loc_terms else loss_edit.new_zeros(())
        update_ratio = torch.stack(ratio_terms).mean()
        multiplier = self.multiplier().to(loss_edit.device)
        if self.locality == "weighted":
            loss = loss_edit + multiplier * loss_loc
        else:
            loss = loss_edit + _lagrangian_term(multiplier, loss_loc - self.kl_margin)
        out = {
            "loss_edit": loss_edit,
            "loss_loc": loss_loc,
            "nll_edit": torch.stack(nll_terms).mean(),
            "multiplier": multiplier.detach(),
            "update_ratio": update_ratio.detach(),
        }
        if self.update_margin is not None:
            update_multiplier = F.softplus(self.multiplier_gain * self.update_multiplier_raw)
            # The slack in units of the margin, so the multiplier is on the edit loss's scale
            # whatever margin is chosen.
            loss = loss + _lagrangian_term(update_multiplier, update_ratio / self.update_margin - 1.0)
            out["update_multiplier"] = update_multiplier.detach()
        return {"loss": loss, **out}


def _lagrangian_term(multiplier: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """lambda * slack, with descent in what `slack` depends on and ascent in lambda.

    Descent in the networks on lambda * slack (lambda held fixed) and ascent in lambda (slack held
    fixed): the second part is zero in value and carries lambda's reversed gradient, so one
    optimiser does both and the term reads lambda * slack. lambda grows while the constraint
    slack <= 0 is violated on average and shrinks (towards 0) once it holds.
    """
    fixed = multiplier.detach()
    return fixed * slack - (multiplier - fixed) * slack.detach()
