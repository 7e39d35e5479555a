"""What the backbone's batching produces: padded probe batches, and the teacher-forced outputs read off them.

These types sit below every adapter and speed-up module (`base`, `prefix_cache`, `frozen_prefix`) so
that none of them imports another for a type; the scoring rules (`metrics`) read `TeacherForced`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from core.case import Probe

#: The label of a position that is not scored (prompt, image and padding tokens).
IGNORE_INDEX = -100


@dataclass
class ProbeBatch:
    """A padded batch of probes ready for `model(**inputs)`.

    `answer_spans[i]` is (start, end) of probe i's answer tokens in its row (empty for prompts only).
    `lengths[i]` is the unpadded length of row i.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    answer_spans: list[tuple[int, int]]
    lengths: list[int]
    left_padded: bool


@dataclass
class TeacherForced:
    """Teacher-forced outputs of one probe.

    `pred`/`labels`: argmax and gold ids at the answer positions. `all_topk`: top-k ids at every
    non-padding position of the row (image, prompt and answer), filled only when asked for: the
    MMEdit-trainer protocol scores locality over all positions.
    """

    pred: torch.Tensor
    labels: torch.Tensor
    all_topk: torch.Tensor | None = None
    #: The row's token ids at the same positions as `all_topk` (filled with it), so that rows of one
    #: probe asked with and without an in-context editor's context can be lined up token by token.
    ids: torch.Tensor | None = None


def teacher_forced_outputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    answer_spans: Sequence[tuple[int, int]],
    lengths: Sequence[int],
    all_topk: int = 0,
    input_ids: torch.Tensor | None = None,
) -> list[TeacherForced]:
    """Split a right-padded batch's logits into per-probe `TeacherForced` outputs (on the CPU).

    Args:
        logits: (B, T, V); the logit at position t predicts token t + 1, so answer tokens at
            positions s..e-1 are predicted by logits s-1..e-2.
        labels: (B, T) gold ids, `IGNORE_INDEX` outside the answers.
        answer_spans: (start, end) of each row's answer tokens.
        lengths: unpadded length of each row; rows are right-padded, so positions 0..length-1 are real.
        all_topk: when > 0, also return the top-k ids at every non-padding position of each row.
        input_ids: (B, T) the rows' tokens; with `all_topk`, each output keeps its row's ids.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    batch, width, vocab = logits.shape
    if len(answer_spans) != batch or len(lengths) != batch:
        raise ValueError(
            f"batch has {batch} rows but {len(answer_spans)} answer spans and {len(lengths)} lengths"
        )
    if not 0 <= all_topk <= vocab:
        raise ValueError(f"all_topk must be in [0, {vocab}] (the vocabulary size), got {all_topk}")
    # One reduction and one device-to-host copy per batch rather than per probe: each copy is a sync.
    pred_all = logits.argmax(-1).cpu()
    labels_all = labels.cpu()
    # topk in the logits' own dtype: bf16 -> float is exact, so the ranking is the same without
    # materialising a float copy of (B, T, V).
    topk_all = logits.topk(all_topk, dim=-1).indices.cpu() if all_topk else None
    ids_all = input_ids.cpu() if all_topk and input_ids is not None else None
    out: list[TeacherForced] = []
    for i, ((s, e), n) in enumerate(zip(answer_spans, lengths, strict=True)):
        if not 0 <= s <= e <= n <= width:
            raise ValueError(
                f"row {i}: answer span ({s}, {e}) must lie inside the row's length {n} (width {width})"
            )
        if e > s and s < 1:
            raise ValueError(f"row {i}: an answer starting at position 0 has no logit predicting it")
        gold = labels_all[i, s:e]
        if (gold == IGNORE_INDEX).any():
            raise ValueError(f"row {i}: labels inside the answer span ({s}, {e}) hold IGNORE_INDEX")
        pred = pred_all[i, s - 1 : e - 1] if e > s else pred_all[i, :0]
        topk = topk_all[i, :n] if topk_all is not None else None
        ids = ids_all[i, :n] if ids_all is not None else None
        out.append(TeacherForced(pred, gold, topk, ids))
    return out


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the labelled tokens; logit t predicts token t+1 (shared by `VLM.loss` and its replays)."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


class ProbeAnswerer(Protocol):
    """Whatever answers probes: the backbone itself, or an edited system that routes some probes elsewhere.

    `teacher_forced` returns each probe's predictions at its answer positions (and, with `all_topk`,
    the top-k ids at every position); `generate` its greedy answer, read off `teacher_forced` outputs
    of the same probes where they decide it. `backbones.base.VLM` is the default answerer.
    """

    def teacher_forced(self, probes: Sequence[Probe], all_topk: int = 0) -> list[TeacherForced]: ...
    def generate(
        self, probes: Sequence[Probe], teacher_forced: Sequence[TeacherForced] | None = None
    ) -> list[str]: ...


class BatchingBackbone(Protocol):
    """What the speed-up modules (`prefix_cache`, `frozen_prefix`) use of a backbone.

    `backbones.base.VLM` provides all of it; typing them against this protocol rather than the class
    keeps the adapter free to call them without an import circle.
    """

    model: nn.Module
    tokenizer: Any
    image_token: str
    prompt_format: str

    def render_prompt(self, probe: Probe) -> tuple[str, list[Image.Image]]: ...
    def _encode_text(self, text: str, first: bool) -> list[int]: ...
    def build_batch(self, probes: Sequence[Probe], with_answers: bool = True) -> ProbeBatch: ...
    def logits(self, batch: ProbeBatch, **forward_kwargs: object) -> torch.Tensor: ...
    def loss(self, probes: Sequence[Probe]) -> torch.Tensor: ...
    def text_config(self) -> Any: ...
    def language_layers(self) -> nn.ModuleList: ...
    def final_modules(self) -> list[nn.Module] | None: ...


def row_tokens(batch: ProbeBatch, row: int) -> tuple[int, list[int]]:
    """Where row `row`'s real tokens start (its padding offset) and their ids, padding left out."""
    width = batch.inputs["input_ids"].shape[1]
    offset = width - batch.lengths[row] if batch.left_padded else 0
    ids = batch.inputs["input_ids"][row, offset : offset + batch.lengths[row]]
    return offset, [int(t) for t in ids]
