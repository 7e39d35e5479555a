"""torchmetrics `Metric` classes for the six scores, their generation twins, and `ScoreSet`.

Each score is a mean over edit cases, in percent (SPEC section 2): a probe's value comes from
`metrics.protocols`, a case's value for a kind is the mean over its probes of that kind, and the score
is the mean over cases. The states are a float64 sum and count reduced by "sum", so they accumulate
over batches, merge across DDP ranks exactly, and do not depend on how cases were split.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torchmetrics import Metric

from core.case import PROBE_KINDS

GENERATION_PREFIX = "gen_"
_HOP_KEY = re.compile(r"^(?:gen_)?port_hop(\d+)$")


class CaseMeanScore(Metric):
    """Mean of per-case values in [0, 1], reported in percent; nan when no case was seen.

    Args:
        generation: whether this is the generation twin (greedy decoding + normalised exact match)
            rather than the teacher-forced score; only changes `name`.
    """

    #: The probe kind this score averages (one of `PROBE_KINDS`).
    kind: str = ""
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, generation: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.generation = generation
        # float64: sums of many values in [0, 1] stay exact enough that DDP splits give equal means.
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def name(self) -> str:
        """Result key, e.g. ``rel`` or ``gen_rel``."""
        return (GENERATION_PREFIX if self.generation else "") + self.kind

    def update(self, values: torch.Tensor) -> None:
        """Add per-case values (any shape; each in [0, 1])."""
        values = torch.as_tensor(values, dtype=torch.float64, device=self.device).flatten()
        if values.numel() and not bool(((values >= 0) & (values <= 1)).all()):
            raise ValueError(
                f"{type(self).__name__}: per-case values must lie in [0, 1] (got {values.tolist()})"
            )
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        # 0 / 0 is nan in floating point: a score no case had reads as nan, with no host sync here.
        return 100.0 * self.total / self.count


class Reliability(CaseMeanScore):
    """Rel: edit image + edit prompt -> new answer; share of answer tokens whose argmax equals the label."""

    kind = "rel"


class TextGenerality(CaseMeanScore):
    """T-Gen: edit image + rephrased prompt -> new answer; token accuracy as for Rel."""

    kind = "t_gen"


class ImageGenerality(CaseMeanScore):
    """I-Gen (M-Gen): rephrased image + edit prompt -> new answer; token accuracy as for Rel."""

    kind = "i_gen"


class TextLocality(CaseMeanScore):
    """T-Loc: text-only unrelated prompt; agreement of post-edit with pre-edit predictions.

    Strict protocol: argmax agreement at the answer positions; MMEdit-trainer protocol: top-1
    agreement at every non-padding position.
    """

    kind = "t_loc"


class ImageLocality(CaseMeanScore):
    """I-Loc (M-Loc): unrelated image + question; agreement of post-edit with pre-edit predictions.

    Strict protocol: argmax agreement at the answer positions; MMEdit-trainer protocol: position-wise,
    rank-wise agreement of the top-10 ids at every non-padding position.
    """

    kind = "i_loc"


class Portability(CaseMeanScore):
    """Port: a question that needs the edited fact -> the answer it implies; token accuracy as for Rel.

    Args:
        hop: when set, the score over portability probes of that hop count only (key ``port_hop<h>``).
    """

    kind = "port"

    def __init__(self, generation: bool = False, hop: int | None = None, **kwargs) -> None:
        super().__init__(generation=generation, **kwargs)
        if hop is not None and hop < 1:
            raise ValueError(f"Portability: hop must be >= 1, got {hop}")
        self.hop = hop

    @property
    def name(self) -> str:
        return super().name + (f"_hop{self.hop}" if self.hop is not None else "")


#: The score class for each probe kind, in `PROBE_KINDS` order.
SCORE_CLASSES: dict[str, type[CaseMeanScore]] = {
    cls.kind: cls
    for cls in (Reliability, TextGenerality, ImageGenerality, TextLocality, ImageLocality, Portability)
}
assert tuple(SCORE_CLASSES) == PROBE_KINDS, "SCORE_CLASSES must follow PROBE_KINDS"


def case_values(
    probe_values: Mapping[str, Sequence[float]],
    port_hops: Sequence[int | None] | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Per-case values from one case's per-probe values: the mean over the case's probes of each kind.

    Args:
        probe_values: kind -> the scores of the case's probes of that kind; a kind that is missing
            or empty contributes nothing (its score is not updated by this case).
        port_hops: the hop count of each ``probe_values["port"]`` entry, in order; probes of hop h
            also give ``port_hop<h>`` (the mean over that hop's probes). None entries count only for
            ``port``.
        prefix: ``""`` for teacher-forced scores, ``"gen_"`` for the generation twins.
    """
    if prefix not in ("", GENERATION_PREFIX):
        raise ValueError(f"prefix must be '' or {GENERATION_PREFIX!r}, got {prefix!r}")
    out: dict[str, float] = {}
    for kind, values in probe_values.items():
        if kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {kind!r}; expected one of {PROBE_KINDS}")
        if values:
            out[prefix + kind] = math.fsum(values) / len(values)
    if port_hops is not None:
        port = probe_values.get("port", [])
        if len(port_hops) != len(port):
            raise ValueError(
                f"port_hops has {len(port_hops)} entries but there are {len(port)} portability values"
            )
        by_hop: dict[int, list[float]] = defaultdict(list)
        for hop, value in zip(port_hops, port, strict=True):
            if hop is not None:
                by_hop[hop].append(value)
        for hop in sorted(by_hop):
            out[f"{prefix}port_hop{hop}"] = math.fsum(by_hop[hop]) / len(by_hop[hop])
    return out


