"""UniKE's knowledge representations (Section 3.3): h_sem, h_pos and h_neg of (question, A_pos, A_neg).

For each triplet and each chosen language layer l, all three are the PRE-ATTENTION hidden state of
layer l (the `hidden_states` input of `vlm.attention_parts(l).module`, after the layer's input norm;
`knowledge/capture.py`):

- h_sem at the last token of the prompt (question with its image, before any answer token),
- h_pos at the last token of prompt + A_pos,
- h_neg at the last token of prompt + A_neg.

The model is causal, so the prompt's last token sees the same thing whether an answer follows or not:
h_sem is read in the same pass as h_pos, and each triplet costs two forwards, not three.

`extract_states` answers that for any probes (what the editor calls at edit time;
`knowledge/extraction.py` runs it over a mined triplet dataset), and `load_knowledge_states` reads the
cached result back, refusing states of another backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from backbones.base import VLM
from core.case import Probe
from knowledge.capture import normalise_layer, read_states
from knowledge.store import (
    STATE_KINDS,
    STATES_DIR,
    KnowledgeStoreError,
    backbone_key,
    key_differences,
    load_checked,
)


def state_column(kind: str, layer: int) -> str:
    """The dataset column of one kind of state at one layer: `sem_-1`, `pos_-2`, ..."""
    return f"{kind}_{layer}"


@dataclass
class KnowledgeStates:
    """Hidden states of N pieces of in-context knowledge, per kind and layer: `[N, H]` float32 tensors.

    `sem`, `pos`, `neg` map each layer of `layers` (the ints as chosen: `-1` is the last layer) to its
    states; row i of every tensor is triplet i. `neg` may be empty (states of probes without a wrong
    answer). `keys`/`facts` name the triplets where known; `meta` is the folder's key (backbone, layers).
    """

    layers: list[int]
    sem: dict[int, torch.Tensor]
    pos: dict[int, torch.Tensor]
    neg: dict[int, torch.Tensor]
    keys: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        shapes = set()
        for kind in STATE_KINDS:
            states = getattr(self, kind)
            if kind == "neg" and not states:
                continue
            if sorted(states) != sorted(self.layers):
                raise ValueError(
                    f"KnowledgeStates.{kind} has layers {sorted(states)}, expected {self.layers}"
                )
            shapes.update(tuple(t.shape) for t in states.values())
        if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
            raise ValueError(f"KnowledgeStates: every state tensor must be [N, H] of one shape, got {shapes}")

    def __len__(self) -> int:
        return int(next(iter(self.sem.values())).shape[0]) if self.sem else 0

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.sem.values())).shape[1])

    @classmethod
    def from_extracted(
        cls, layers: Sequence[int], states: dict[str, dict[int, torch.Tensor]]
    ) -> KnowledgeStates:
        """Wrap what `extract_states` returned."""
        return cls(list(layers), states["sem"], states["pos"], states.get("neg", {}))


def _answer_states(
    vlm: VLM, probes: Sequence[Probe], layers: Sequence[int], with_sem: bool
) -> list[torch.Tensor]:
    """Per probe `[K, L, H]`: (K = 2: last prompt token, last answer token; K = 1: last answer token)."""

    def run(chunk: Sequence[Probe]) -> list[torch.Tensor]:
        batch = vlm.build_batch(chunk, with_answers=True)
        starts = torch.tensor([s for s, _ in batch.answer_spans])
        ends = torch.tensor([e for _, e in batch.answer_spans])
        for probe, s, e in zip(chunk, starts.tolist(), ends.tolist(), strict=True):
            if e <= s:
                raise ValueError(
                    f"answer {probe.answer!r} of question {probe.prompt[:60]!r} encodes to no token: "
                    "its state would be the question's own"
                )
        positions = {"end": ends - 1}
        if with_sem:
            positions = {"sem": starts - 1, **positions}
        read = read_states(vlm, batch, layers, positions)
        stacked = torch.stack(
            [torch.stack([read[name][layer] for layer in layers], 1) for name in positions], 1
        ).cpu()
        return list(stacked)

    with torch.inference_mode():
        # The backbone's own chunking: `max_batch_size` probes of similar length per pass.
        per_probe = vlm._in_chunks(probes, run)
    # Copied out of inference mode, so a caller may use them in autograd graphs (as constants).
    return [t.clone() for t in per_probe]


def extract_states(
    vlm: VLM,
    questions: Sequence[Probe],
    answers_pos: Sequence[str],
    answers_neg: Sequence[str] | None,
    layers: Sequence[int],
) -> dict[str, dict[int, torch.Tensor]]:
    """h_sem, h_pos (and h_neg) of each question at each layer: `{"sem": {l: [N, H]}, "pos": ..., "neg": ...}`.

    Args:
        vlm: the backbone, as it is now (hooks of an active edit would show in the states).
        questions: the prompts with their images (and any context); their own `answer` is ignored.
        answers_pos: the true answer of each question (its last token gives h_pos).
        answers_neg: the wrong answer of each (h_neg), or None: then `"neg"` maps to an empty dict.
        layers: language layers (negative counts from the end); the result's keys are these ints.

    Returns float32 CPU tensors, computed without gradients (`torch.inference_mode`) in the backbone's
    `max_batch_size` chunks of similar length, but usable in autograd graphs afterwards.
    """
    layers = list(layers)
    if len({normalise_layer(vlm, layer) for layer in layers}) != len(layers):
        # Two names of one layer would share one hook point, and the early stop would leave one unread.
        raise ValueError(f"extract_states: layers {layers} name one layer twice")
    n = len(questions)
    if len(answers_pos) != n or (answers_neg is not None and len(answers_neg) != n):
        raise ValueError(
            f"extract_states: {n} questions but {len(answers_pos)} positive and "
            f"{'no' if answers_neg is None else len(answers_neg)} negative answers"
        )
    out: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in STATE_KINDS}
    if n == 0:
        hidden = vlm.fingerprint()["hidden_size"]
        empty = {layer: torch.zeros(0, hidden) for layer in layers}
        return {"sem": dict(empty), "pos": dict(empty), "neg": {} if answers_neg is None else dict(empty)}
    pos = torch.stack(
        _answer_states(
            vlm, [replace(q, answer=a) for q, a in zip(questions, answers_pos, strict=True)], layers, True
        )
    )
    for i, layer in enumerate(layers):
        out["sem"][layer] = pos[:, 0, i].contiguous()
        out["pos"][layer] = pos[:, 1, i].contiguous()
    if answers_neg is not None:
        neg = torch.stack(
            _answer_states(
                vlm,
                [replace(q, answer=a) for q, a in zip(questions, answers_neg, strict=True)],
                layers,
                False,
            )
        )
        for i, layer in enumerate(layers):
            out["neg"][layer] = neg[:, 0, i].contiguous()
    return out


def _matrix(dataset: datasets.Dataset, column: str) -> torch.Tensor:
    array = dataset.data.column(column).combine_chunks()
    if not isinstance(array, pa.FixedSizeListArray):
        raise KnowledgeStoreError(f"column {column!r} holds {array.type}, not fixed-size float lists")
    values = np.asarray(array.flatten(), dtype=np.float32).reshape(len(array), array.type.list_size)
    return torch.from_numpy(values.copy())


def load_knowledge_states(path: str | Path, vlm: VLM | None = None) -> KnowledgeStates:
    """The cached states of a knowledge folder (or its `states/` folder itself).

    With `vlm`, states extracted from another backbone (other sizes or other weights) are refused in one
    line naming the folder and what differs. Missing folders and columns are named the same way.
    """
    dataset, key, folder = load_checked(path, STATES_DIR, ("key", "fact"), "knowledge states")
    layers = key.get("layers")
    if not isinstance(layers, list) or not layers:
        raise KnowledgeStoreError(f"{folder}: its key names no layers")
    if vlm is not None:
        differ = key_differences({"backbone": key.get("backbone")}, {"backbone": backbone_key(vlm)})
        if differ:
            raise KnowledgeStoreError(
                f"knowledge states {folder} were extracted from another backbone (differs in "
                f"{', '.join(differ)}); rerun python -m knowledge.mine for this backbone"
            )
    wanted = [state_column(kind, layer) for kind in STATE_KINDS for layer in layers]
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise KnowledgeStoreError(
            f"{folder}: knowledge states lack column(s) {missing} (columns: {dataset.column_names})"
        )
    tensors = {
        kind: {layer: _matrix(dataset, state_column(kind, layer)) for layer in layers} for kind in STATE_KINDS
    }
    return KnowledgeStates(
        layers=list(layers),
        sem=tensors["sem"],
        pos=tensors["pos"],
        neg=tensors["neg"],
        keys=list(dataset["key"]),
        facts=list(dataset["fact"]),
        meta={**key, "folder": str(folder)},
    )
