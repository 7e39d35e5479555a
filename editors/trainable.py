"""`TrainableEditor`: the contract of editors with learned parts (MEND, KE, SERAC, UniKE encoders).

A trainable editor is an `Editor` and an `nn.Module` at once: its learned parts (a hypernetwork, a
scope classifier, learned step sizes) are its own parameters, so `EditorTraining` optimises
`editor.parameters()` and `edit.py test` loads them from a safetensors editor checkpoint. The backbone
is never one of its submodules: it is handed in as an argument to every call, so the editor's
`state_dict()` holds the learned parts only, and a 7B backbone is never copied into an editor file.

The life cycle, the same in training and in evaluation:

1. `__init__(..., checkpoint=None)`: settings only; nothing backbone-shaped exists yet, because the
   shapes of the learned parts may depend on the backbone (MEND's networks are as wide as the layers
   they edit), which is only known later.
2. `setup(vlm)`: `build(vlm)` creates the backbone-shaped parameters (once per backbone), then, when
   `checkpoint` is set, `load_checkpoint` reads it through `load_editor_checkpoint`, which refuses a
   file trained for another backbone (`EditorCheckpointError`, naming the file and both
   fingerprints) before `load_state_dict(strict=True)` could fail on a shape.
   `EditEval.on_test_start` and `EditorTraining.setup` call it, so training and loading both build
   before any weight is used.
3. `apply(vlm, cases) -> EditHandle` edits, as every editor does; `handle.restore()` puts the backbone
   back bit for bit. Training never changes the backbone either: `training_loss` differentiates
   through an edit without writing it (`torch.func.functional_call`, or a handle restored before
   returning).
4. `training_loss(vlm, cases)` returns at least `loss` (what is minimised), `loss_edit` and `loss_loc`
   (the edit and locality terms, reported apart).
5. `export(path, vlm)` writes the learned parts with the backbone's fingerprint.

`nn.Module.apply(fn)` (apply `fn` to every submodule) is shadowed by `Editor.apply(vlm, cases)`, also
for a module holding an editor (`EditEval`, `EditorTraining`: walk `module.modules()` instead);
neither Lightning nor torch's training path calls it, and `apply_to_modules(fn)` is the module version.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.base import VLM
from core.case import EditCase
from core.files import file_sha256
from editors.base import Editor
from editors.checkpoint import EditorCheckpointError, load_editor_checkpoint, save_editor_checkpoint

#: The keys every `training_loss` result holds (more may ride along and are logged too).
REQUIRED_LOSS_KEYS: tuple[str, ...] = ("loss", "loss_edit", "loss_loc")


class TrainableEditor(Editor, nn.Module):
    """An editor with learned parameters, trained by `EditorTraining` and loaded from `checkpoint`.

    Subclasses implement `attached_groups`, `build`, `training_loss` and `apply`, and call
    `super().__init__(checkpoint=checkpoint)` first in their `__init__` (before assigning modules).

    Args:
        checkpoint: a safetensors editor checkpoint written by `export` (or `train.py fit` with
            `EditorTraining`); loaded in `setup(vlm)` and refused when it was trained for another
            backbone. None: the freshly built (untrained) parameters.
    """

    name = "trainable"

    def __init__(self, checkpoint: str | None = None) -> None:
        # `Editor` (an abc.ABC) has no __init__, so this reaches nn.Module.__init__ through the MRO;
        # ABCMeta derives from `type`, nn.Module's metaclass, so the two combine without a conflict.
        super().__init__()
        self.checkpoint = checkpoint
        # The backbone fingerprint the parameters were built for, and the checkpoint loaded into
        # them: `setup` is idempotent, so a fit followed by a validate does not reload (and undo the
        # training of) the weights.
        self._built_for: dict[str, Any] | None = None
        self._loaded_from: str | None = None

    # ----------------------------------------------------------------- what a method implements
    @abc.abstractmethod
    def attached_groups(self) -> list[str]:
        """The backbone's parameter groups the editor attaches to (`"ffn:-1"`, `"projector"`).

        Their names and shapes go into the checkpoint's backbone fingerprint, so a checkpoint is
        refused for a backbone whose attachment points differ, not only for another model size.
        """

    @abc.abstractmethod
    def build(self, vlm: VLM) -> None:
        """Create the backbone-shaped parameters (as attributes, so they are registered).

        Called by `setup` once per backbone, before training, before loading a checkpoint and before
        the first edit. Create them on `vlm.device`. A rebuild (another backbone) must replace every
        parameter: the checkpoint is then loaded again.
        """

    @abc.abstractmethod
    def training_loss(self, vlm: VLM, cases: Sequence[EditCase]) -> dict[str, torch.Tensor]:
        """The meta-training objective on `cases`: at least `loss`, `loss_edit` and `loss_loc`.

        `loss` is what `EditorTraining` minimises over the editor's parameters; the terms are logged
        apart (`train/loss_edit`, `train/loss_loc`). It must leave the backbone's weights as they
        were; the backbone's parameters do not require grad.
        """

    # ----------------------------------------------------------------- life cycle
    @property
    def built(self) -> bool:
        return self._built_for is not None

    def backbone_fingerprint(self, vlm: VLM) -> dict[str, Any]:
        """What this editor's weights depend on: `vlm.fingerprint` over `attached_groups()`."""
        return vlm.fingerprint(*self.attached_groups())

    def ensure_built(self, vlm: VLM) -> None:
        """`build(vlm)` unless the parameters were already built for a backbone of this fingerprint."""
        fingerprint = self.backbone_fingerprint(vlm)
        if self._built_for == fingerprint:
            return
        self.build(vlm)
        self._built_for = fingerprint
        self._loaded_from = None

    def setup(self, vlm: VLM) -> None:
        """Build for `vlm`, then load `checkpoint` (when set and not loaded yet)."""
        self.ensure_built(vlm)
        if self.checkpoint is not None and self._loaded_from != str(self.checkpoint):
            self.load_checkpoint(self.checkpoint, vlm)

    def load_checkpoint(self, path: str | os.PathLike[str], vlm: VLM) -> dict[str, Any]:
        """Load an editor checkpoint for `vlm` into the (built) parameters; returns its metadata.

        Raises `EditorCheckpointError` naming the file when it was saved by another editor class,
        for another backbone, holds non-finite values, or does not match the parameters' names and
        shapes (an editor whose code changed since).
        """
        self.ensure_built(vlm)
        state, meta = load_editor_checkpoint(path, self.backbone_fingerprint(vlm), editor=type(self).__name__)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            # load_state_dict lists every key and shape on many lines; the first names the problem.
            detail = " ".join(str(exc).split())
            raise EditorCheckpointError(
                f"editor checkpoint {path} does not fit {type(self).__name__}'s parameters: {detail}"
            ) from exc
        self._loaded_from = str(path)
        return meta

    def export(
        self, path: str | os.PathLike[str], vlm: VLM, extra_meta: dict[str, Any] | None = None
    ) -> Path:
        """Write the learned parameters as a safetensors editor checkpoint that `checkpoint:` loads.

        The metadata holds the editor class, the backbone's fingerprint, the attached groups, the
        editor's `describe()` and `extra_meta` (training settings, step, best score).
        """
        if not self.built:
            raise RuntimeError(f"{type(self).__name__}.export: nothing built yet; call setup(vlm) first")
        meta = {
            "editor": type(self).__name__,
            "backbone": self.backbone_fingerprint(vlm),
            "attached_groups": list(self.attached_groups()),
            "describe": self.describe(),
            **(extra_meta or {}),
        }
        # The metadata is stored as JSON: settings that are not JSON (paths, tuples) go as text.
        meta = json.loads(json.dumps(meta, default=str))
        return save_editor_checkpoint(path, self.state_dict(), meta)

    def describe(self) -> dict[str, object]:
        # Settings only, the same before and after `build` (results folders compare descriptions
        # taken before `setup`); the checkpoint's digest tells a retrained file at the same path apart.
        return {
            **super().describe(),
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "checkpoint_sha256": _file_sha256(self.checkpoint),
            "attached_groups": list(self.attached_groups()),
        }

    def apply_to_modules(self, fn: Callable[[nn.Module], None]) -> TrainableEditor:
        """`nn.Module.apply`: `fn` on every submodule and on this editor (the name `apply` is the edit's)."""
        return nn.Module.apply(self, fn)


#: SHA-256 of checkpoint files by (path, size, mtime), so describing an editor twice reads the file once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str | os.PathLike[str] | None) -> str | None:
    """The file's SHA-256 (None without a path, or when the file is missing: loading will say so)."""
    if path is None or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]
