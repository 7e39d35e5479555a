"""MEND (Mitchell et al., ICLR 2022, "Fast Model Editing at Scale"): a trained gradient-to-update editor.

An edit is one forward and one backward pass of the edit's NLL on the backbone, with no weight
gradient formed: forward hooks on the edited linear layers record each token's input `x_t`, and the
gradient of the loss w.r.t. each layer's output, `delta_t`, is taken at the hooked outputs, so the
fine-tuning gradient of a weight is known only as its rank-1 factors `sum_t delta_t x_t^T`.
Small trained networks (`editors.mend_networks.GradientMLP`, one per weight shape, shared by the
matrices of that shape) map every pair to `(x~_t, delta~_t)`, and the weight moves by
`-lr_W * sum_t delta~_t x~_t^T`, with a learned step size `lr_W` per matrix (MEND's `edit_lrs`).

Meta-training (`training_loss`) edits each training case functionally (`VLM.logits_with`: the
edited weights are tensors that depend on the editor's parameters, never written into the model)
and minimises `c_edit * L_edit + c_loc * L_loc`: the NLL of the new answer on the edit, its
rephrasing and its other image (`editors.meta_objectives.edit_term`), and the KL from the unedited
model on unrelated text and image questions (`locality_term`). `apply` writes the same update in
place, case after case (each case's gradient on the model as the earlier cases left it), behind a
`ParameterSnapshot` that `restore()` copies back bit for bit.

Differences from the reference implementation (github.com/eric-mitchell/mend), each for a reason:
the update is a descent step (`W - lr * ...`; the reference adds and lets training find the sign),
so an untrained MEND already fine-tunes one step; step sizes are learned in log space, so one
optimiser learning rate suits them and the networks alike; the networks' last layer is linear
(the reference clamps it too), so a residual can also subtract. Three options, off by default (the
reference's behaviour), are for sequential editing, where the reference's networks break the model
within a few edits: `input_clip` (bounded standardised factors), `anchored` (no gradient, no
update: the networks' constant response is not added to every edit) and `train_sequence`
(meta-training on sequences of edits).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from backbones.base import VLM
from backbones.batching import answer_nll
from core.case import EditCase, Probe
from editors.base import ParameterSnapshot, WeightEditHandle
from editors.checkpoint import EditorCheckpointError
from editors.mend_networks import GradientMLP
from editors.meta_objectives import edit_term, locality_term
from editors.trainable import TrainableEditor
from editors.tuning import only_these_trainable

#: Per edited weight: the rows (one per token that carries gradient) of its inputs and output gradients.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _key(name: str) -> str:
    # ParameterDict / ModuleDict keys may not hold dots; the backbone's parameter names do.
    return name.replace(".", "__")


def _shape_key(weight: torch.Tensor) -> str:
    out_features, in_features = weight.shape
    return f"{out_features}x{in_features}"


def edited_linears(vlm: VLM, groups: Sequence[str]) -> dict[str, nn.Linear]:
    """The 2-D weights of `groups` (names as in `vlm.model.named_parameters()`) -> their owning Linear.

    Biases and norms in the groups are left alone: MEND's update is a sum of outer products, which
    only a matrix has. Raises when a weight's owner is not an `nn.Linear` (the factors `x`, `delta`
    then mean something else, e.g. GPT-2's transposed Conv1D).
    """
    owners: dict[str, nn.Linear] = {}
    for name, p in vlm.parameter_group(*groups).items():
        if p.dim() != 2:
            continue
        module_name, _, attr = name.rpartition(".")
        module = vlm.model.get_submodule(module_name)
        if attr != "weight" or not isinstance(module, nn.Linear):
            raise ValueError(
                f"MEND: {name} in groups {list(groups)} is not the weight of an nn.Linear "
                f"({type(module).__name__}); MEND edits linear layers only"
            )
        owners[name] = module
    if not owners:
        raise ValueError(f"MEND: groups {list(groups)} hold no 2-D linear weight to edit")
    return owners


@contextlib.contextmanager
def _recording(linears: dict[str, nn.Linear]) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Forward hooks that record each call's input and a zero "probe" tensor added to its output.

    The output becomes `output + probe`, with `probe` a zero leaf that requires grad: the forward
    computes the same numbers, the graph through the output is kept (a lower layer's `delta` must
    include the paths through the edited layers above it), and `autograd.grad(loss, probes)` gives
    `delta` at every edited layer while no backbone weight needs `requires_grad`: no weight
    gradient is formed, as in MEND, which only uses the factors. A layer called more than once per
    forward contributes one record per call.
    """
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in linears}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            probe = torch.zeros_like(output, requires_grad=True)
            records[name].append((args[0].detach(), probe))
            return output + probe

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in linears.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def gradient_factors(
    vlm: VLM,
    linears: dict[str, nn.Linear],
    probes: Sequence[Probe],
    weights: dict[str, torch.Tensor] | None = None,
) -> Factors:
    """The rank-1 factors of the gradient of the probes' mean answer NLL w.r.t. each linear's weight.

    Returns, per weight name, `(x, delta)` of shapes (n, in) and (n, out) such that the weight's
    gradient is `delta.T @ x`. Rows where either factor is zero (padding, tokens after the last
    answer token: no gradient flows there) are dropped, as MEND does, so they neither cost work nor
    move the normalisation statistics. Computed in eval mode on the model as it is now, or with
    `weights` (name -> tensor, treated as constants) in place of those parameters.
    """
    with torch.inference_mode(False), torch.enable_grad(), only_these_trainable(vlm.model, {}):
        batch = vlm.build_batch(probes)
        with _recording(linears) as records:
            if weights is None:
                loss = vlm.batch_loss(batch)
            else:
                constants = {name: w.detach() for name, w in weights.items()}
                loss = answer_nll(vlm.logits_with(batch, constants), batch.labels)
        leaves = [leaf for name in linears for _, leaf in records[name]]
        grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    factors: Factors = {}
    for name, module in linears.items():
        xs, deltas = [], []
        for x, leaf in records[name]:
            grad = next(grads)
            delta = torch.zeros_like(leaf) if grad is None else grad
            xs.append(x.reshape(-1, module.in_features))
            deltas.append(delta.reshape(-1, module.out_features))
        x_rows, delta_rows = torch.cat(xs), torch.cat(deltas)
        keep = (x_rows != 0).any(-1) & (delta_rows != 0).any(-1)
        factors[name] = (x_rows[keep], delta_rows[keep])
    return factors


