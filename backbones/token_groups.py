"""Where a built batch's image tokens, question tokens and last prompt token sit, row by row.

Causal tracing restores hidden states by position group and knowledge-neuron attribution reads the
last prompt token; both need these positions for every family without knowing how its prompt is
laid out. Every adapter writes each image as a run of `image_token` ids in `input_ids` (LLaVA's
576 patches, BLIP-2's query tokens, Qwen2-VL's merged patches), so the groups are read off the
token ids and the answer spans alone:

- `image`: positions holding an image token;
- `prefix`: text before the last image (the prompt format's opening, BOS, in-context text);
- `question`: text after the last image up to, not including, the last prompt token (the whole
  prompt text when the probe has no image);
- `last`: the last prompt token, whose logit predicts the answer's first token.

The pixel inputs of a batch are its floating-point tensors (`build_batch` casts exactly those to
the model's dtype); `pixel_inputs` names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backbones.batching import ProbeBatch

#: The group names, in the order tables and heatmaps list them.
GROUP_NAMES: tuple[str, ...] = ("prefix", "image", "question", "last")


@dataclass(frozen=True)
class TokenGroups:
    """Positions of one row of a `ProbeBatch` (indices into the padded row)."""

    prefix: tuple[int, ...]
    image: tuple[int, ...]
    question: tuple[int, ...]
    last: int

    def positions(self, group: str) -> tuple[int, ...]:
        """The positions of `group` (one of `GROUP_NAMES`; "last" is a one-position group)."""
        if group == "last":
            return (self.last,)
        if group not in GROUP_NAMES:
            raise ValueError(f"unknown token group {group!r}; expected one of {GROUP_NAMES}")
        return getattr(self, group)


def token_groups(batch: ProbeBatch, image_token_id: int) -> list[TokenGroups]:
    """The position groups of every row of `batch` (left- or right-padded, with or without answers)."""
    ids = batch.inputs["input_ids"].cpu()
    mask = batch.inputs["attention_mask"].cpu().bool()
    out = []
    for row, (start, _end) in enumerate(batch.answer_spans):
        real = mask[row].nonzero().flatten().tolist()
        prompt = [p for p in real if p < start]
        if not prompt:
            raise ValueError(f"row {row} has no prompt token before its answer (span starts at {start})")
        last = prompt[-1]
        is_image = ids[row] == image_token_id
        image = tuple(p for p in prompt if is_image[p])
        cut = image[-1] if image else -1
        text = [p for p in prompt[:-1] if not is_image[p]]
        out.append(
            TokenGroups(
                prefix=tuple(p for p in text if p < cut),
                image=image,
                question=tuple(p for p in text if p > cut),
                last=last,
            )
        )
    return out


def pixel_inputs(batch: ProbeBatch) -> list[str]:
    """Names of the batch's pixel inputs: its floating-point tensors (empty for text-only batches)."""
    return [name for name, value in batch.inputs.items() if torch.is_floating_point(value)]
