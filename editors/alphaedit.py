"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing").

MEMIT's update projected onto the null space of the preserved keys, for sequential editing. From the
preserved keys' second moment C_l = E[k k^T] (`editors/layer_stats.py`), P_l = U U^T with U the
eigenvectors of C_l whose eigenvalue is below `nullspace_threshold`: P k_0 ~= 0 for every preserved
key k_0, so any update of the form Delta P leaves their values alone. Per layer, with K1 the new
facts' keys, R the residual share (as MEMIT's) and K_p the keys of the earlier edits of the same
sequence:

    Delta W_l = R K1^T P (K_p K_p^T P + K1 K1^T P + l2 * I)^{-1}

computed as the reference does, X = (P (K_p K_p^T + K1 K1^T) + l2 I)^{-1} P K1 R^T and Delta = X^T.
For a key with P k_0 = 0 this gives Delta W k_0 = 0 exactly (solve (A^T) y = k_0: y = k_0 / l2, and
P y = 0), so the preserved keys' outputs do not move; the K_p term keeps later edits of a sequence
from undoing earlier ones. K_p starts empty at every `apply` call (one-step edits restore the model)
and grows through `extend` (lifelong editing keeps every earlier edit's keys).

Reference settings (Llama3-8B): layers 4-8, threshold 2e-2 on C's eigenvalues, l2 10, clamp 0.75,
25 steps at lr 0.1, KL factor 0.0625, 100K Wikipedia samples for C.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backbones.base import VLM
from core.case import Probe
from editors.key_values import read_at_positions
from editors.memit import MEMIT


class AlphaEdit(MEMIT):
    """AlphaEdit: MEMIT's residual spread, each layer's update in the preserved keys' null space.

    Args:
        nullspace_threshold: eigenvalues of C below this span the null space P projects onto.
        l2: the ridge on the update's solve (the reference's L2).
        **kwargs: MEMIT's options (layers, edits_per_update, target optimisation, corpus);
            `mom2_update_weight` is unused: the projection takes the place of lambda C.
    """

    def __init__(
        self, nullspace_threshold: float = 2e-2, l2: float = 10.0, name: str = "alphaedit", **kwargs
    ) -> None:
        # Listed before MEMIT's __init__, which refuses every bad setting in one message.
        self.problems = []
        if not nullspace_threshold > 0:
            self.problems.append(f"nullspace_threshold must be > 0, got {nullspace_threshold}")
        if not l2 > 0:
            self.problems.append(f"l2 must be > 0, got {l2}")
        super().__init__(name=name, **kwargs)
        self.nullspace_threshold = nullspace_threshold
        self.l2 = l2
        #: P per edited layer (non-negative index), float64 on the CPU; and its rank (null-space size).
        self.projections: dict[int, Tensor] = {}
        self.nullspace_dims: dict[int, int] = {}

    def describe(self) -> dict[str, object]:
        out = {**super().describe(), "nullspace_threshold": self.nullspace_threshold, "l2": self.l2}
        out.pop("mom2_update_weight", None)
        return out

    def after_stats(self, vlm: VLM) -> None:
        for layer, moment in self.moments.items():
            values, vectors = torch.linalg.eigh(moment.double())
            small = vectors[:, values < self.nullspace_threshold]
            self.projections[layer] = small @ small.T
            self.nullspace_dims[layer] = int(small.shape[1])

    def layer_update(
        self, layer: int, linear: nn.Linear, keys: Tensor, residual: Tensor, state: dict[str, object]
    ) -> Tensor:
        proj = self.projections[layer].to(keys.device)
        earlier = state.get(f"kp_{layer}")
        cov = keys @ keys.T + (earlier.to(keys.device) if isinstance(earlier, Tensor) else 0)
        eye = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
        x = torch.linalg.solve(proj @ cov + self.l2 * eye, proj @ keys @ residual.T)  # [d_k, width]
        return x.T

    def after_group(self, vlm: VLM, facts: list[Probe], layers: list[int], state: dict[str, object]) -> None:
        # K_p: the written facts' keys at every edited layer, read on the model as edited.
        keys, _ = read_at_positions(vlm, facts, self.key, layers, [])
        for layer in layers:
            k = keys[layer].double().T
            previous = state.get(f"kp_{layer}")
            state[f"kp_{layer}"] = (previous if isinstance(previous, Tensor) else 0) + k @ k.T
