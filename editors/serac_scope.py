"""SERAC's scope classifier: is a probe about one of the edits in memory? It sees the image too.

The public SERAC scores (edit, input) pairs with a text encoder (a distilbert dual encoder, a
squared-distance similarity, threshold 0.5). Text alone cannot tell "Which country is this object
from?" about the edited entity from the same question about another entity's picture, which is
exactly an image-locality probe; VLKEB's table reports SERAC's I-Loc at 0.8-4.5% for that reason.
Here the classifier reads the frozen backbone's own states, so no second encoder has to be trained
or downloaded:

- `scope_features` runs the frozen backbone over each probe and mean-pools one language layer's
  output: over the image positions (`image`) and the text positions (`text`) of the probe asked
  with its picture, and over the words of the probe asked without it (`question`). `image_text`
  routing reads all three; `text` routing reads `question` only. A probe without a picture has no
  `image` feature (`present` says so).
- `PairScorer` is the learned part, a dual encoder as in SERAC: per modality a projection of the
  pooled states, the cosine of the projected pair (and of the raw pair, a prior that generalises to
  entities never seen in training), and a small MLP over those cosines and the presence flags that
  gives one logit per (memory entry, probe) pair. The MLP can express "same picture AND same
  question", which a single distance over concatenated features cannot weigh; `question` is what
  tells "its country" from "its colour" asked about the same picture.
- `ScopeClassifier` holds one scorer per routing mode, both trained on every step, so the one
  editor checkpoint serves `routing: image_text` and `routing: text` alike.

`scope_labels` gives the training targets of a pair matrix; `editors.serac_scope_report` the precision and
recall of the routing on a split (`python -m editors.serac_scope_report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from backbones.base import VLM
from core.case import Probe

Routing = Literal["image_text", "text"]
ROUTINGS: tuple[str, ...] = ("image_text", "text")
#: The pooled feature kinds each routing mode reads: `image` and `text` from the probe asked with
#: its picture, `question` from its words alone (the only kind text routing has).
MODALITIES: dict[str, tuple[str, ...]] = {"image_text": ("image", "text", "question"), "text": ("question",)}


@dataclass
class ScopeFeatures:
    """Pooled frozen-backbone states of N probes: per modality (N, H) values and an (N,) presence mask."""

    values: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.present.values()))) if self.present else 0

    def select(self, index: Sequence[int] | torch.Tensor) -> ScopeFeatures:
        idx = torch.as_tensor(index, dtype=torch.long)
        return ScopeFeatures(
            {k: v[idx] for k, v in self.values.items()}, {k: v[idx] for k, v in self.present.items()}
        )

    @staticmethod
    def cat(parts: Sequence[ScopeFeatures]) -> ScopeFeatures:
        keys = parts[0].values.keys()
        return ScopeFeatures(
            {k: torch.cat([p.values[k] for p in parts]) for k in keys},
            {k: torch.cat([p.present[k] for p in parts]) for k in keys},
        )


@torch.no_grad()
def scope_features(vlm: VLM, probes: Sequence[Probe], routing: str, layer: int = -1) -> ScopeFeatures:
    """The classifier's view of `probes`: mean-pooled states of language layer `layer`.

    `image` / `text`: pooled over the image / text positions of the probe asked with its picture;
    `question`: pooled over the probe's words asked without any picture. The text positions of a
    probe asked with its picture also attend to it, so `text` mixes what is asked with what is
    shown; `question` is what is asked alone, which tells "its country" from "its colour" about
    the same picture. In-context items and answers are never part of the view.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    wanted = MODALITIES[routing]
    out = ScopeFeatures({}, {})
    if "image" in wanted or "text" in wanted:
        seen = _pooled(vlm, [Probe(p.prompt, "", p.image, kind=p.kind) for p in probes], layer)
        for m in ("image", "text"):
            out.values[m], out.present[m] = seen.values[m], seen.present[m]
    if "question" in wanted:
        words = _pooled(vlm, [Probe(p.prompt, "", None, kind=p.kind) for p in probes], layer)
        out.values["question"], out.present["question"] = words.values["text"], words.present["text"]
    return out


