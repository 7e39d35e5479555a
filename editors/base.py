"""The `Editor` interface: `apply(vlm, cases) -> EditHandle`, and `handle.restore()` bit for bit.

An editor may change weights, wrap modules, keep a memory or only change the context a probe is
asked in. The handle is how the evaluation loop sees the edited system:

- `prepare(probes)` returns the probes as the edited system should be asked them (in-context
  methods add their context there);
- `answerer(vlm)` is what answers them, teacher-forced and greedy: the backbone itself by default,
  or an object that sends some probes elsewhere (SERAC's counterfactual model for in-scope probes,
  `editors/routing.py`);
- `restore()` puts every tensor back exactly, so the next case starts from the original model.

`Editor.extend(vlm, handle, cases)` adds further edits to a live edited state without writing the
earlier ones again (lifelong editing: a sequence of N edits costs N edits, not N^2 / 2). A K-case
sequence applied as `apply` of the first case, then `extend` case by case, is the state one
`apply(vlm, cases)` call writes (bit for bit where the method is deterministic; where a method
cannot know the future, its docstring says how the two differ). The default is right for editors
whose edits live in the model (weights, hooks that hold no sequence state): the new edits are
written on top and one handle restores both; editors whose memory lives in the handle or
accumulates over a sequence (IKE, SERAC, T-Patcher, UniKE, CaliNet, ROME / MEMIT / AlphaEdit)
override it.

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


class StackedHandle(EditHandle):
    """Several handles of one live state, oldest first: the edits of each were written on top of the earlier ones.

    For editors whose edits live in the model, so the newest handle asks and answers probes as the
    whole state does; `restore` undoes the newest first, so every tensor ends where it began.
    """

    def __init__(self, handles: Sequence[EditHandle]) -> None:
        super().__init__(handles[-1].stats if handles else None)
        self.handles = list(handles)

    def prepare(self, probes: Sequence[Probe]) -> list[Probe]:
        return self.handles[-1].prepare(probes)

    def answerer(self, vlm: VLM) -> ProbeAnswerer:
        return self.handles[-1].answerer(vlm)

    def restore(self) -> None:
        for handle in reversed(self.handles):
            handle.restore()


def _asks_as_the_model(handle: EditHandle) -> bool:
    """Whether a handle leaves probes and their answering to the (edited) model: no context, no router."""
    kind = type(handle)
    return kind.prepare is EditHandle.prepare and kind.answerer is EditHandle.answerer


def stack_handles(editor_name: str, live: EditHandle, new: EditHandle) -> EditHandle:
    """One handle for `live` with `new` written on top (what `Editor.extend` does by default).

    Two weight snapshots of the same tensors collapse into the older one: it already holds every
    value the model had before the sequence, so the newer copy is dropped at once (a sequence of N
    edits keeps one snapshot, not N). Anything else is stacked and restored newest first.
    """
    if not _asks_as_the_model(new) or not _asks_as_the_model(live):
        new.restore()
        live.restore()
        raise NotImplementedError(
            f"{editor_name}: its edits live in its handle ({type(new).__name__} adds context or routes "
            "probes), so adding edits to a live state needs the editor's own `extend`; Editor.extend "
            "can only stack edits that live in the model"
        )
    if _same_snapshot_only(live, new):
        assert isinstance(live, WeightEditHandle) and isinstance(new, WeightEditHandle)
        cases = [*live.stats.get("cases", []), *new.stats.get("cases", [])]  # type: ignore[misc]
        return WeightEditHandle(live.snapshot, stats={**new.stats, "cases": cases})
    older = live.handles if isinstance(live, StackedHandle) else [live]
    return StackedHandle([*older, new])


def _same_snapshot_only(live: EditHandle, new: EditHandle) -> bool:
    """Both are plain weight handles and `new` snapshotted no tensor that `live` did not."""
    if type(live) is not WeightEditHandle or type(new) is not WeightEditHandle:
        return False
    if live.extra or new.extra:
        return False
    held = {id(p) for p in live.snapshot.params.values()}
    return all(id(p) in held for p in new.snapshot.params.values())


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

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> EditHandle:
        """Add the edits of `cases` (in order) to the live state `handle` (from `apply` or `extend`).

        Returns the handle of the extended state, which replaces `handle` (it may be the same
        object): its `restore()` puts the model back to before the first edit of the sequence. If
        this raises, the whole state has been undone (earlier edits too) and the model is the
        original again, so nothing half-written leaks.

        The default writes `cases` with `apply` on the model as the earlier edits left it and
        stacks the handles: right for editors whose edits live in the model and carry no state
        from one edit of a sequence to the next (FT, MEND, KE, KN). Editors whose memory lives in
        the handle, or that accumulate over a sequence, override it.
        """
        try:
            new = self.apply(vlm, cases)
        except BaseException:
            handle.restore()
            raise
        return stack_handles(self.name, handle, new)

    def setup(self, vlm: VLM) -> None:  # noqa: B027 - optional hook, most editors need nothing
        """Called once before the first edit (load checkpoints, build retrieval indices)."""

    def describe(self) -> dict[str, object]:
        """The editor's settings, recorded next to the results."""
        return {"name": self.name, "class": type(self).__name__}
