"""MEMIT (Meng et al., ICLR 2023, "Mass-Editing Memory in a Transformer").

The update is spread over several consecutive FFN value projections (`layers`, the "critical"
layers), and many facts can be written in one update (batch editing). For a group of facts:

1. z_i: the hidden state at the LAST edited layer's output, at fact i's key position, that makes the
   model give the new answer (`optimise_targets` on that decoder layer's output; MEMIT's clamp 0.75);
2. for each edited layer l in order (earlier layers already updated): the facts' keys K [d_k, n]
   there, the residual R = (z - h_L) / (layers left), h_L the last edited layer's current output, and

       Delta W_l = R K^T (lambda C_l + K K^T)^{-1}

   (the least-squares solution that writes the residual's share for the new keys while keeping
   lambda-weighted C_l, the preserved keys' second moment, in place).

`edits_per_update` sets the group: 1 writes a sequence's facts one after another (sequential
editing, each on the model the earlier ones left); None writes all facts of one `apply` (or `extend`)
call in one update (MEMIT's batch editing: K cases of a sequential run as one batch).

Reference settings (GPT-2 XL): layers 13-17, lambda (mom2_update_weight) 20000, clamp 0.75, 20
steps at lr 0.5, KL factor 0.0625, C over 100K Wikipedia samples (GPT-J: layers 3-8, lambda 15000).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backbones.base import VLM
from core.case import Probe
from editors.key_values import optimise_targets, read_at_positions
from editors.locate_edit import LocateThenEdit, add_to_weight


class MEMIT(LocateThenEdit):
    """MEMIT: facts written into several FFN value projections, the residual spread over them.

    Args:
        layers: the edited language layers (negative: from the last); z is optimised at the output
            of the last of them.
        mom2_update_weight: lambda, the weight of the preserved keys' second moment C.
        edits_per_update: facts per update; None: all the facts of one `apply` call together.
        clamp_norm: ||z - h|| <= clamp_norm * ||h|| (MEMIT 0.75; ROME's 4 is the shared default).
        **kwargs: the shared options of `editors.locate_edit.LocateThenEdit`.
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        mom2_update_weight: float = 20000.0,
        edits_per_update: int | None = 1,
        clamp_norm: float = 0.75,
        name: str = "memit",
        **kwargs,
    ) -> None:
        super().__init__(name=name, clamp_norm=clamp_norm, **kwargs)
        self.layers = [-2, -1] if layers is None else list(layers)
        self.mom2_update_weight = mom2_update_weight
        self.edits_per_update = edits_per_update
        problems = []
        if not self.layers:
            problems.append("layers is empty; name at least one language layer")
        if not mom2_update_weight >= 0:
            problems.append(f"mom2_update_weight must be >= 0, got {mom2_update_weight}")
        if edits_per_update is not None and edits_per_update < 1:
            problems.append(f"edits_per_update must be >= 1 or None, got {edits_per_update}")
        self.refuse_problems(problems)

    def edited_layers(self) -> list[int]:
        return self.layers

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "layers": self.layers,
            "mom2_update_weight": self.mom2_update_weight,
            "edits_per_update": self.edits_per_update,
        }

    def edit_units(self, cases):  # type: ignore[override]
        if self.edits_per_update is None and len(cases) > 1:
            # Batch editing: the facts of every case of one apply (or extend) call in one update.
            return [_Merged(cases)]
        return cases

    def write(self, vlm: VLM, facts: Sequence[Probe], state: dict[str, object]) -> dict[str, object]:
        size = len(facts) if self.edits_per_update is None else self.edits_per_update
        groups = [list(facts[i : i + size]) for i in range(0, len(facts), size)]
        return {"updates": [self.write_group(vlm, group, state) for group in groups]}

    def write_group(self, vlm: VLM, facts: list[Probe], state: dict[str, object]) -> dict[str, object]:
        layers = self.layer_indices(vlm)
        last = vlm.language_layers()[layers[-1]]
        init, delta, stats = optimise_targets(vlm, facts, self.key, last, self.targets)
        z = (init + delta).double()
        norms = []
        for i, layer in enumerate(layers):
            linear = vlm.ffn_ports(layer).value_linear
            keys, (h_last,) = read_at_positions(vlm, facts, self.key, [layer], [last])
            k = keys[layer].double().T  # [d_k, n]
            residual = (z - h_last.double()).T / (len(layers) - i)  # [width, n]
            update = self.layer_update(layer, linear, k, residual, state)
            add_to_weight(linear, update)
            norms.append(float(update.norm()))
        self.after_group(vlm, facts, layers, state)
        return {**stats, "z_shift_norm": float(delta.norm()), "update_norms": norms}

    def layer_update(
        self, layer: int, linear: nn.Linear, keys: Tensor, residual: Tensor, state: dict[str, object]
    ) -> Tensor:
        """MEMIT's Delta W = R K^T (lambda C + K K^T)^{-1}, [out, in] in float64."""
        moment = self.moments[layer].to(keys.device).double()
        adj = torch.linalg.solve(self.mom2_update_weight * moment + keys @ keys.T, keys)  # [d_k, n]
        return residual @ adj.T

    def after_group(self, vlm: VLM, facts: list[Probe], layers: list[int], state: dict[str, object]) -> None:  # noqa: B027
        """What a subclass keeps after a group is written (AlphaEdit: the new keys)."""


class _Merged:
    """Several cases as one for batch editing: their facts in order, named by the first case."""

    def __init__(self, cases: Sequence) -> None:
        self.case_id = "+".join(c.case_id for c in cases)
        self.edits = [p for c in cases for p in c.edits]
