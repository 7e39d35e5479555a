"""MEND's editor networks: the "gradient MLP" that maps a weight's gradient factors to an update.

The gradient of the loss w.r.t. a linear layer's weight `W` (out x in) is a sum of rank-1 terms,
`sum_t delta_t x_t^T`, one per token: `x_t` is the layer's input at token t and `delta_t` the
gradient of the loss w.r.t. its output there. MEND never forms that (out x in) matrix from the
network's side: it maps each pair `(x_t, delta_t)` to a new pair `(x~_t, delta~_t)` with a small
MLP and writes `sum_t delta~_t x~_t^T`, so the networks are as wide as `in + out`, not `in * out`.

What lives here (pure torch, nothing backbone-specific):

- `RunningNorm`: per-coordinate running mean and standard deviation of `x` and of `delta`, updated
  while meta-training and frozen afterwards (gradient factors span orders of magnitude across layers
  and tokens; the MLP sees them standardised), optionally clipped to a number of standard
  deviations (see `MEND.input_clip`);
- `LowRankResidual`: one layer `h + act(((h V^T) U^T + b) * scale[mode] + shift[mode])`, a low-rank map
  with identity initialisation (`U = 0`), so an untrained MEND writes the (standardised) gradient;
- `GradientMLP`: the normaliser and a stack of those layers on the concatenation `[x; delta]`
  (MEND's `combine` variant), shared by every edited matrix of one shape; which matrix is being
  edited is the `mode`, which only selects the per-layer learned scale and offset.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Standardise vectors by a running per-coordinate mean and standard deviation.

    Statistics are kept as buffers (so they are saved with the editor) and merged batch by batch
    with Chan's parallel form of Welford's update, which is exact for any batch split. Until two
    vectors have been seen the identity (mean 0, std 1) is used, so an untrained editor still works
    and every saved value is finite.

    Args:
        dim: vector width.
        clip: standardised values are clamped to [-clip, clip] (None: not clamped).
        eps: added to the standard deviation.
    """

    def __init__(self, dim: int, clip: float | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.clip = clip
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Merge the statistics of `rows` (n x dim) into the running ones."""
        if rows.shape[0] == 0:
            return
        rows = rows.detach().to(torch.float64)
        n = float(rows.shape[0])
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * (n / total)
        self.m2 += batch_m2 + diff**2 * (self.count * n / total)
        self.count.fill_(total)

    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(rows.dtype)
        out = (rows - mean) / (self.std().to(rows.dtype) + self.eps)
        return out if self.clip is None else out.clamp(-self.clip, self.clip)


class LowRankResidual(nn.Module):
    """`h + act(((h V^T) U^T + b) * scale[mode] + shift[mode])`, with `U` zero at the start.

    Args:
        dim: width of `h` (input and output).
        rank: rank of `U V^T`; at most `dim`.
        n_modes: how many matrices share this layer; each has its own `scale` and `shift`.
        activation: ReLU on the residual branch (hidden layers); the last layer is linear, so the
            network can also subtract from its input.
        seed: seed of `V`'s initialisation (the editor's weights do not depend on the global RNG).
    """

    def __init__(self, dim: int, rank: int, n_modes: int, activation: bool, seed: int = 0) -> None:
        super().__init__()
        rank = min(rank, dim)
        generator = torch.Generator().manual_seed(seed)
        # U = 0: the layer starts as the identity and the first optimiser step moves U along
        # V h, a random projection of the input (scaled so that V h has unit-size entries).
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        # MEND's per-matrix ("mode") scale and offset of the pre-activation: the one part of a shared
        # network that knows which layer it is editing.
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.activation = activation

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (h @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.scale[mode] + self.shift[mode]
        # clamp rather than relu: the same function, but a gradient of 1 at exactly 0 (MEND's choice).
        return h + (pre.clamp(min=0) if self.activation else pre)


class GradientMLP(nn.Module):
    """MEND's gradient transform for weights of one shape (out x in): (x, delta) -> (x~, delta~).

    Args:
        x_dim: the edited layer's input width (`in`).
        delta_dim: its output width (`out`).
        n_modes: how many edited matrices have this shape (one learned scale/offset each).
        rank: rank of every layer's residual map.
        n_hidden: hidden (ReLU) layers; one more, linear, layer follows.
        input_clip: standardised inputs are clamped to this many standard deviations (None: not).
        seed: initialisation seed.
    """

    def __init__(
        self,
        x_dim: int,
        delta_dim: int,
        n_modes: int,
        rank: int = 128,
        n_hidden: int = 1,
        input_clip: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.x_dim = x_dim
        self.delta_dim = delta_dim
        self.x_norm = RunningNorm(x_dim, clip=input_clip)
        self.delta_norm = RunningNorm(delta_dim, clip=input_clip)
        dim = x_dim + delta_dim
        self.layers = nn.ModuleList(
            LowRankResidual(dim, rank, n_modes, activation=i < n_hidden, seed=seed + i)
            for i in range(n_hidden + 1)
        )

    def update_stats(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        self.x_norm.update(x)
        self.delta_norm.update(delta)

    def _mlp(
        self, x_in: torch.Tensor, delta_in: torch.Tensor, mode: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([x_in, delta_in], dim=-1)
        for layer in self.layers:
            h = layer(h, mode)
        x_new, delta_new = h.split([self.x_dim, self.delta_dim], dim=-1)
        return x_new, delta_new

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor, mode: int, anchored: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map factor rows `x` (n x in) and `delta` (n x out) to new factors of the same shapes.

        `anchored`: subtract from `delta~` what the network gives for the same `x` and a zero
        output gradient, so that a token without gradient writes nothing. Without it, the
        network's constant response (its biases, the standardised zero) adds the same rank-1 term
        to every update, harmless in one edit but summed over a sequence of them.
        """
        x_in = self.x_norm(x.float())
        x_new, delta_new = self._mlp(x_in, self.delta_norm(delta.float()), mode)
        if anchored:
            zero = self.delta_norm(torch.zeros_like(delta, dtype=torch.float32))
            _, delta_zero = self._mlp(x_in, zero, mode)
            delta_new = delta_new - delta_zero
        return x_new, delta_new