def _pooled(vlm: VLM, asked: Sequence[Probe], layer: int) -> ScopeFeatures:
    """Per probe, the layer's states averaged over its image positions and over its text positions.

    One forward pass of the frozen backbone per chunk of `vlm.max_batch_size` probes; the image
    positions are where the batch holds the backbone's image token, which every adapter writes for
    each image position (`VLM.build_batch`), so no family is special-cased.
    """
    kinds = ("image", "text")
    if not asked:
        return ScopeFeatures(
            {m: torch.zeros(0, 0) for m in kinds}, {m: torch.zeros(0, dtype=torch.bool) for m in kinds}
        )
    image_id = vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
    # Similar lengths together (as VLM._in_chunks does) so a chunk pads little.
    order = sorted(range(len(asked)), key=lambda i: (asked[i].image is not None, len(asked[i].prompt)))
    pooled: dict[str, list[torch.Tensor | None]] = {m: [None] * len(asked) for m in kinds}
    present: dict[str, list[bool]] = {m: [False] * len(asked) for m in kinds}
    # Normal tensors even under an evaluation's inference mode: training caches these features.
    with torch.inference_mode(False):
        for start in range(0, len(order), vlm.max_batch_size):
            idx = order[start : start + vlm.max_batch_size]
            batch = vlm.build_batch([asked[i] for i in idx], with_answers=False)
            with vlm.capture_hidden([layer]) as hidden:
                vlm.model(**batch.inputs)
            states = hidden[layer].float()
            mask = batch.inputs["attention_mask"].bool()
            is_image = (batch.inputs["input_ids"] == image_id) & mask
            masks = {"image": is_image, "text": mask & ~is_image}
            for m in kinds:
                weights = masks[m].unsqueeze(-1).to(states.dtype)
                count = weights.sum(1)
                means = (states * weights).sum(1) / count.clamp(min=1)
                for row, i in enumerate(idx):
                    pooled[m][i] = means[row].cpu()
                    present[m][i] = bool(count[row] > 0)
    return ScopeFeatures(
        {m: torch.stack(pooled[m]) for m in kinds},  # type: ignore[arg-type]
        {m: torch.tensor(present[m], dtype=torch.bool) for m in kinds},
    )


class GainLinear(nn.Linear):
    """A linear layer whose weights Adam moves `gain` times faster: stored divided by `gain`.

    `EditorTraining` has one learning rate for all of an editor's parameters, but SERAC's
    classifier is trained from scratch while its counterfactual model is only fine-tuned. Adam's
    steps are about `lr` in size whatever the gradient's scale, so storing `w / gain` and using
    `gain * stored` gives the classifier an effective learning rate of `gain * lr`.
    """

    def __init__(self, in_features: int, out_features: int, gain: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        self.gain = gain
        with torch.no_grad():
            self.weight.div_(gain)
            self.bias.div_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain, self.bias * self.gain)