#: The scores `average` combines: edit success, generality and locality (portability is absent from
#: many benchmarks, so a tuning target that included it would not compare across them).
AVERAGED_KINDS: tuple[str, ...] = ("rel", "t_gen", "i_gen", "t_loc", "i_loc")


def average(scores: Mapping[str, float | None], prefix: str = "") -> float:
    """The mean of Rel, T-Gen, I-Gen, T-Loc and I-Loc where present (nan if none): one number to tune on."""
    values = [scores.get(prefix + k) for k in AVERAGED_KINDS]
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return math.fsum(present) / len(present) if present else math.nan


class ScoreSet(nn.Module):
    """All scores of one stage: the six teacher-forced scores, their generation twins (``gen_<kind>``),
    and per-hop portability (``port_hop<h>``, ``gen_port_hop<h>``, h = 1..max_hops).

    The metrics are registered submodules, so a LightningModule holding a `ScoreSet` moves them to its
    device and Lightning can log (and DDP-sync) each one. Every metric is created up front, whatever the
    data holds, so that every rank has the same metrics in the same order when states are synced.

    Args:
        max_hops: the largest portability hop count reported separately.
    """

    def __init__(self, max_hops: int = 4) -> None:
        super().__init__()
        if max_hops < 0:
            raise ValueError(f"max_hops must be >= 0, got {max_hops}")
        self.max_hops = max_hops
        scores: list[CaseMeanScore] = [
            cls(generation=g) for g in (False, True) for cls in SCORE_CLASSES.values()
        ]
        scores += [Portability(generation=g, hop=h) for g in (False, True) for h in range(1, max_hops + 1)]
        self.metrics = nn.ModuleDict({m.name: m for m in scores})

    case_values = staticmethod(case_values)

    def keys(self) -> list[str]:
        return list(self.metrics.keys())

    def __getitem__(self, key: str) -> CaseMeanScore:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics.keys())

    def _check_key(self, key: str) -> None:
        if key in self.metrics:
            return
        hop = _HOP_KEY.match(key)
        if hop:
            raise ValueError(
                f"score {key!r}: hop {hop.group(1)} is beyond ScoreSet(max_hops={self.max_hops})"
            )
        raise ValueError(f"unknown score {key!r}; expected one of {self.keys()}")

    def update_cases(self, cases: Sequence[Mapping[str, float]]) -> None:
        """Add several cases' values (each a `case_values`-style dict); one metric update per key."""
        grouped: dict[str, list[float]] = defaultdict(list)
        for values in cases:
            for key, value in values.items():
                self._check_key(key)
                grouped[key].append(float(value))
        for key, values in grouped.items():
            self.metrics[key].update(torch.tensor(values, dtype=torch.float64))

    def update_case(self, values: Mapping[str, float]) -> None:
        """Add one case's values, keyed like ``rel``, ``gen_rel``, ``port_hop2``, ``gen_port_hop2``."""
        self.update_cases([values])

    def compute(self) -> dict[str, float]:
        """Every score in percent, in `keys()` order; nan where no case had the probe kind."""
        with warnings.catch_warnings():
            # Absent kinds are expected (nan), not a misuse worth the "compute before update" warning.
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            # Every metric computes on every rank, even never-updated ones: compute is a collective under DDP.
            return {key: float(metric.compute()) for key, metric in self.metrics.items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def merge_state(self, other: ScoreSet) -> None:
        """Add `other`'s accumulated states into this set (what a DDP sum-reduction does)."""
        if self.keys() != other.keys():
            raise ValueError(f"cannot merge ScoreSets with different scores: {self.keys()} vs {other.keys()}")
        for key, metric in self.metrics.items():
            metric.merge_state(other.metrics[key])
