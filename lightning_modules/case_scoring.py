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

from backbones.base import VLM
from backbones.batching import TeacherForced
from core.case import LOCALITY_KINDS, EditCase, Probe
from editors.base import EditHandle
from metrics.protocols import generation_score, probe_score, topk_needed


@dataclass
class ProbeOutputs:
    """What the model said for one probe: teacher-forced outputs and (optionally) a generation."""

    tf: TeacherForced
    generated: str | None


def _run(vlm: VLM, probes: Sequence[Probe], protocol: str, generation: bool) -> list[ProbeOutputs]:
    if not probes:
        return []
    k = max(topk_needed(protocol, p.kind) for p in probes)
    tf = vlm.teacher_forced(probes, all_topk=k)
    gen = vlm.generate(probes, teacher_forced=tf) if generation else [None] * len(probes)
    return [ProbeOutputs(t, g) for t, g in zip(tf, gen, strict=True)]


def reference_outputs(
    vlm: VLM, cases: Sequence[EditCase], protocol: str, generation: bool
) -> dict[str, list[ProbeOutputs]]:
    """Pre-edit outputs of every locality probe of `cases`, by case id, from one batched pass."""
    probes = [p for case in cases for p in case.locality_probes()]
    outputs = iter(_run(vlm, probes, protocol, generation))
    return {case.case_id: [next(outputs) for _ in case.locality_probes()] for case in cases}


def _aligned(post: TeacherForced, pre: TeacherForced) -> tuple[TeacherForced, TeacherForced]:
    """Trim all-position outputs of a probe asked with extra context to their common tail.

    In-context editors prepend text and images, so the edited sequence is longer; its tail (the
    question and answer) lines up with the unedited sequence's tail.
    """
    if post.all_topk is None or pre.all_topk is None or len(post.all_topk) == len(pre.all_topk):
        return post, pre
    n = min(len(post.all_topk), len(pre.all_topk))
    return (
        TeacherForced(post.pred, post.labels, post.all_topk[-n:]),
        TeacherForced(pre.pred, pre.labels, pre.all_topk[-n:]),
    )


def score_cases(
    vlm: VLM,
    edited: Sequence[tuple[EditCase, EditHandle]],
    reference: dict[str, list[ProbeOutputs]],
    protocol: str,
    generation: bool,
    tokenizer_decode: Any,
) -> list[dict[str, Any]]:
    """Score every probe of the edited cases in one batched pass; one record per case (values in [0, 1]).

    Each case comes with the handle that edited it: several cases may share one handle (sequential
    editing) or each have their own (one-step editing with an editor that leaves the weights alone,
    whose cases can then share forward passes).
    """
    probes = [p for case, handle in edited for p in handle.prepare(case.all_probes())]
    outputs = iter(_run(vlm, probes, protocol, generation))
    records = []
    for case, _ in edited:
        pre_iter = iter(reference[case.case_id])
        values: dict[str, list[float]] = defaultdict(list)
        predictions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for probe in case.all_probes():
            out = next(outputs)
            pre = next(pre_iter) if probe.kind in LOCALITY_KINDS else None
            tf, pre_tf = _aligned(out.tf, pre.tf) if pre else (out.tf, None)
            keys = [probe.kind]
            if probe.kind == "port" and probe.hop is not None:
                keys.append(f"port_hop{probe.hop}")
            score = probe_score(probe.kind, tf, pre_tf, protocol)
            for key in keys:
                values[key].append(score)
            entry: dict[str, Any] = {
                "prompt": probe.prompt,
                "answer": probe.answer,
                "tf_prediction": tokenizer_decode(out.tf.pred.tolist()),
                "score": score,
            }
            if probe.hop is not None:
                entry["hop"] = probe.hop
            if generation:
                gen_score = generation_score(
                    probe.kind, out.generated, probe.answer, pre.generated if pre else None
                )
                for key in keys:
                    values[f"gen_{key}"].append(gen_score)
                entry["generated"] = out.generated
                entry["gen_score"] = gen_score
                if pre is not None:
                    entry["pre_edit_generated"] = pre.generated
            predictions[probe.kind].append(entry)
        records.append(
            {
                "case_id": case.case_id,
                "index": case.index,
                "source": case.source,
                "edit": {"prompt": case.edit.prompt, "target": case.edit.answer},
                "scores": {k: sum(v) / len(v) for k, v in sorted(values.items())},
                "predictions": dict(predictions),
            }
        )
    return records
