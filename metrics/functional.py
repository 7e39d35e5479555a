"""Pure scoring functions: teacher-forced outputs, token accuracy/agreement, normalised exact match.

Everything here is a plain function of tensors or strings, with no model and no state, so the
protocols (`metrics.protocols`) and the accumulating `Metric` classes (`metrics.scores`) are thin
layers on top, and the same numbers come out whichever entry point calls them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


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


def teacher_forced_outputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    answer_spans: Sequence[tuple[int, int]],
    lengths: Sequence[int],
    all_topk: int = 0,
) -> list[TeacherForced]:
    """Split a right-padded batch's logits into per-probe `TeacherForced` outputs (on the CPU).

    Args:
        logits: (B, T, V); the logit at position t predicts token t + 1, so answer tokens at
            positions s..e-1 are predicted by logits s-1..e-2.
        labels: (B, T) gold ids, `IGNORE_INDEX` outside the answers.
        answer_spans: (start, end) of each row's answer tokens.
        lengths: unpadded length of each row; rows are right-padded, so positions 0..length-1 are real.
        all_topk: when > 0, also return the top-k ids at every non-padding position of each row.
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
        out.append(TeacherForced(pred, gold, topk))
    return out


def token_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer tokens whose argmax equals the label; `IGNORE_INDEX` labels do not count."""
    if pred.shape != labels.shape:
        raise ValueError(
            f"token_accuracy: pred {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape"
        )
    mask = labels != IGNORE_INDEX
    scored = int(mask.sum())
    if scored == 0:
        # An empty answer would silently count as 0 or 1 depending on convention; make it loud.
        raise ValueError("token_accuracy: no answer tokens to score (empty answer?)")
    return float(((pred == labels) & mask).sum()) / scored


def token_agreement(post: torch.Tensor, pre: torch.Tensor) -> float:
    """Share of entries where the post-edit ids equal the pre-edit ids.

    For (T,) argmax ids this is position-wise top-1 agreement. For (T, k) top-k id lists it is the
    MMEdit-trainer rule: position-wise and rank-wise equality of the lists, averaged over all T * k
    entries (a token that moved from rank 2 to rank 3 counts as a disagreement).
    """
    if post.shape != pre.shape:
        raise ValueError(
            f"token_agreement: post-edit {tuple(post.shape)} and pre-edit {tuple(pre.shape)} differ in shape; "
            "locality compares the same probe before and after the edit"
        )
    if post.numel() == 0:
        raise ValueError("token_agreement: nothing to compare (empty answer or row?)")
    return float((post == pre).sum()) / post.numel()


def first_line(text: str) -> str:
    """The answer part of generated text: leading whitespace dropped, then everything up to the first newline.

    Generation runs a few tokens past the answer's length, so a model that answers and then goes on
    ("Rome\\nQuestion: ...") is judged on "Rome". Leading whitespace is skipped so that an answer
    that starts on a new line is not read as empty.
    """
    return text.lstrip().split("\n", 1)[0]


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, strip ASCII punctuation, drop a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised first line of `prediction` equals the normalised `reference`, else 0.0.

    Only the prediction is cut at its first newline (see `first_line`); the reference is a dataset
    answer or an already-cut pre-edit generation.
    """
    return float(normalize_answer(first_line(prediction)) == normalize_answer(reference))