class PairScorer(nn.Module):
    """One logit per (memory entry, probe) pair from their pooled features.

    Args:
        modalities: the feature kinds read (`image`, `text`).
        dim: width of the pooled backbone states.
        proj_dim: width of each modality's learned projection.
        hidden: width of the MLP that mixes the per-modality similarities.
        lr_gain: how much faster than the editor's learning rate these weights learn (`GainLinear`).
    """

    def __init__(
        self, modalities: Sequence[str], dim: int, proj_dim: int = 64, hidden: int = 32, lr_gain: float = 1.0
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.proj = nn.ModuleDict({m: GainLinear(dim, proj_dim, lr_gain) for m in self.modalities})
        # Per modality: projected cosine, raw cosine (both zero unless both sides have the
        # modality), "both have it", "only one has it".
        self.mix = nn.Sequential(
            GainLinear(4 * len(self.modalities), hidden, lr_gain), nn.GELU(), GainLinear(hidden, 1, lr_gain)
        )

    def encode(self, feats: ScopeFeatures) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per modality: (unit projected vectors, unit raw vectors, presence as float)."""
        device = self.mix[0].weight.device
        out = {}
        for m in self.modalities:
            # Standardised per vector: a few large, constant dimensions of the states would
            # otherwise dominate every cosine.
            x = F.layer_norm(feats.values[m].to(device), feats.values[m].shape[-1:])
            out[m] = (
                F.normalize(self.proj[m](x), dim=-1),
                F.normalize(x, dim=-1),
                feats.present[m].to(device).float(),
            )
        return out

    def forward(self, keys: ScopeFeatures, queries: ScopeFeatures) -> torch.Tensor:
        """(len(keys), len(queries)) logits: keys are memory edits, queries are probes."""
        k, q = self.encode(keys), self.encode(queries)
        columns = []
        for m in self.modalities:
            (kp, kr, kh), (qp, qr, qh) = k[m], q[m]
            both = kh[:, None] * qh[None, :]
            one = kh[:, None] + qh[None, :] - 2 * both
            columns += [(kp @ qp.T) * both, (kr @ qr.T) * both, both, one]
        return self.mix(torch.stack(columns, dim=-1)).squeeze(-1)


class ScopeClassifier(nn.Module):
    """One `PairScorer` per routing mode over the same frozen features.

    Args:
        dim: width of the backbone's pooled states.
        proj_dim, hidden, lr_gain: as `PairScorer`.
    """

    def __init__(self, dim: int, proj_dim: int = 64, hidden: int = 32, lr_gain: float = 1.0) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {r: PairScorer(MODALITIES[r], dim, proj_dim, hidden, lr_gain) for r in ROUTINGS}
        )

    def forward(self, routing: str, keys: ScopeFeatures, queries: ScopeFeatures) -> torch.Tensor:
        return self.heads[routing](keys, queries)


def balanced_bce(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None, hard: int = 0
) -> dict[str, torch.Tensor]:
    """BCE over (key, query) pairs, averaged over positives and over negatives apart, then together.

    In-scope pairs are a few per edit against hundreds of out-of-scope ones; a plain mean would let
    the classifier call everything out of scope. The negatives that matter (the same picture asked
    another question, another picture asked the same question) are few among them too, so with
    `hard` > 0 the mean BCE of each key's `hard` highest-scoring negatives is added as a third term.
    Pairs of weight 0 count nowhere. Returns `loss`, `pos`, `neg` (the out-of-scope BCE), and the
    accuracy / precision / recall of the 0.5 threshold over the counted pairs.
    """
    y = labels.float()
    w = torch.ones_like(y) if weight is None else weight.float()
    each = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    pos_w, neg_w = w * y, w * (1 - y)
    pos = (each * pos_w).sum() / pos_w.sum().clamp(min=1e-6)
    neg = (each * neg_w).sum() / neg_w.sum().clamp(min=1e-6)
    loss = 0.5 * (pos + neg)
    if hard > 0 and logits.shape[-1] > 0:
        k = min(hard, logits.shape[-1])
        ranked = logits.detach().masked_fill(neg_w <= 0, float("-inf"))
        top = ranked.topk(k, dim=-1).indices
        chosen = neg_w.gather(-1, top)
        hard_term = (each.gather(-1, top) * chosen).sum() / chosen.sum().clamp(min=1e-6)
        loss = 0.5 * pos + 0.25 * (neg + hard_term)
    with torch.no_grad():
        said = logits > 0
        truth = y > 0.5
        counted = w > 0
        tp = (said & truth & counted).sum().float()
        precision = tp / (said & counted).sum().clamp(min=1)
        recall = tp / (truth & counted).sum().clamp(min=1)
        acc = ((said == truth) & counted).sum().float() / counted.sum().clamp(min=1)
    return {"loss": loss, "pos": pos, "neg": neg, "acc": acc, "precision": precision, "recall": recall}


def scope_labels(
    key_cases: Sequence[str],
    query_cases: Sequence[str],
    query_kinds: Sequence[str],
    in_scope_kinds: Sequence[str],
    negative_kinds: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights of a (keys x queries) pair matrix.

    A probe is in the scope of an edit when it belongs to the same case and its kind is in
    `in_scope_kinds`. Out of scope: every other pair, or, with `negative_kinds`, only the pairs whose
    probe is of those kinds (the public recipe's text-locality negatives); other pairs get weight 0.
    """
    same = torch.tensor([[kc == qc for qc in query_cases] for kc in key_cases], dtype=torch.bool)
    inside = torch.tensor([k in in_scope_kinds for k in query_kinds], dtype=torch.bool)
    labels = same & inside[None, :]
    if negative_kinds is None:
        weight = torch.ones_like(labels, dtype=torch.float)
    else:
        counted = torch.tensor([k in negative_kinds for k in query_kinds], dtype=torch.bool)
        weight = (labels | counted[None, :].expand_as(labels)).float()
    return labels.float(), weight