class MEND(TrainableEditor):
    """MEND: gradient factors of chosen linear weights -> trained MLPs -> a rank-limited update.

    Args:
        targets: parameter groups whose 2-D linear weights are edited (and attached to). Default:
            the feed-forward blocks of the last three language layers, as in the reference.
        rank: rank of every residual layer of the gradient MLPs (at most `in + out`).
        n_hidden: hidden (ReLU) layers of each gradient MLP; a linear layer follows.
        input_clip: the standardised factors are clamped to this many standard deviations before
            the networks see them (None: not clamped, as in the reference). The update is linear in
            each factor, so one outlier coordinate writes a large column; in sequential editing an
            earlier edit can make a hidden unit fire hundreds of deviations above what training
            saw, and the next update then breaks the model.
        anchored: a token without gradient writes nothing (`GradientMLP.forward`): the networks'
            response to a zero output gradient is subtracted from `delta~`. Off (the reference),
            every update shares a constant rank-1 part, which sequential edits add up.
        edit_lr: the per-matrix step size every matrix starts from before training (learned).
        c_edit: weight of the edit term (NLL of the new answer on edit, rephrase and other image).
        c_loc: weight of the locality term (KL from the unedited model on unrelated questions).
        train_sequence: meta-train on sequences of this many consecutive cases of a batch: each
            case's gradient is taken on the weights the earlier ones left (functionally), and every
            case's edit and locality terms are measured after the last edit of its sequence.
            1 (the reference): every case is edited alone. Longer sequences teach the networks
            the gradients of an already edited model, which sequential editing feeds them.
        seed: initialisation seed of the networks (independent of the global RNG).
        checkpoint: a trained editor checkpoint (see `TrainableEditor`).
    """

    name = "mend"

    def __init__(
        self,
        targets: list[str] | None = None,
        rank: int = 128,
        n_hidden: int = 1,
        input_clip: float | None = None,
        anchored: bool = False,
        edit_lr: float = 1e-4,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        train_sequence: int = 1,
        seed: int = 0,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(checkpoint=checkpoint)
        if rank < 1:
            raise ValueError(f"MEND: rank must be >= 1, got {rank}")
        if n_hidden < 0:
            raise ValueError(f"MEND: n_hidden must be >= 0, got {n_hidden}")
        if input_clip is not None and not input_clip > 0:
            raise ValueError(f"MEND: input_clip must be None or > 0, got {input_clip}")
        if not edit_lr > 0:
            raise ValueError(f"MEND: edit_lr must be > 0, got {edit_lr}")
        if train_sequence < 1:
            raise ValueError(f"MEND: train_sequence must be >= 1, got {train_sequence}")
        if c_edit < 0 or c_loc < 0:
            raise ValueError(f"MEND: c_edit and c_loc must be >= 0, got {c_edit}, {c_loc}")
        self.targets = list(targets or ["ffn:-3", "ffn:-2", "ffn:-1"])
        if not self.targets:
            raise ValueError("MEND: targets is empty; name at least one parameter group, e.g. ['ffn:-1']")
        self.rank = rank
        self.n_hidden = n_hidden
        self.input_clip = input_clip
        self.anchored = anchored
        self.edit_lr = edit_lr
        self.c_edit = c_edit
        self.c_loc = c_loc
        self.train_sequence = train_sequence
        self.seed = seed
        self.nets = nn.ModuleDict()
        self.log_lrs = nn.ParameterDict()
        # Weight name -> (its shape's network, its mode there); set by build.
        self._layout: dict[str, tuple[str, int]] = {}

    def attached_groups(self) -> list[str]:
        return list(self.targets)

    def build(self, vlm: VLM) -> None:
        linears = edited_linears(vlm, self.targets)
        by_shape: dict[str, list[str]] = {}
        for name, module in linears.items():
            by_shape.setdefault(_shape_key(module.weight), []).append(name)
        self._layout = {
            name: (shape, mode) for shape, names in by_shape.items() for mode, name in enumerate(names)
        }
        device = vlm.device
        nets = {}
        for i, (shape, names) in enumerate(by_shape.items()):
            out_features, in_features = (int(d) for d in shape.split("x"))
            nets[shape] = GradientMLP(
                in_features,
                out_features,
                len(names),
                self.rank,
                self.n_hidden,
                input_clip=self.input_clip,
                seed=self.seed + 100 * i,
            )
        self.nets = nn.ModuleDict(nets).to(device)
        self.log_lrs = nn.ParameterDict(
            {
                _key(name): nn.Parameter(torch.tensor(math.log(self.edit_lr), device=device))
                for name in linears
            }
        )

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "targets": self.targets,
            "rank": self.rank,
            "n_hidden": self.n_hidden,
            "input_clip": self.input_clip,
            "anchored": self.anchored,
            "edit_lr": self.edit_lr,
            "c_edit": self.c_edit,
            "c_loc": self.c_loc,
            "train_sequence": self.train_sequence,
            "seed": self.seed,
        }

    def backbone_fingerprint(self, vlm: VLM) -> dict[str, Any]:
        # A backbone without the target groups (fewer layers than `ffn:-3` asks for) cannot be the
        # one a checkpoint was trained for: say so in one line, as for any other backbone mismatch.
        try:
            return super().backbone_fingerprint(vlm)
        except ValueError as exc:
            if self.checkpoint is None:
                raise
            raise EditorCheckpointError(
                f"editor checkpoint {self.checkpoint} was trained for another backbone: {exc}"
            ) from exc

    def load_checkpoint(self, path: str | os.PathLike[str], vlm: VLM) -> dict[str, Any]:
        """`TrainableEditor.load_checkpoint`, also refusing a file trained with another `input_clip`
        or `anchored`.

        Both change what the networks compute but no tensor's shape, so the strict shape check
        cannot catch them; the settings are read from the checkpoint's recorded description.
        """
        meta = super().load_checkpoint(path, vlm)
        described = meta.get("describe") or {}
        for setting in ("input_clip", "anchored"):
            mine = getattr(self, setting)
            trained = described.get(setting, mine)
            if trained != mine:
                self._loaded_from = None
                raise EditorCheckpointError(
                    f"editor checkpoint {path} was trained with {setting} {trained}, but this MEND has "
                    f"{setting} {mine}; set the same value in the edit config"
                )
        return meta

    # ----------------------------------------------------------------- the edit
    def linears(self, vlm: VLM) -> dict[str, nn.Linear]:
        """The edited linear layers of `vlm`, in the order `build` laid them out."""
        linears = edited_linears(vlm, self.targets)
        if linears.keys() != self._layout.keys():
            raise RuntimeError("MEND: the backbone's edited weights changed since build(); call setup(vlm)")
        return linears

    def updates(self, factors: Factors, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """What to add to each edited weight for its gradient factors (differentiable in the editor)."""
        out: dict[str, torch.Tensor] = {}
        for name, (x, delta) in factors.items():
            shape, mode = self._layout[name]
            x_new, delta_new = self.nets[shape](x, delta, mode, anchored=self.anchored)
            step = self.log_lrs[_key(name)].exp()
            update = -step * (delta_new.T @ x_new)
            out[name] = update if dtype is None else update.to(dtype)
        return out

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> WeightEditHandle:
        self.ensure_built(vlm)
        linears = self.linears(vlm)
        params = {name: module.weight for name, module in linears.items()}
        start = time.perf_counter()
        norms: list[float] = []
        # Lightning may call this under inference mode (validation, test); the snapshot and the
        # updates must be ordinary tensors.
        with torch.inference_mode(False):
            snapshot = ParameterSnapshot(params)
            try:
                for case in cases:  # in order: each case's gradient on the model the earlier ones left
                    factors = gradient_factors(vlm, linears, case.edits)
                    with torch.no_grad():
                        updates = self.updates(factors)
                        for name, update in updates.items():
                            params[name].add_(update.to(params[name].dtype))
                    norms.append(math.sqrt(sum(float(u.float().pow(2).sum()) for u in updates.values())))
            except BaseException:
                # No handle reaches the caller, so a half-written edit is undone here.
                snapshot.restore()
                raise
        stats = {"time_s": time.perf_counter() - start, "steps": len(cases), "update_norms": norms}
        return WeightEditHandle(snapshot, stats=stats)

    # ----------------------------------------------------------------- meta-training
    def training_loss(self, vlm: VLM, cases: Sequence[EditCase]) -> dict[str, torch.Tensor]:
        self.ensure_built(vlm)
        linears = self.linears(vlm)
        edit_terms, loc_terms = [], []
        for start in range(0, len(cases), self.train_sequence):
            sequence = cases[start : start + self.train_sequence]
            # The edited weights as tensors, never written into the model: the losses are functions
            # of the editor's parameters through them, and the backbone stays as it was.
            edited: dict[str, torch.Tensor] = {name: m.weight.detach() for name, m in linears.items()}
            for i, case in enumerate(sequence):
                # The gradient on the weights the earlier edits left, as `apply` takes it; its
                # factors are constants (MEND does not differentiate through the inner gradient).
                factors = gradient_factors(vlm, linears, case.edits, edited if i else None)
                # The normalisation statistics follow the training distribution of gradient
                # factors (updated before use, as in the reference, so the first batch is
                # standardised too).
                for name, (x, delta) in factors.items():
                    self.nets[self._layout[name][0]].update_stats(x, delta)
                updates = self.updates(factors)
                edited = {name: w + updates[name].to(w.dtype) for name, w in edited.items()}
            for case in sequence:
                edit_terms.append(edit_term(vlm, edited, case))
                loc = locality_term(vlm, edited, case)
                if loc is not None:
                    loc_terms.append(loc)
        loss_edit = torch.stack(edit_terms).mean()
        loss_loc = torch.stack(loc_terms).mean() if loc_terms else loss_edit.new_zeros(())
        return {
            "loss": self.c_edit * loss_edit + self.c_loc * loss_loc,
            "loss_edit": loss_edit,
            "loss_loc": loss_loc,
            "edit_lr": torch.stack([p.detach().exp() for p in self.log_lrs.values()]).mean(),
        }
