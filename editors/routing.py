"""`RoutedAnswerer`: an edited system that answers some probes with another model.

Memory-based editors (SERAC) keep the backbone as it is and answer the probes their scope classifier
deems in scope with a counterfactual model instead. A handle expresses that by returning a
`RoutedAnswerer` from `EditHandle.answerer`; the scoring loop then asks it like any backbone, and
each side still gets its probes in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from backbones.batching import ProbeAnswerer, TeacherForced
from core.case import Probe

T = TypeVar("T")


class RoutedAnswerer:
    """Answer in-scope probes with `scoped` and the others with `fallback`, results in the callers' order.

    Args:
        in_scope: decides, per probe, which side answers it (for SERAC: the scope classifier against
            the edit memory). Called once per probe and call.
        scoped: what answers in-scope probes (a counterfactual model behind the `VLM` interface).
        fallback: what answers the rest (usually the unedited backbone).
    """

    def __init__(
        self, in_scope: Callable[[Probe], bool], scoped: ProbeAnswerer, fallback: ProbeAnswerer
    ) -> None:
        self.in_scope = in_scope
        self.scoped = scoped
        self.fallback = fallback
        #: Probes answered by each side so far (results and tests read the routing off it).
        self.routed = {"scoped": 0, "fallback": 0}

    def _split(self, probes: Sequence[Probe]) -> tuple[list[int], list[int]]:
        flags = [bool(self.in_scope(p)) for p in probes]
        inside = [i for i, f in enumerate(flags) if f]
        outside = [i for i, f in enumerate(flags) if not f]
        self.routed["scoped"] += len(inside)
        self.routed["fallback"] += len(outside)
        return inside, outside

    def teacher_forced(self, probes: Sequence[Probe], all_topk: int = 0) -> list[TeacherForced]:
        inside, outside = self._split(probes)
        return _merge(
            len(probes),
            (inside, self.scoped.teacher_forced([probes[i] for i in inside], all_topk) if inside else []),
            (
                outside,
                self.fallback.teacher_forced([probes[i] for i in outside], all_topk) if outside else [],
            ),
        )

    def generate(
        self, probes: Sequence[Probe], teacher_forced: Sequence[TeacherForced] | None = None
    ) -> list[str]:
        inside, outside = self._split(probes)

        def run(side: ProbeAnswerer, idx: list[int]) -> list[str]:
            if not idx:
                return []
            tf = [teacher_forced[i] for i in idx] if teacher_forced is not None else None
            return side.generate([probes[i] for i in idx], teacher_forced=tf)

        return _merge(len(probes), (inside, run(self.scoped, inside)), (outside, run(self.fallback, outside)))


def _merge(n: int, *parts: tuple[list[int], list[T]]) -> list[T]:
    out: list[T | None] = [None] * n
    for idx, results in parts:
        for i, result in zip(idx, results, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]
