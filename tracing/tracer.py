"""Causal tracing of one probe: corrupt its image or question, restore one hidden state at a time.

Meng et al. (ROME, 2022) locate a fact by running the model three ways: clean; corrupted (Gaussian
noise of 3x the embeddings' standard deviation on the subject's token embeddings); and corrupted
with one hidden state - at one layer and one token - put back to its clean value. Where putting a
state back brings the correct answer's probability back, that state carries the fact. Here the
subject of a question about *a picture* may be the picture or the words, so three corruptions are
offered, each reduced to one thing: the corrupted input of the first language layer.

- `image_tokens`: noise on the image tokens' embeddings (the projector's output, as the language
  model receives it);
- `pixels`: noise on the pixel inputs; the corrupted first-layer input is read off one forward;
- `question`: noise on the question's token embeddings (text after the image, not the last token).

States are restored by position group (`backbones/token_groups.py`: the prefix text, all image
tokens, the question tokens, the last prompt token) and kind: the residual stream (the input of
the first layer, column `emb`, or a layer's output), a layer's MLP output or its attention output.
MLP and attention outputs are restored over a window of layers centred on the column (ROME: 10 of
GPT-2 XL's 48 layers). A forward pass runs many restorations side by side: each row of the batch is
the same corrupted probe with its own restoration, and row 0 restores nothing (the corrupted
baseline), so one pass per chunk of rows and noise sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from backbones.base import VLM
from backbones.batching import ProbeBatch
from backbones.token_groups import GROUP_NAMES, TokenGroups, pixel_inputs
from core.case import Probe

CORRUPTIONS: tuple[str, ...] = ("image_tokens", "pixels", "question")
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
#: The position group each corruption puts its noise on (pixels: the image, through the vision side).
CORRUPTED_GROUP = {"image_tokens": "image", "pixels": "image", "question": "question"}


@dataclass
class ProbeTrace:
    """One probe's trace: p(answer) clean, corrupted, and with each restoration.

    `restored[kind]` is [groups, columns]: for "resid" the columns are `emb` then layers 0..L-1, for
    "mlp" and "attn" the window's centre layer 0..L-1. NaN where a group has no position.
    """

    clean: float
    corrupted: float
    restored: dict[str, Tensor]
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Restoration:
    """One row: put back `kind`'s clean states at `layers` (-1: the first layer's input) and `positions`."""

    kind: str
    layers: tuple[int, ...]
    positions: tuple[int, ...]


class CausalTracer:
    """Trace probes on one backbone (see the module docstring).

    Args:
        vlm: the backbone.
        corruption: "image_tokens", "pixels" or "question".
        noise_scale: the noise's standard deviation as a multiple of the corrupted inputs' own (ROME: 3),
            measured by `calibrate` over the traced probes.
        samples: noise draws averaged per probe (ROME: 10); every restoration of a draw sees the same noise.
        window: layers restored together for MLP and attention outputs (ROME: 10).
        groups: position groups restored (rows of the heatmap).
        max_rows: rows per forward pass.
        seed: seeds the noise (draw s uses seed + s), so a trace is reproducible.
    """

    def __init__(
        self,
        vlm: VLM,
        corruption: str = "image_tokens",
        noise_scale: float = 3.0,
        samples: int = 3,
        window: int = 1,
        groups: Sequence[str] = GROUP_NAMES,
        max_rows: int = 128,
        seed: int = 0,
    ) -> None:
        if corruption not in CORRUPTIONS:
            raise ValueError(f"CausalTracer: corruption must be one of {CORRUPTIONS}, got {corruption!r}")
        if not noise_scale >= 0:
            raise ValueError(f"CausalTracer: noise_scale must be >= 0, got {noise_scale}")
        if samples < 1:
            raise ValueError(f"CausalTracer: samples must be >= 1, got {samples}")
        if not 1 <= window <= vlm.num_language_layers:
            raise ValueError(
                f"CausalTracer: window must be in 1..{vlm.num_language_layers} (the layers), got {window}"
            )
        unknown = [g for g in groups if g not in GROUP_NAMES]
        if unknown or not groups:
            raise ValueError(
                f"CausalTracer: groups must be a non-empty subset of {GROUP_NAMES}, got {groups}"
            )
        if max_rows < 2:
            raise ValueError(
                f"CausalTracer: max_rows must be >= 2 (the baseline and one restoration), got {max_rows}"
            )
        self.vlm = vlm
        self.corruption = corruption
        self.noise_scale = noise_scale
        self.samples = samples
        self.window = window
        self.groups = tuple(groups)
        self.max_rows = max_rows
        self.seed = seed
        #: The corrupted inputs' standard deviation (set by `calibrate`; None: not calibrated yet).
        self.input_std: float | None = None

    # ----------------------------------------------------------------- set-up
    @torch.no_grad()
    def calibrate(self, probes: Sequence[Probe]) -> float:
        """Measure the standard deviation of what the corruption perturbs, over `probes`; returns it.

        Embedding corruptions: the first language layer's clean inputs at the corrupted group's
        positions (ROME: the subjects' token embeddings). Pixels: every pixel input value.
        """
        values = []
        for probe in probes:
            batch = self.vlm.build_batch([probe])
            if self.corruption == "pixels":
                values += [batch.inputs[k].float().flatten() for k in pixel_inputs(batch)]
                continue
            group = self.vlm.token_groups(batch)[0].positions(CORRUPTED_GROUP[self.corruption])
            if group:
                values.append(self._clean_states(batch)["emb"][0, list(group)].float().flatten())
        if not values:
            raise ValueError(
                f"CausalTracer: none of the {len(probes)} probes has anything for {self.corruption!r} to corrupt"
            )
        self.input_std = torch.cat(values).std().item()
        return self.input_std

    # ----------------------------------------------------------------- tracing
    @torch.no_grad()
    def trace(self, probe: Probe) -> ProbeTrace:
        """The probe's clean, corrupted and restored probabilities of its answer's first token."""
        groups = self.vlm.token_groups(self.vlm.build_batch([probe]))[0]
        rows, cells = self._restorations(groups)
        clean, corrupted, restored = self.run(probe, rows)
        return ProbeTrace(clean, corrupted, self._table(cells, restored), self.groups)

    @torch.no_grad()
    def run(self, probe: Probe, rows: Sequence[Restoration]) -> tuple[float, float, Tensor]:
        """p(answer's first token): clean, corrupted, and with each of `rows` restored ([len(rows)]),
        the corrupted ones averaged over the noise draws."""
        if self.input_std is None:
            self.calibrate([probe])
        batch = self.vlm.build_batch([probe])
        groups = self.vlm.token_groups(batch)[0]
        if not groups.positions(CORRUPTED_GROUP[self.corruption]):
            raise ValueError(
                f"probe {probe.prompt!r} has no {CORRUPTED_GROUP[self.corruption]} tokens to corrupt"
            )
        answer = int(batch.inputs["input_ids"][0, groups.last + 1])
        clean_states = self._clean_states(batch)
        clean = self._answer_prob(self.vlm.model(**batch.inputs, use_cache=False).logits, groups.last, answer)
        # The passes' batches are built once per probe (tokens and pixels do not change between draws).
        per_pass = self.max_rows - 1
        chunks = [list(rows[i : i + per_pass]) for i in range(0, len(rows), per_pass)] or [[]]
        batches = {n: self.vlm.build_batch([probe] * (n + 1)) for n in {len(c) for c in chunks}}
        passes = [(chunk, batches[len(chunk)]) for chunk in chunks]
        totals = torch.zeros(len(rows))
        corrupted_total = 0.0
        for sample in range(self.samples):
            corrupted_input = self._corrupted_input(batch, groups, clean_states["emb"], self.seed + sample)
            probs = self._restored(passes, clean_states, corrupted_input, groups.last, answer)
            corrupted_total += probs[0].item()
            totals += probs[1:]
        return float(clean[0]), corrupted_total / self.samples, totals / self.samples

    def _restorations(self, groups: TokenGroups) -> tuple[list[Restoration], list[tuple[str, int, int]]]:
        """Every restoration row and its (kind, group index, column) cell; empty groups get none."""
        n = self.vlm.num_language_layers
        rows, cells = [], []
        for g, name in enumerate(self.groups):
            positions = groups.positions(name)
            if not positions:
                continue
            for column in range(n + 1):
                rows.append(Restoration("resid", (column - 1,), positions))
                cells.append(("resid", g, column))
            for kind in ("mlp", "attn"):
                for centre in range(n):
                    # ROME's window: layers centre - w//2 .. centre + ceil(w/2) - 1, clipped.
                    low = max(0, centre - self.window // 2)
                    high = min(n, centre - (-self.window // 2))
                    rows.append(Restoration(kind, tuple(range(low, high)), positions))
                    cells.append((kind, g, centre))
        return rows, cells

    def _table(self, cells: list[tuple[str, int, int]], values: Tensor) -> dict[str, Tensor]:
        n = self.vlm.num_language_layers
        table = {kind: torch.full((len(self.groups), n + (kind == "resid")), float("nan")) for kind in KINDS}
        for (kind, g, column), value in zip(cells, values.tolist(), strict=True):
            table[kind][g, column] = value
        return table

    def _answer_prob(self, logits: Tensor, last: int, answer: int) -> Tensor:
        return logits[:, last].float().softmax(-1)[:, answer].cpu()

    def _corrupted_input(
        self, batch: ProbeBatch, groups: TokenGroups, clean_emb: Tensor, seed: int
    ) -> Tensor:
        """The first language layer's input [1, T, H] of the corrupted run, for one noise draw."""
        generator = torch.Generator().manual_seed(seed)
        std = self.noise_scale * float(self.input_std or 0.0)
        if self.corruption == "pixels":
            inputs = dict(batch.inputs)
            for key in pixel_inputs(batch):
                noise = torch.randn(inputs[key].shape, generator=generator) * std
                inputs[key] = inputs[key] + noise.to(inputs[key].device, inputs[key].dtype)
            noisy = ProbeBatch(inputs, batch.labels, batch.answer_spans, batch.lengths, batch.left_padded)
            return self._clean_states(noisy)["emb"]
        positions = list(groups.positions(CORRUPTED_GROUP[self.corruption]))
        corrupted = clean_emb.clone()
        noise = torch.randn((len(positions), clean_emb.shape[-1]), generator=generator) * std
        corrupted[0, positions] += noise.to(clean_emb.device, clean_emb.dtype)
        return corrupted

    # ----------------------------------------------------------------- forwards
    def _clean_states(self, batch: ProbeBatch) -> dict[str, Any]:
        """One forward of `batch`: the first layer's input ("emb") and every layer's resid/mlp/attn output."""
        states: dict[str, Any] = {"resid": {}, "mlp": {}, "attn": {}}
        shape = batch.inputs["input_ids"].shape
        hooks = []

        def read_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            states["emb"] = _hidden_arg(args, kwargs).detach()

        def reader(kind: str, layer: int):
            def read(_m: nn.Module, _args: tuple, output: Any) -> None:
                states[kind][layer] = _first(output).detach().reshape(*shape, -1)

            return read

        layers = self.vlm.language_layers()
        hooks.append(layers[0].register_forward_pre_hook(read_input, with_kwargs=True))
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_hook(reader("resid", i)))
            hooks.append(self.vlm.ffn_ports(i).output_module.register_forward_hook(reader("mlp", i)))
            hooks.append(self.vlm.attention_parts(i).module.register_forward_hook(reader("attn", i)))
        try:
            self.vlm.model(**batch.inputs, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return states

    def _restored(
        self,
        passes: list[tuple[list[Restoration], ProbeBatch]],
        clean: dict[str, Any],
        corrupted_input: Tensor,
        last: int,
        answer: int,
    ) -> Tensor:
        """p(answer) of the corrupted baseline, then of each restoration row, over all passes."""
        out = []
        baseline = None
        for chunk, batch in passes:
            with self._patched(chunk, clean, corrupted_input, batch.inputs["input_ids"].shape):
                probs = self._answer_prob(
                    self.vlm.model(**batch.inputs, use_cache=False).logits, last, answer
                )
            baseline = probs[:1] if baseline is None else baseline
            out.append(probs[1:])
        assert baseline is not None  # `run` always makes at least one pass
        return torch.cat([baseline, *out])

    @contextlib.contextmanager
    def _patched(
        self, chunk: list[Restoration], clean: dict[str, Any], corrupted_input: Tensor, shape: torch.Size
    ) -> Iterator[None]:
        """Hooks for one pass: row 0 corrupted only, row r + 1 corrupted with restoration r."""
        masks: dict[tuple[str, int], Tensor] = {}
        for r, rest in enumerate(chunk):
            for layer in rest.layers:
                mask = masks.setdefault((rest.kind, layer), torch.zeros(shape, dtype=torch.bool))
                mask[r + 1, list(rest.positions)] = True
        device = corrupted_input.device
        masks = {key: mask.to(device).unsqueeze(-1) for key, mask in masks.items()}
        hooks = []

        def corrupt(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = corrupted_input.expand(shape[0], -1, -1)
            if ("resid", -1) in masks:
                hidden = torch.where(masks[("resid", -1)], clean["emb"], hidden)
            return _replace_hidden(args, kwargs, hidden.contiguous())

        def restorer(key: tuple[str, int], state: Tensor):
            def restore(_m: nn.Module, _args: tuple, output: Any) -> Any:
                value = _first(output)
                patched = torch.where(masks[key], state, value.reshape(*shape, -1)).reshape(value.shape)
                return (patched, *output[1:]) if isinstance(output, tuple) else patched

            return restore

        layers = self.vlm.language_layers()
        hooks.append(layers[0].register_forward_pre_hook(corrupt, with_kwargs=True))
        for (kind, layer), _mask in masks.items():
            if layer < 0:
                continue
            module = {
                "resid": layers[layer],
                "mlp": self.vlm.ffn_ports(layer).output_module,
                "attn": self.vlm.attention_parts(layer).module,
            }[kind]
            hooks.append(module.register_forward_hook(restorer((kind, layer), clean[kind][layer])))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def _first(output: Any) -> Tensor:
    """A module's main output: the tensor itself, or the first element of its output tuple."""
    return output[0] if isinstance(output, tuple) else output


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder layer is called with (positionally or as `hidden_states`)."""
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
