"""Scoring the probes of edit cases in as few forward passes as the model allows.

`reference_outputs` runs the *unedited* model on the locality probes of many cases at once (the
pre-edit answers that locality is measured against); `score_cases` runs the edited system on every
probe of the given cases in one batched pass (chunked by the backbone) and turns the outputs into
per-case values: teacher-forced scores, their generation twins and per-hop portability.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backbones.base import VLM
from backbones.batching import ProbeAnswerer, TeacherForced
from core.case import LOCALITY_KINDS, EditCase, Probe
from editors.base import EditHandle
from metrics.protocols import generation_score, probe_score, topk_needed
from metrics.scores import GENERATION_PREFIX, case_values


@dataclass
class ProbeOutputs:
    """What the model said for one probe: teacher-forced outputs and (optionally) a generation."""

    tf: TeacherForced
    generated: str | None


def _run(
    answerer: ProbeAnswerer, probes: Sequence[Probe], protocol: str, generation: bool
) -> list[ProbeOutputs]:
    if not probes:
        return []
    k = max(topk_needed(protocol, p.kind) for p in probes)
    tf = answerer.teacher_forced(probes, all_topk=k)
    gen = answerer.generate(probes, teacher_forced=tf) if generation else [None] * len(probes)
    return [ProbeOutputs(t, g) for t, g in zip(tf, gen, strict=True)]


def reference_outputs(
    vlm: VLM, cases: Sequence[EditCase], protocol: str, generation: bool
) -> dict[str, list[ProbeOutputs]]:
    """Pre-edit outputs of every locality probe of `cases`, by case id, from one batched pass."""
    probes = [p for case in cases for p in case.locality_probes()]
    outputs = iter(_run(vlm, probes, protocol, generation))
    return {case.case_id: [next(outputs) for _ in case.locality_probes()] for case in cases}


def _aligned(post: TeacherForced, pre: TeacherForced) -> tuple[TeacherForced, TeacherForced]:
    """Keep, of all-position outputs, only the positions where both rows hold the same tokens.

    In-context editors prepend text and images, so the edited row is longer and its head holds other
    tokens (the context, where the unedited row has its own opening); only the common tail of token
    ids (the question and answer, token for token) is compared. Rows of equal tokens keep every
    position.
    """
    if post.all_topk is None or pre.all_topk is None or post.ids is None or pre.ids is None:
        return post, pre
    if torch.equal(post.ids, pre.ids):
        return post, pre
    n = _common_suffix(post.ids, pre.ids)
    return (
        TeacherForced(
            post.pred, post.labels, post.all_topk[len(post.ids) - n :], post.ids[len(post.ids) - n :]
        ),
        TeacherForced(pre.pred, pre.labels, pre.all_topk[len(pre.ids) - n :], pre.ids[len(pre.ids) - n :]),
    )


def _common_suffix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many trailing tokens two id rows share."""
    n = min(len(a), len(b))
    same = (a[len(a) - n :] == b[len(b) - n :]).flip(0)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else n


def _answer_all(
    vlm: VLM, edited: Sequence[tuple[EditCase, EditHandle]], protocol: str, generation: bool
) -> list[list[ProbeOutputs]]:
    """Every case's probes, answered by its handle's answerer; one batched call per distinct answerer."""
    prepared = [handle.prepare(case.all_probes()) for case, handle in edited]
    groups: dict[int, tuple[ProbeAnswerer, list[int]]] = {}
    for i, (_, handle) in enumerate(edited):
        answerer = handle.answerer(vlm)
        groups.setdefault(id(answerer), (answerer, []))[1].append(i)
    answers: list[list[ProbeOutputs]] = [[] for _ in edited]
    for answerer, members in groups.values():
        outputs = iter(_run(answerer, [p for i in members for p in prepared[i]], protocol, generation))
        for i in members:
            answers[i] = [next(outputs) for _ in prepared[i]]
    return answers


def score_cases(
    vlm: VLM,
    edited: Sequence[tuple[EditCase, EditHandle]],
    reference: dict[str, list[ProbeOutputs]],
    protocol: str,
    generation: bool,
) -> list[dict[str, Any]]:
    """Score every probe of the edited cases in as few batched passes as their answerers allow.

    Each case comes with the handle that edited it: several cases may share one handle (sequential
    editing) or each have their own (one-step edits of a `side_by_side` editor). Returns one record
    per case; its `scores` (values in [0, 1]) come from `metrics.scores.case_values`, the one
    per-case aggregation.
    """
    answers = _answer_all(vlm, edited, protocol, generation)
    decode = vlm.tokenizer.decode
    records = []
    for (case, _), outputs in zip(edited, answers, strict=True):
        pre_iter = iter(reference[case.case_id])
        tf_values: dict[str, list[float]] = defaultdict(list)
        gen_values: dict[str, list[float]] = defaultdict(list)
        port_hops: list[int | None] = []
        predictions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for probe, out in zip(case.all_probes(), outputs, strict=True):
            pre = next(pre_iter) if probe.kind in LOCALITY_KINDS else None
            tf, pre_tf = _aligned(out.tf, pre.tf) if pre else (out.tf, None)
            if probe.kind == "port":
                port_hops.append(probe.hop)
            score = probe_score(probe.kind, tf, pre_tf, protocol)
            tf_values[probe.kind].append(score)
            entry: dict[str, Any] = {
                "prompt": probe.prompt,
                "answer": probe.answer,
                "tf_prediction": decode(out.tf.pred.tolist()),
                "score": score,
            }
            if probe.hop is not None:
                entry["hop"] = probe.hop
            if generation:
                gen_score = generation_score(
                    probe.kind, out.generated, probe.answer, pre.generated if pre else None
                )
                gen_values[probe.kind].append(gen_score)
                entry["generated"] = out.generated
                entry["gen_score"] = gen_score
                if pre is not None:
                    entry["pre_edit_generated"] = pre.generated
            predictions[probe.kind].append(entry)
        scores = case_values(tf_values, port_hops)
        if generation:
            scores.update(case_values(gen_values, port_hops, GENERATION_PREFIX))
        records.append(
            {
                "case_id": case.case_id,
                "index": case.index,
                "source": case.source,
                "edit": {"prompt": case.edit.prompt, "target": case.edit.answer},
                "scores": dict(sorted(scores.items())),
                "predictions": dict(predictions),
            }
        )
    return records
