"""The `Editor` interface: `apply(vlm, cases) -> EditHandle`, and `handle.restore()` bit for bit.

An editor may change weights, wrap modules, keep a memory or only change the context a probe is
asked in. The handle is how the evaluation loop sees the edited system:

- `prepare(probes)` returns the probes as the edited system should be asked them (in-context
  methods add their context there);
- `answerer(vlm)` is what answers them, teacher-forced and greedy: the backbone itself by default,
  or an object that sends some probes elsewhere (SERAC's counterfactual model for in-scope probes,
  `editors/routing.py`);
- `restore()` puts every tensor back exactly, so the next case starts from the original model.

`Editor.side_by_side` says whether several one-step edits may be live at once, so that the loop
scores their cases in shared forward passes. Editors are plain torch: no Lightning here.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from backbones.base import VLM
from backbones.batching import ProbeAnswerer
from core.case import EditCase, Probe


class EditHandle:
    """The edited state of one `apply` call. The base handle changes no probe and restores nothing.

    `stats` holds what the editor measured while editing (steps used, final loss, time), so the
    evaluation loop can record it next to the scores without knowing the method.
    """

    def __init__(self, stats: dict[str, object] | None = None) -> None:
        self.stats: dict[str, object] = dict(stats) if stats else {}

    def prepare(self, probes: Sequence[Probe]) -> list[Probe]:
        return list(probes)

    def answerer(self, vlm: VLM) -> ProbeAnswerer:
        """What answers this edit's (prepared) probes; probes of handles with the same answerer share passes."""
        return vlm

    def restore(self) -> None:
        return None


class ParameterSnapshot:
    """Copies of exactly the tensors an editor is about to touch, and their `requires_grad` flags.

    Restoring copies the saved values back in place (`copy_`), so tensors keep their identity and
    storage and the model is bit-identical afterwards, without a deep copy of the whole model.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        if not params:
            raise ValueError("ParameterSnapshot: no parameters selected; check the editor's target groups")
        self.params = params
        self.saved = {name: p.detach().clone() for name, p in params.items()}
        self.requires_grad = {name: p.requires_grad for name, p in params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.saved[name])
            p.requires_grad_(self.requires_grad[name])
            p.grad = None


class WeightEditHandle(EditHandle):
    """Handle for editors that change weights in place: restoring puts the snapshot back."""

    def __init__(
        self,
        snapshot: ParameterSnapshot,
        extra: Iterable[EditHandle] = (),
        stats: dict[str, object] | None = None,
    ) -> None:
        super().__init__(stats)
        self.snapshot = snapshot
        self.extra = list(extra)

    def restore(self) -> None:
        for handle in reversed(self.extra):
            handle.restore()
        self.snapshot.restore()


class Editor(abc.ABC):
    """An editing method. `apply` edits the cases in order (K = 1 for one-step editing)."""

    #: A short name recorded in results.
    name: str = "editor"
    #: Whether several one-step edits of this editor may be live at the same time without seeing
    #: each other: true when an edit lives only in its handle (a context, a memory, a router), false
    #: when it changes what the model computes for every probe (weights, hooks, added neurons). When
    #: true, the loop applies a batch's one-step edits together and scores all their probes in
    #: shared forward passes (grouped by `EditHandle.answerer`).
    side_by_side: bool = False

    @abc.abstractmethod
    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> EditHandle:
        """Write the edits of `cases` (each case's `edits`, in order) and return a restorable handle."""

    def setup(self, vlm: VLM) -> None:  # noqa: B027 - optional hook, most editors need nothing
        """Called once before the first edit (load checkpoints, build retrieval indices)."""

    def describe(self) -> dict[str, object]:
        """The editor's settings, recorded next to the results."""
        return {"name": self.name, "class": type(self).__name__}
