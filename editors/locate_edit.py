"""What ROME, MEMIT and AlphaEdit share: their options, the key statistics, and the restorable weight write.

A `LocateThenEdit` editor reads its statistics corpus once in `setup` (the second moment C of the
edited layers' keys, `editors/layer_stats.py`, cached on disk), and in `apply` snapshots exactly the
value-projection weights it will change, writes the cases' facts through the subclass's
`write(vlm, facts, state)` and returns a `LocateEditHandle` that copies them back bit for bit. A
sequence of cases (sequential editing) shares one `state` dict, where AlphaEdit keeps the keys of
the earlier edits; it lives in the handle, so `extend` adds edits to a live sequence as if they
had been in the first `apply` call.
"""

from __future__ import annotations

import abc
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from backbones.base import VLM
from core.case import EditCase, Probe
from core.files import file_sha256
from editors.base import EditHandle, Editor, ParameterSnapshot, WeightEditHandle
from editors.key_values import KeySpec, TargetSettings
from editors.layer_stats import DEFAULT_STATS_DIR, probes_digest, second_moments
from editors.training_split import ReadsTrainingSplit, split_option_problems
from editors.tuning import only_these_trainable


class LocateThenEdit(ReadsTrainingSplit, Editor):
    """Base of the closed-form FFN editors. Subclasses set `name`, `layer_option` and implement `write`.

    Args:
        memory_file: annotation file whose probes (prompts with their images and answers) give the
            keys the edit should preserve: their second moment C at each edited layer (the
            references use 100K Wikipedia samples). Read by the project's loaders.
        image_root: folder the corpus records' image paths are relative to.
        format: dataset format of `memory_file` ("auto" detects it).
        prompt_template: template the loader applies to the corpus prompts.
        loc_image_template: template for the corpus' image-locality questions.
        max_records: read only the first N corpus records (None: all).
        on_bad_record: the loader's policy for malformed corpus records: "error" or "skip".
        stats_dir: folder the moments are cached in (one file per backbone, corpus and layer); None
            keeps them in memory only.
        position: where a fact's key is read: "image" (last image token: the pictured subject, as
            ROME's last subject token), "question" (last token of the question text), "prompt_end"
            (the last prompt position) or "span" (last token of `span` in the question).
        span: the text whose last token holds the key, for position "span".
        steps, lr, weight_decay, clamp_norm, kl_factor, essence_prompt, stop_loss: how the target
            value is optimised (`editors.key_values.TargetSettings`).
        name: recorded in results.
    """

    side_by_side = False
    #: The option that names the edited layers, for error messages.
    layer_option = "layers"

    def __init__(
        self,
        memory_file: str | None = None,
        image_root: str = "",
        format: str = "auto",
        prompt_template: str | None = None,
        loc_image_template: str | None = None,
        max_records: int | None = None,
        on_bad_record: str = "error",
        stats_dir: str | None = DEFAULT_STATS_DIR,
        position: str = "image",
        span: str | None = None,
        steps: int = 20,
        lr: float = 0.5,
        weight_decay: float = 0.5,
        clamp_norm: float = 4.0,
        kl_factor: float = 0.0625,
        essence_prompt: str = "{} is a",
        stop_loss: float = 5e-2,
        name: str = "locate_edit",
    ) -> None:
        self.key = KeySpec(position, span)
        self.targets = TargetSettings(
            steps, lr, weight_decay, clamp_norm, kl_factor, essence_prompt, stop_loss
        )
        # A subclass may have listed its own problems before calling this, so all go in one message.
        self.problems: list[str] = [
            *getattr(self, "problems", []),
            *self.key.problems(),
            *self.targets.problems(),
        ]
        self.problems += split_option_problems(max_records, on_bad_record)
        self.memory_file = memory_file
        self.image_root = image_root
        self.format = format
        self.prompt_template = prompt_template
        self.loc_image_template = loc_image_template
        self.max_records = max_records
        self.on_bad_record = on_bad_record
        self.stats_dir = stats_dir
        self.name = name
        #: C = E[k k^T] per edited layer (non-negative index), float32 on the CPU, filled by `setup`.
        self.moments: dict[int, Tensor] = {}
        #: The layers whose moment the last `setup` computed (empty: all read from the cache).
        self.computed_layers: list[int] = []
        self._built_for: weakref.ref[VLM] | None = None

    def refuse_problems(self, problems: Sequence[str] = ()) -> None:
        """Raise one error naming every bad setting (called at the end of a subclass's `__init__`)."""
        found = self.problems + list(problems)
        if found:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(found))

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "memory_file": self.memory_file,
            "max_records": self.max_records,
            "stats_dir": self.stats_dir,
            "position": self.key.position,
            "span": self.key.span,
            **{f"target_{k}": v for k, v in vars(self.targets).items()},
        }

    # ----------------------------------------------------------------- layers and statistics
    @abc.abstractmethod
    def edited_layers(self) -> list[int]:
        """The layers as configured (negative: from the last)."""

    def layer_indices(self, vlm: VLM) -> list[int]:
        """The edited layers as non-negative indices, in order, each once."""
        n = vlm.num_language_layers
        layers = self.edited_layers()
        bad = [layer for layer in layers if not -n <= layer < n]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: {self.layer_option} {bad} do not exist; the language model has {n} layers"
            )
        indices = sorted({layer % n for layer in layers})
        if len(indices) != len(layers):
            raise ValueError(f"{type(self).__name__}: {self.layer_option} {layers} name a layer twice")
        return indices

    def _corpus(self) -> tuple[dict[str, object], list[Probe] | None]:
        """What identifies the corpus (for the cache key), and its probes when they are already in memory."""
        if self.split_cases is not None:
            probes = [p for case in self.split_cases for p in case.all_probes()]
            return {"probes_sha256": probes_digest(probes), "n_probes": len(probes)}, probes
        if self.memory_file is None:
            raise ValueError(
                f"{type(self).__name__}: give memory_file (the corpus whose keys give the layer "
                "statistics) or build the editor with from_cases"
            )
        if not Path(self.memory_file).is_file():
            raise ValueError(f"{type(self).__name__}: memory_file {self.memory_file} does not exist")
        corpus = {
            "file": str(self.memory_file),
            "sha256": file_sha256(self.memory_file),
            "format": self.format,
            "prompt_template": self.prompt_template,
            "loc_image_template": self.loc_image_template,
            "max_records": self.max_records,
            "on_bad_record": self.on_bad_record,
        }
        return corpus, None

    def _read_corpus(self) -> list[Probe]:
        cases = self.read_split(
            self.memory_file, "memory_file", "the corpus whose keys give the layer statistics"
        )
        return [p for case in cases for p in case.all_probes()]

    def setup(self, vlm: VLM) -> None:
        """The edited layers' key moments, from the cache or computed once (per backbone)."""
        if self._built_for is not None and self._built_for() is vlm:
            return
        layers = self.layer_indices(vlm)
        corpus, probes = self._corpus()
        with torch.inference_mode(False), torch.no_grad():
            self.moments, self.computed_layers = second_moments(
                vlm,
                layers,
                corpus,
                (lambda: probes) if probes is not None else self._read_corpus,
                self.stats_dir,
            )
            self.after_stats(vlm)
        self._built_for = weakref.ref(vlm)

    def after_stats(self, vlm: VLM) -> None:  # noqa: B027 - optional hook
        """Derive what the method needs from the moments (AlphaEdit's projections)."""

    # ----------------------------------------------------------------- editing
    def weights(self, vlm: VLM) -> dict[int, nn.Linear]:
        return {layer: vlm.ffn_ports(layer).value_linear for layer in self.layer_indices(vlm)}

    def apply(self, vlm: VLM, cases: Sequence[EditCase]) -> LocateEditHandle:
        self.setup(vlm)
        linears = self.weights(vlm)
        wanted = {id(linear.weight) for linear in linears.values()}
        params = {n: p for n, p in vlm.model.named_parameters() if id(p) in wanted}
        with torch.inference_mode(False):
            snapshot = ParameterSnapshot(params)
        handle = LocateEditHandle(self, snapshot)
        self._write_cases(vlm, handle, cases)
        return handle

    def extend(self, vlm: VLM, handle: EditHandle, cases: Sequence[EditCase]) -> LocateEditHandle:
        """Write `cases` on top of the live state, continuing its `state` (AlphaEdit's earlier keys)."""
        if not isinstance(handle, LocateEditHandle) or handle.editor is not self:
            handle.restore()
            raise TypeError(f"{type(self).__name__}.extend: the handle was not made by this editor's apply")
        self._write_cases(vlm, handle, cases)
        return handle

    def edit_units(self, cases: Sequence[EditCase]) -> Sequence[EditCase]:
        """What one `write` call receives: each case (MEMIT's batch editing merges them)."""
        return cases

    def _write_cases(self, vlm: VLM, handle: LocateEditHandle, cases: Sequence[EditCase]) -> None:
        """Write the cases' facts in order into the weights, sharing the handle's `state`.

        One snapshot for the whole sequence (taken by `apply`): `restore()` returns to the state
        before its first edit. A failing write undoes the whole state, since no handle of a
        half-written edit reaches the caller.
        """
        start = time.perf_counter()
        per_case = handle.stats.setdefault("cases", [])
        # Lightning runs test loops under inference mode; the target optimisation needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            try:
                with only_these_trainable(vlm.model, {}):
                    for case in self.edit_units(cases):
                        t0 = time.perf_counter()
                        stats = self.write(vlm, case.edits, handle.state)
                        per_case.append(  # type: ignore[union-attr]
                            {"case_id": case.case_id, **stats, "time_s": time.perf_counter() - t0}
                        )
            except BaseException:
                handle.restore()
                raise
        handle.stats["time_s"] = float(handle.stats.get("time_s", 0.0)) + time.perf_counter() - start  # type: ignore[arg-type]

    @abc.abstractmethod
    def write(self, vlm: VLM, facts: Sequence[Probe], state: dict[str, object]) -> dict[str, object]:
        """Write `facts` (one case's edits) into the weights; `state` lives as long as the sequence's handle."""


class LocateEditHandle(WeightEditHandle):
    """The snapshot of one sequence's edited weights and the state its writes share (AlphaEdit's K_p)."""

    def __init__(self, editor: LocateThenEdit, snapshot: ParameterSnapshot) -> None:
        super().__init__(snapshot, stats={"time_s": 0.0, "cases": []})
        self.editor = editor
        self.state: dict[str, object] = {}


@torch.no_grad()
def add_to_weight(linear: nn.Linear, delta: Tensor) -> None:
    """W += delta (delta [out, in], computed in float64), in the weight's own dtype."""
    linear.weight.add_(delta.to(linear.weight.dtype))


def value_of(linear: nn.Linear, keys: Tensor) -> Tensor:
    """W k + b for keys [n, in], in float64 (what the value projection writes for them)."""
    out = keys.double() @ linear.weight.double().T
    return out + linear.bias.double() if linear.bias is not None else out
