"""ROME (Meng et al., NeurIPS 2022, "Locating and Editing Factual Associations in GPT").

One FFN value projection W (layer `layer`, `vlm.ffn_ports(layer).value_linear`) gets a rank-one
update per fact. With k* the key (W's input) at the fact's key position, v* the value that makes the
model give the new answer there (`editors.key_values.optimise_targets` at W's output: answer NLL +
essence KL + weight decay, norm clamp), and C = E[k k^T] over a corpus (`editors/layer_stats.py`):

    u = C^{-1} k*,    Delta W = (v* - W k* - b) u^T / (u^T k*)

so (W + Delta W) k* + b = v* exactly, while keys orthogonal to k* in the C^{-1} metric are untouched
(the solution of min ||Delta W K|| subject to the new association). In a sequence every fact is
written on the model the earlier ones left (ROME's own sequential use), k* and v* recomputed there.

Reference settings (GPT-2 XL, CounterFact): layer 17 of 48 (chosen by causal tracing), key at the
subject's last token, 20 Adam steps at lr 0.5, weight decay 0.5, clamp 4, KL factor 0.0625, C
over 100K Wikipedia samples. Here the subject of a multimodal fact is its picture, so the default
key is the last image token; the world config says which layer and position validation chose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backbones.base import VLM
from core.case import Probe
from editors.key_values import optimise_targets, read_at_positions
from editors.locate_edit import LocateThenEdit, add_to_weight, value_of


class ROME(LocateThenEdit):
    """ROME: a rank-one update of one FFN value projection per fact.

    Args:
        layer: the edited language layer (negative: from the last).
        mom2_adjustment: use C^{-1} k* as the update direction (ROME); False uses k* itself (the
            paper's ablation without the covariance).
        **kwargs: the shared options of `editors.locate_edit.LocateThenEdit` (the statistics corpus
            `memory_file`, `position`, the target optimisation).
    """

    layer_option = "layer"

    def __init__(self, layer: int = -1, mom2_adjustment: bool = True, name: str = "rome", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.layer = layer
        self.mom2_adjustment = mom2_adjustment
        self.refuse_problems()

    def edited_layers(self) -> list[int]:
        return [self.layer]

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "layer": self.layer, "mom2_adjustment": self.mom2_adjustment}

    def write(self, vlm: VLM, facts: Sequence[Probe], state: dict[str, object]) -> dict[str, object]:
        (layer,) = self.layer_indices(vlm)
        linear = vlm.ffn_ports(layer).value_linear
        stats: dict[str, object] = {"facts": []}
        for fact in facts:
            _, delta, target_stats = optimise_targets(vlm, [fact], self.key, linear, self.targets)
            keys, _ = read_at_positions(vlm, [fact], self.key, [layer], [])
            k = keys[layer][0].double()
            # The target is the value before the edit plus the optimised shift; the residual is taken
            # against W k* + b computed here, so the written association is exact.
            target = value_of(linear, k.unsqueeze(0))[0] + delta[0].double()
            update, rank_one = rome_update(linear, k, target, self.moments[layer], self.mom2_adjustment)
            add_to_weight(linear, update)
            stats["facts"].append({**target_stats, "delta_norm": float(delta.norm()), **rank_one})  # type: ignore[union-attr]
        return stats


def rome_update(
    linear: torch.nn.Linear,
    key: torch.Tensor,
    target: torch.Tensor,
    moment: torch.Tensor,
    mom2_adjustment: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ROME's closed form: Delta W = (v* - W k - b) u^T / (u^T k), u = C^{-1} k (float64, [out, in])."""
    k = key.double()
    if mom2_adjustment:
        u = torch.linalg.solve(moment.to(k.device).double(), k)
    else:
        u = k
    residual = target.double() - value_of(linear, k.unsqueeze(0))[0]
    denom = u @ k
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise ValueError(f"ROME: u^T k* is {float(denom)}: the key's statistics are degenerate")
    update = torch.outer(residual, u) / denom
    return update, {"residual_norm": float(residual.norm()), "u_dot_k": float(denom)}
