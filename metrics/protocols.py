"""Per-probe scoring rules: which tokens count and what they are compared with, per `protocol`.

- ``strict`` (default, SPEC section 2): accuracy kinds (rel, t_gen, i_gen, port) score the share of
  answer tokens whose argmax equals the label; locality kinds (t_loc, i_loc) score the share of
  answer positions where the post-edit argmax equals the pre-edit argmax.
- ``mmedit_trainer``: the rule of MMEdit's trainer path, kept so results can sit beside the papers'
  tables. Accuracy kinds as strict; t_loc is top-1 agreement over *all* non-padding positions of the
  row (image, prompt and answer positions); i_loc is position-wise, rank-wise agreement of the top-10
  ids over all non-padding positions.

Generation twins are protocol-free: normalised exact match of the greedy answer with the gold
answer (accuracy kinds) or with the unedited model's greedy answer (locality kinds).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from backbones.batching import TeacherForced
from core.case import ACCURACY_KINDS, LOCALITY_KINDS, PROBE_KINDS
from metrics.functional import exact_match, first_line, token_accuracy, token_agreement

Protocol = Literal["strict", "mmedit_trainer"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

# Top-k width MMEdit's trainer uses per locality kind (text: top-1, image: top-10).
_MMEDIT_TOPK: dict[str, int] = {"t_loc": 1, "i_loc": 10}


def _check(kind: str, protocol: str = "strict") -> None:
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; expected one of {PROBE_KINDS}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def topk_needed(protocol: Protocol, kind: str) -> int:
    """How many top ids per position `VLM.teacher_forced(..., all_topk=...)` must return for `kind`.

    0 means answer-position argmax is enough. The evaluation loop asks for the maximum over the kinds
    in one forward pass; wider top-k lists than needed are fine (see `probe_score`).
    """
    _check(kind, protocol)
    return _MMEDIT_TOPK.get(kind, 0) if protocol == "mmedit_trainer" else 0


def _all_position_topk(out: TeacherForced, k: int, which: str, kind: str) -> torch.Tensor:
    if out.all_topk is None or out.all_topk.dim() != 2 or out.all_topk.shape[1] < k:
        got = None if out.all_topk is None else tuple(out.all_topk.shape)
        raise ValueError(
            f"protocol 'mmedit_trainer' scores {kind} on the top-{k} ids at every position, but the {which} "
            f"outputs hold all_topk={got}; call teacher_forced(..., all_topk=topk_needed(protocol, kind))"
        )
    # Top-k lists are sorted, so the first k columns of a wider request are the top-k.
    return out.all_topk[:, :k]


def probe_score(
    kind: str, post: TeacherForced, pre: TeacherForced | None = None, protocol: Protocol = "strict"
) -> float:
    """One probe's teacher-forced score in [0, 1].

    `post` are the edited model's outputs; `pre` the unedited model's outputs on the same probe,
    required for locality kinds and ignored otherwise.
    """
    _check(kind, protocol)
    if kind in ACCURACY_KINDS:
        return token_accuracy(post.pred, post.labels)
    if pre is None:
        raise ValueError(
            f"locality kind {kind!r} needs the unedited model's outputs (pre) for the same probe"
        )
    if protocol == "strict":
        return token_agreement(post.pred, pre.pred)
    k = _MMEDIT_TOPK[kind]
    post_ids = _all_position_topk(post, k, "post-edit", kind)
    pre_ids = _all_position_topk(pre, k, "pre-edit", kind)
    if post_ids.shape != pre_ids.shape:
        # In-context editors lengthen the prompt, so all-position agreement has no aligned positions.
        raise ValueError(
            f"protocol 'mmedit_trainer' compares {kind} at every position, but the post-edit row has "
            f"{post_ids.shape[0]} positions and the pre-edit row {pre_ids.shape[0]}; it is undefined for editors "
            "that change the prompt (use protocol 'strict')"
        )
    return token_agreement(post_ids, pre_ids)


def generation_score(kind: str, generated: str, answer: str, pre_generated: str | None = None) -> float:
    """One probe's generation-twin score (0 or 1): normalised exact match of the first generated line.

    Accuracy kinds compare with the gold `answer`; locality kinds with the unedited model's
    generation `pre_generated` (cut to its first line the same way).
    """
    _check(kind)
    if kind in LOCALITY_KINDS:
        if pre_generated is None:
            raise ValueError(f"locality kind {kind!r} needs the unedited model's generation (pre_generated)")
        return exact_match(generated, first_line(pre_generated))
    return exact_match(generated, answer)
