"""Training losses over fixed probes, made cheap to repeat: what gradient-based editors ask the backbone for.

An editor that optimises a few tensors on the same probes many times (FT, MEND's inner gradient,
T-Patcher's neurons, UniKE's intrinsic half) asks `VLM.training_loss(trained)` once per edit call
and `.over(probes)` once per case, and calls the closure it gets at every step. Behind that call the
backbone picks the exact speed-ups the trained tensors allow, without the editor knowing of them:

- every trained tensor lies in the language layers from some layer i up (or in the final norm and
  lm_head): everything below layer i runs once per case and only the layers from i are replayed per
  step (`frozen_prefix`); frozen parts of the replayed layers whose inputs do not change (layer i's
  attention when only its MLP trains) run once too (`frozen_vision.reuse_frozen_outputs`);
- otherwise (a projector or vision target) the probes are tokenised and preprocessed once, and the
  frozen modules below the language model (the vision tower) hand back their first output.

The losses and the edited weights are bit-identical to running the whole model at every step
(`tests/test_frozen_prefix.py`, `tests/test_frozen_vision.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from backbones.batching import BatchingBackbone, ProbeBatch
from backbones.frozen_prefix import PrefixCachedLoss, first_trained_layer
from backbones.frozen_vision import FrozenOutputMemo, reuse_frozen_outputs
from core.case import Probe


class TrainableBackbone(BatchingBackbone, Protocol):
    """The rest of what `TrainingLoss` needs of a backbone (all of it is on `backbones.base.VLM`)."""

    def batch_loss(self, batch: ProbeBatch) -> torch.Tensor: ...
    def vision_modules(self) -> list[nn.Module | nn.Parameter]: ...
    def projector_modules(self) -> list[nn.Module | nn.Parameter]: ...


@dataclass
class LossClosure:
    """The mean answer NLL of fixed probes, one call per optimisation step.

    `replayed_from_layer`: the first language layer run per step (None: the whole model runs).
    `frozen_outputs_reused`: calls of frozen modules answered from their first output so far.
    """

    loss: Callable[[], torch.Tensor]
    replay: PrefixCachedLoss | None = None
    memos: list[FrozenOutputMemo] = field(default_factory=list)

    def __call__(self) -> torch.Tensor:
        return self.loss()

    @property
    def replayed_from_layer(self) -> int | None:
        # Read after the steps: the replay turns itself off when its first-call check fails.
        return self.replay.first_layer if self.replay is not None and self.replay.cached else None

    @property
    def frozen_outputs_reused(self) -> int:
        return sum(m.hits for m in self.memos)


class TrainingLoss:
    """Loss closures over probes for one set of trained tensors (decided once, reused for every case).

    Args:
        vlm: the backbone.
        trained: the tensors the caller will optimise; nothing else may change while a closure lives.
        reuse_frozen: use the speed-ups above; False always runs the whole model.
    """

    def __init__(
        self, vlm: TrainableBackbone, trained: Iterable[nn.Parameter], reuse_frozen: bool = True
    ) -> None:
        self.vlm = vlm
        self.reuse_frozen = reuse_frozen
        # Decided once from the trained tensors: the frozen part stays frozen for every case.
        self.first_layer = first_trained_layer(vlm, trained) if reuse_frozen else None

    @contextlib.contextmanager
    def over(self, probes: Sequence[Probe]) -> Iterator[LossClosure]:
        """A closure for `probes` on the model as it is now; valid inside the block only.

        Each call builds its own cache, so a sequence of edits caches each case on the model as the
        earlier cases left it.
        """
        vlm = self.vlm
        cached = PrefixCachedLoss(vlm, probes, self.first_layer) if self.first_layer is not None else None
        if cached is not None:
            loss: Callable[[], torch.Tensor] = cached
            # Frozen parts inside the replayed layers see the same inputs at every step.
            watch: list[nn.Module | nn.Parameter] = list(cached.layers)
        else:
            # Tokenised and preprocessed once: every step sees the same tensors, which is also what
            # lets frozen vision modules hand back their features.
            batch = vlm.build_batch(probes)
            loss = lambda: vlm.batch_loss(batch)  # noqa: E731
            watch = vlm.vision_modules() + vlm.projector_modules() if self.reuse_frozen else []
        with reuse_frozen_outputs(watch) as memos:
            yield LossClosure(loss, cached, memos)
