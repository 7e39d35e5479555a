"""Causal tracing (tracing/) and the position groups it restores (backbones/token_groups.py), every family."""

from __future__ import annotations

import math

import pytest
from conftest import make_case
from tiny_families import FAMILIES

from backbones.token_groups import GROUP_NAMES, pixel_inputs
from core.case import Probe
from tracing.causal_trace import format_peaks, summarise
from tracing.heatmap import relation_heatmap
from tracing.tracer import CausalTracer, Restoration

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    vlm = FAMILIES[request.param]()
    vlm.requires_grad_(False)
    return request.param, vlm


def test_token_groups_partition_the_prompt(family):
    name, vlm = family
    case = make_case(0)
    text_only = case.probes["t_loc"][0]
    for with_answers in (True, False):
        batch = vlm.build_batch([case.edit, text_only], with_answers=with_answers)
        ids = batch.inputs["input_ids"]
        image_id = vlm.tokenizer.convert_tokens_to_ids(vlm.image_token)
        groups = vlm.token_groups(batch)
        for row, g in enumerate(groups):
            start = batch.answer_spans[row][0]
            prompt = [p for p in range(ids.shape[1]) if batch.inputs["attention_mask"][row, p] and p < start]
            together = sorted([*g.prefix, *g.image, *g.question, g.last])
            assert together == prompt, (name, row)  # disjoint and covering every prompt position
            assert g.last == start - 1
            assert all(int(ids[row, p]) == image_id for p in g.image)
            assert all(p > max(g.image, default=-1) for p in g.question)
        counts = vlm.image_token_counts(vlm.image_inputs([case.edit.image]))
        assert len(groups[0].image) == counts[0] > 0
        assert groups[1].image == () and groups[1].prefix == () and len(groups[1].question) > 0
    assert pixel_inputs(vlm.build_batch([case.edit]))
    assert pixel_inputs(vlm.build_batch([text_only])) == []


@pytest.mark.parametrize("corruption", ["image_tokens", "pixels", "question"])
def test_nothing_corrupted_restores_the_clean_run(family, corruption):
    name, vlm = family
    tracer = CausalTracer(vlm, corruption=corruption, noise_scale=0.0, samples=1, max_rows=16)
    trace = tracer.trace(make_case(0).edit)
    assert trace.corrupted == pytest.approx(trace.clean, rel=1e-5, abs=1e-9)
    values = [v for t in trace.restored.values() for v in t.flatten().tolist() if not math.isnan(v)]
    n = vlm.num_language_layers
    found = vlm.token_groups(vlm.build_batch([make_case(0).edit]))[0]
    groups = sum(bool(found.positions(g)) for g in GROUP_NAMES)  # BLIP-2's prompt opens with the image
    assert len(values) == groups * (3 * n + 1)
    assert values == pytest.approx([trace.clean] * len(values), rel=1e-5, abs=1e-9), name


@pytest.mark.parametrize("corruption", ["image_tokens", "pixels", "question"])
def test_restoring_the_whole_state_gives_the_clean_run(family, corruption):
    name, vlm = family
    probe = make_case(0).edit
    tracer = CausalTracer(vlm, corruption=corruption, noise_scale=3.0, samples=2)
    groups = vlm.token_groups(vlm.build_batch([probe]))[0]
    everything = tuple(sorted([*groups.prefix, *groups.image, *groups.question, groups.last]))
    n = vlm.num_language_layers
    rows = [Restoration("resid", (layer,), everything) for layer in range(-1, n)]
    clean, corrupted, restored = tracer.run(probe, rows)
    assert corrupted != pytest.approx(clean, rel=1e-4), f"{name}: the corruption changed nothing"
    assert restored.tolist() == pytest.approx([clean] * len(rows), rel=1e-5, abs=1e-9), name
    # Restoring only the last token's input leaves the corrupted image/question in place.
    _, _, partial = tracer.run(probe, [Restoration("mlp", (0,), (groups.last,))])
    assert partial.item() != pytest.approx(clean, rel=1e-6)


def test_traces_summarise_and_draw(tmp_path):
    vlm = FAMILIES["llava"]()
    vlm.requires_grad_(False)
    probes = [make_case(i).edit for i in range(2)]
    tracer = CausalTracer(vlm, corruption="image_tokens", samples=1, window=2)
    std = tracer.calibrate(probes)
    assert std > 0
    traces = [tracer.trace(p) for p in probes]
    summary = summarise(traces)
    assert summary["n"] == 2 and summary["groups"] == list(GROUP_NAMES)
    assert len(summary["restored"]["resid"][0]) == vlm.num_language_layers + 1
    assert summary["peaks"]["resid"]["layer"] != "emb"
    assert set(summary["resid_by_group"]) == set(GROUP_NAMES)
    path = relation_heatmap("country", {"image_tokens": summary}, tmp_path / "country.png", window=2)
    assert path.stat().st_size > 1000
    assert "country" in format_peaks({"country": {"image_tokens": summary}})


def test_bad_settings_are_refused():
    vlm = FAMILIES["llava"]()
    with pytest.raises(ValueError, match="corruption"):
        CausalTracer(vlm, corruption="words")
    with pytest.raises(ValueError, match="window"):
        CausalTracer(vlm, window=vlm.num_language_layers + 1)
    with pytest.raises(ValueError, match="samples"):
        CausalTracer(vlm, samples=0)
    with pytest.raises(ValueError, match="to corrupt"):
        CausalTracer(vlm).trace(Probe("Who wrote Hamlet?", "Shakespeare"))
