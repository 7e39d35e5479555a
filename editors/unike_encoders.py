"""UniKE's knowledge encoders (Section 3.3): the semantic and truthfulness spaces, and W_zeta.

Per edited language layer l there are three learned maps:

- `Enc_Sem_l` (`semantic`): h_pos / h_neg -> the space of the raw semantic states h_sem. Eq. 5 pulls
  Enc_Sem(h_pos,i) and Enc_Sem(h_neg,i) towards h_sem,i and away from the other triplets' encodings;
  at edit time alpha = cos(Enc_Sem(h_know), h_input[-1]) (Eq. 7) says how relevant retrieved knowledge
  is. It is residual (h + MLP(h), the MLP's last layer starting at zero), so it starts as the identity:
  before training, Eq. 5 compares raw states, which already share the question's prefix.
- `Enc_Tru_l` (`truthful`): h_pos / h_neg -> a small truthfulness space where, by Eq. 4, every positive
  is close to the positives and every negative to the negatives, whatever the question.
- `W_zeta_l` (`zeta_map`): a linear map from the truthfulness space back to the representation space:
  zeta' = W_zeta(mean Enc_Tru(h_pos) - mean Enc_Tru(h_neg)) is the truthful editing direction added to
  the new FFN values (Eq. 6). The paper calls W_zeta learnable but does not say how it is trained.
  Here it is fitted by least squares to send truthfulness-space differences back to representation-
  space differences, W_zeta(Enc_Tru(h_pos) - Enc_Tru(h_neg)) ~ h_pos - h_neg, with the gradient stopped
  into Enc_Tru (`zeta_loss`): the truthfulness space is shaped by Eq. 4 alone, and W_zeta learns to read
  it back in units of the states the FFN adds to.

The losses (`truthfulness_loss`, `semantic_loss`, `zeta_loss`) are the training objective of
`lightning_modules.encoder_training.EncoderTraining`. Checkpoints are safetensors editor checkpoints
(`editors/checkpoint.py`) whose backbone key holds the fingerprint and weights digest of the backbone the
states came from; `load_encoders` refuses another backbone in one line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from backbones.base import VLM
from editors.checkpoint import EditorCheckpointError, load_editor_checkpoint, save_editor_checkpoint
from knowledge.states import KnowledgeStates
from knowledge.store import backbone_key

#: The editor name in the checkpoint's metadata.
ENCODERS_NAME = "KnowledgeEncoders"


def _mlp(d_in: int, width: int, d_out: int, depth: int) -> nn.Sequential:
    """`depth` linear layers with GELU between them."""
    dims = [d_in] + [width] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """h + MLP(h), starting as the identity (last layer zero)."""

    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.mlp = mlp
        last = mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(h)


class KnowledgeEncoders(nn.Module):
    """One semantic encoder, one truthfulness encoder and one W_zeta per edited layer.

    Args:
        hidden_size: the backbone's hidden width (the states' width).
        layers: the layers the states were taken at (the ints as stored, e.g. `[-4, -3, -2, -1]`).
        truth_dim: width of the truthfulness space.
        width: hidden width of the MLPs.
        depth: linear layers per MLP (>= 1).
        num_layers: the backbone's language-layer count, if known: then a layer may also be named by
            its other index (3 for -1 of a 4-layer model). `load_encoders` sets it.
    """

    def __init__(
        self,
        hidden_size: int,
        layers: Sequence[int],
        truth_dim: int = 64,
        width: int = 256,
        depth: int = 2,
        *,
        num_layers: int | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or truth_dim < 1 or width < 1 or depth < 1:
            raise ValueError(
                f"KnowledgeEncoders: hidden_size, truth_dim, width and depth must be >= 1, got "
                f"{hidden_size}, {truth_dim}, {width}, {depth}"
            )
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"KnowledgeEncoders: layers must be distinct and not empty, got {list(layers)}")
        self.hidden_size = hidden_size
        self.layers = [int(layer) for layer in layers]
        self.truth_dim = truth_dim
        self.width = width
        self.depth = depth
        self.num_layers = num_layers
        self.sem = nn.ModuleDict(
            {
                self._name(layer): _Residual(_mlp(hidden_size, width, hidden_size, depth))
                for layer in self.layers
            }
        )
        self.tru = nn.ModuleDict(
            {self._name(layer): _mlp(hidden_size, width, truth_dim, depth) for layer in self.layers}
        )
        self.w_zeta = nn.ModuleDict(
            {self._name(layer): nn.Linear(truth_dim, hidden_size, bias=False) for layer in self.layers}
        )

    @staticmethod
    def _name(layer: int) -> str:
        return f"layer{layer}"

    def _key(self, layer: int) -> str:
        """The module key of `layer`, also when named by its other index (needs `num_layers`)."""
        if layer in self.layers:
            return self._name(layer)
        if self.num_layers is not None:
            for known in self.layers:
                if (
                    known % self.num_layers == layer % self.num_layers
                    and -self.num_layers <= layer < self.num_layers
                ):
                    return self._name(known)
        raise KeyError(
            f"KnowledgeEncoders have no encoders for layer {layer}; they cover layers {self.layers}"
        )

    def config(self) -> dict[str, Any]:
        """What rebuilds the same modules (stored in checkpoints)."""
        return {
            "hidden_size": self.hidden_size,
            "layers": self.layers,
            "truth_dim": self.truth_dim,
            "width": self.width,
            "depth": self.depth,
        }

    # ----------------------------------------------------------------- the three maps
    def semantic(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Enc_Sem: `[..., hidden_size]` -> `[..., hidden_size]`, into the space of the raw h_sem."""
        return self.sem[self._key(layer)](h)

    def truthful(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Enc_Tru: `[..., hidden_size]` -> `[..., truth_dim]`."""
        return self.tru[self._key(layer)](h)

    def zeta_map(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """W_zeta: truthfulness space `[..., truth_dim]` -> representation space `[..., hidden_size]`."""
        return self.w_zeta[self._key(layer)](z)

    @torch.no_grad()
    def zeta(self, layer: int, states: KnowledgeStates) -> torch.Tensor:
        """zeta' = W_zeta(mean Enc_Tru(h_pos) - mean Enc_Tru(h_neg)) over all `states`, `[hidden_size]`.

        The truthful editing direction of Eq. 6, a constant for the editor (no gradient).
        """
        if not states.neg:
            raise ValueError("KnowledgeEncoders.zeta needs negative states; these KnowledgeStates have none")
        device = next(self.parameters()).device
        pos = self.truthful(layer, _states_at(states.pos, layer, self).to(device)).mean(0)
        neg = self.truthful(layer, _states_at(states.neg, layer, self).to(device)).mean(0)
        return self.zeta_map(layer, pos - neg)


def _states_at(states: dict[int, torch.Tensor], layer: int, encoders: KnowledgeEncoders) -> torch.Tensor:
    """`states[layer]`, also when the states name the layer by its other index."""
    if layer in states:
        return states[layer]
    name = encoders._key(layer)
    for known in states:
        if encoders._name(known) == name:
            return states[known]
    raise KeyError(f"the knowledge states hold layers {sorted(states)}, not {layer}")


# --------------------------------------------------------------------- losses (Eq. 4, Eq. 5, W_zeta)
def truthfulness_loss(
    pos: torch.Tensor, neg: torch.Tensor, temperature: float = 1.0, include_self: bool = True
) -> torch.Tensor:
    """Eq. 4 on a batch of truthfulness representations `pos`, `neg` `[n, d]`, averaged over the batch.

    For each pos_i: -log( sum_{h in H_pos} exp(s(pos_i, h)) / sum_{h in H_pos and H_neg} exp(s(pos_i, h)) ),
    and the same for each neg_i with H_neg in the numerator; s is cosine similarity / `temperature`.
    The sums run over the whole batch as the equation writes them, pos_i itself included
    (`include_self=False` leaves it out of both sums, as supervised contrastive losses usually do).
    Averaged rather than summed over i: the same minimiser, with a scale that does not grow with n.
    """
    if pos.shape != neg.shape or pos.dim() != 2:
        raise ValueError(
            f"truthfulness_loss needs pos and neg of one shape [n, d], got {pos.shape}, {neg.shape}"
        )
    n = pos.shape[0]
    both = F.normalize(torch.cat([pos, neg]), dim=-1)
    sim = both @ both.T / temperature
    if not include_self:
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    same = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=sim.device)
    same[:n, :n] = True
    same[n:, n:] = True
    numerator = torch.logsumexp(sim.masked_fill(~same, float("-inf")), dim=1)
    denominator = torch.logsumexp(sim, dim=1)
    # Per i: the pos_i term plus the neg_i term, as in the equation's sum.
    return 2 * (denominator - numerator).mean()


def semantic_loss(
    sem: torch.Tensor, pos_sem: torch.Tensor, neg_sem: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Eq. 5 on a batch: raw h_sem `[n, H]` against Enc_Sem(h_pos), Enc_Sem(h_neg) `[n, H]`, averaged over i.

    -log( (exp s(sem_i, pos_i) + exp s(sem_i, neg_i)) / (sum_j exp s(sem_i, pos_j) + sum_j exp s(sem_i, neg_j)) ),
    s = cosine similarity / `temperature`.
    """
    if not sem.shape == pos_sem.shape == neg_sem.shape or sem.dim() != 2:
        raise ValueError(
            f"semantic_loss needs three [n, H] tensors, got {sem.shape}, {pos_sem.shape}, {neg_sem.shape}"
        )
    q = F.normalize(sem, dim=-1)
    to_pos = q @ F.normalize(pos_sem, dim=-1).T / temperature
    to_neg = q @ F.normalize(neg_sem, dim=-1).T / temperature
    own = torch.stack([to_pos.diagonal(), to_neg.diagonal()], 1)
    return (torch.logsumexp(torch.cat([to_pos, to_neg], 1), 1) - torch.logsumexp(own, 1)).mean()


def zeta_loss(encoders: KnowledgeEncoders, layer: int, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Least squares for W_zeta: W_zeta(Enc_Tru(h_pos) - Enc_Tru(h_neg)) ~ h_pos - h_neg, mean over elements.

    The truthfulness difference is detached: this loss trains W_zeta only.
    """
    diff = (encoders.truthful(layer, pos) - encoders.truthful(layer, neg)).detach()
    return F.mse_loss(encoders.zeta_map(layer, diff), pos - neg)


# --------------------------------------------------------------------- checkpoints
def save_encoders(
    path: str | os.PathLike[str],
    encoders: KnowledgeEncoders,
    backbone: dict[str, Any],
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write the encoders as a safetensors editor checkpoint for the backbone described by `backbone`.

    `backbone` is `knowledge.store.backbone_key(vlm)` of the backbone the training states came from
    (the states folder's key holds it), so no backbone need be loaded to export.
    """
    meta = {
        "editor": ENCODERS_NAME,
        "backbone": backbone,
        "encoders": encoders.config(),
        **(extra_meta or {}),
    }
    return save_editor_checkpoint(path, encoders.state_dict(), meta)


def load_encoders(path: str | os.PathLike[str], vlm: VLM) -> KnowledgeEncoders:
    """The encoders stored at `path`, refused in one line when trained on another backbone's states.

    Another backbone means other sizes or other weights (`knowledge.store.backbone_key`): the states,
    and so the spaces, of a same-shaped model with other weights are not these.
    """
    tensors, meta = load_editor_checkpoint(path, backbone_key(vlm), editor=ENCODERS_NAME)
    config = meta.get("encoders")
    if not isinstance(config, dict):
        raise EditorCheckpointError(f"encoder checkpoint {path} has no 'encoders' settings in its metadata")
    encoders = KnowledgeEncoders(**config, num_layers=vlm.num_language_layers)
    try:
        encoders.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise EditorCheckpointError(
            f"encoder checkpoint {path} does not match its own settings: {exc}"
        ) from exc
    encoders.to(vlm.device).eval()
    return encoders
