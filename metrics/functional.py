"""Pure scoring functions: teacher-forced outputs, token accuracy/agreement, normalised exact match.

Everything here is a plain function of tensors or strings, with no model and no state, so the
protocols (`metrics.protocols`) and the accumulating `Metric` classes (`metrics.scores`) are thin
layers on top, and the same numbers come out whichever entry point calls them.
"""

from __future__ import annotations

import re
import string

import torch

from backbones.batching import IGNORE_INDEX

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


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
