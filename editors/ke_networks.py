"""KnowledgeEditor's networks: the edit encoder and the gradient-conditioned update of one weight.

KE (De Cao, Aziz, Titov, EMNLP 2021) predicts a weight update from the gradient of the edit's loss,
gated by quantities conditioned on an encoding of the edit. For a weight matrix W (rows x cols) with
gradient G = dL_edit/dW and a condition vector c:

    alpha = mean_k  (rows * softmax(rho_k(c))) (x) (1 + kappa_k(c))      rank-`rank` gate, rows x cols
    beta  = mean_k  (rows * softmax(rho'_k(c))) (x) kappa'_k(c)          rank-`rank` offset, rows x cols
    eta   = eta(c)                                                      one scalar
    delta W = -scale * sigmoid(eta) * (alpha * G + beta)                (elementwise)

as in the paper (`delta W = sigma(eta) * (alpha (.) grad + beta)`, with the reference code's row
softmax times a column vector for each low-rank factor). Two choices differ from the reference on
purpose, so that an untrained editor already makes a sensible edit (the world is small and training
time is short):

- the heads' last layers start at zero, so at initialisation alpha = 1, beta = 0 and eta = 0; with
  `scale = 2 * init_lr` the first edit is exactly one gradient-descent step of size `init_lr`, and
  training learns where to deviate from it (the reference starts from random gates);
- `scale` (the reference's fixed `max_scale`) is learned, as a log, per edited tensor, and the
  minus sign is written out, so alpha > 0 means "descend"; the reference leaves the sign to alpha.

A 1-D tensor (a bias) gets elementwise gates: alpha = 1 + kappa(c), beta = kappa'(c).

The condition vector comes from `EditEncoder`: the frozen backbone's own hidden states of the edit
(its image and prompt, the new answer, the old answer), not a separate LSTM over tokens as in the
paper: they see the image, which a text encoder could not, and cost no extra embedding table.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class EditEncoder(nn.Module):
    """Condition vector from the backbone's features of an edit: LayerNorm -> Linear -> tanh.

    Args:
        feature_dim: size of the features (`KnowledgeEditor` passes 3 x the backbone's hidden size:
            the state that predicts the answer, the mean state over the new answer's tokens, and
            the mean state over the old answer's tokens).
        cond_dim: size of the condition vector every update head reads.
    """

    def __init__(self, feature_dim: int, cond_dim: int) -> None:
        super().__init__()
        # The backbone's residual stream is not normalised (it reaches the final norm afterwards);
        # its scale differs between models and positions, so it is normalised before the projection.
        self.norm = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(feature_dim, cond_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.norm(features)))


class ConditionedUpdate(nn.Module):
    """The update of one backbone tensor from its edit gradient, gated by the edit's condition.

    Args:
        shape: the edited tensor's shape (2-D weight or 1-D bias).
        cond_dim: size of the condition vector.
        hidden_dim: width of the head's hidden layer.
        rank: rank of the alpha and beta gates of a matrix (the paper: 1).
        init_lr: step size of the gradient-descent step the untrained head makes.
    """

    def __init__(
        self, shape: torch.Size | tuple[int, ...], cond_dim: int, hidden_dim: int, rank: int, init_lr: float
    ) -> None:
        super().__init__()
        if len(shape) not in (1, 2):
            raise ValueError(
                f"ConditionedUpdate: only 1-D and 2-D tensors can be edited, got shape {tuple(shape)}"
            )
        if rank < 1:
            raise ValueError(f"ConditionedUpdate: rank must be >= 1, got {rank}")
        if not init_lr > 0:
            raise ValueError(f"ConditionedUpdate: init_lr must be > 0, got {init_lr}")
        self.shape = tuple(int(s) for s in shape)
        self.rank = rank
        if len(self.shape) == 2:
            rows, cols = self.shape
            # alpha's and beta's row and column factors, then eta.
            self.splits = [rank * rows, rank * cols, rank * rows, rank * cols, 1]
        else:
            (n,) = self.shape
            self.splits = [n, n, 1]
        self.hidden = nn.Linear(cond_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, sum(self.splits))
        # Zero start: alpha = 1, beta = 0, eta = 0 whatever the condition (see the module docstring).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # sigmoid(0) = 1/2, so twice the step size makes the untrained update a step of `init_lr`.
        self.log_scale = nn.Parameter(torch.tensor(math.log(2.0 * init_lr)))

    def gates(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha and beta (shaped like the tensor) and eta (a scalar) for one condition vector."""
        raw = self.out(torch.tanh(self.hidden(cond)))
        if len(self.shape) == 1:
            kappa_a, kappa_b, eta = raw.split(self.splits, dim=-1)
            return 1.0 + kappa_a, kappa_b, eta.squeeze(-1)
        rows, cols = self.shape
        rho_a, kappa_a, rho_b, kappa_b, eta = raw.split(self.splits, dim=-1)
        # A row softmax scaled by the row count is 1 on every row at zero logits: the gate's mean
        # over rows stays 1 however training moves it, so alpha changes the step's shape, and the
        # learned scale its size.
        row_a = rows * rho_a.view(self.rank, rows).softmax(-1)
        row_b = rows * rho_b.view(self.rank, rows).softmax(-1)
        alpha = torch.einsum("kr,kc->rc", row_a, 1.0 + kappa_a.view(self.rank, cols)) / self.rank
        beta = torch.einsum("kr,kc->rc", row_b, kappa_b.view(self.rank, cols)) / self.rank
        return alpha, beta, eta.squeeze(-1)

    def forward(self, cond: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The update to add to the tensor (float32, shaped like `grad`); differentiable in the head."""
        alpha, beta, eta = self.gates(cond)
        return -self.log_scale.exp() * torch.sigmoid(eta) * (alpha * grad.float() + beta)
