"""Greedy answers read off a teacher-forced pass, wherever that pass already decides them.

Greedy decoding picks, at each step, the argmax given the prompt and its own earlier picks. A
teacher-forced pass over the prompt and the gold answer computes, at each answer position, the
argmax given the prompt and the gold tokens before it. Along the gold path the two coincide: the
first greedy pick *is* the teacher-forced argmax at the first answer position, and as long as the
greedy picks equal the gold tokens, the next pick is the next teacher-forced argmax. So the greedy
continuation is known up to and including the first pick that leaves the gold path (or an
end-of-sequence pick, after which the row is padding). With the budget at the answer's own length
(the default), that decides every row except those that leave the answer before its last token
without stopping; only those are decoded. This is the check that speculative decoding relies on,
with the gold answer as the draft.

It holds only for plain greedy search. Settings in a model's generation config that change which
token wins (a repetition penalty, banned words, a minimum length, forced tokens, ...) would be
applied by `generate` and not by a forward pass, so where any is set, every row is decoded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Generation-config fields that add a logits processor or stopping rule changing greedy picks,
# and the value at which each is inactive (transformers' `_get_logits_processor` and
# `_get_stopping_criteria`). Sampling-only fields (temperature, top_k, ...) are ignored: generation
# here never samples.
_INACTIVE: dict[str, tuple[object, ...]] = {
    "guidance_scale": (None, 1, 1.0),
    "sequence_bias": (None,),
    "encoder_repetition_penalty": (None, 1, 1.0),
    "repetition_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
}


def greedy_altering_settings(generation_config: object) -> list[str]:
    """Names of the config's settings that make `generate` differ from plain argmax picks."""
    return [
        name for name, inactive in _INACTIVE.items() if getattr(generation_config, name, None) not in inactive
    ]


def eos_token_ids(generation_configs: Iterable[object]) -> set[int]:
    """Every end-of-sequence id the configs name (an id or a list of ids each)."""
    ids: set[int] = set()
    for config in generation_configs:
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    return ids


def greedy_tokens(pred: torch.Tensor, labels: torch.Tensor, budget: int, eos: set[int]) -> list[int] | None:
    """The first `budget` greedy picks if the teacher-forced pass decides them, else None.

    Args:
        pred: teacher-forced argmax at each answer position (given the prompt and the gold tokens before it).
        labels: the gold answer tokens the pass was forced with.
        budget: how many tokens the greedy continuation runs for.
        eos: end-of-sequence ids; a row stops at the first one it picks (the rest is padding).

    Returns the picks up to the budget or through the first end-of-sequence pick, whichever comes first.
    """
    picks: list[int] = []
    for position in range(min(budget, len(pred))):
        pick = int(pred[position])
        picks.append(pick)
        if pick in eos:
            return picks
        if pick != int(labels[position]):
            # The next pick is conditioned on a token the pass never saw: decided only if none is needed.
            return picks if len(picks) == budget else None
    # All picks so far follow the gold path; beyond the answer the pass has no argmax to offer.
    return picks if len(picks) == budget else None
