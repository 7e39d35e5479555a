"""KN (editors/kn.py, editors/kn_attribution.py): attribution finds a planted neuron; edits and refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import changed, make_case, state_copy
from tiny_families import FAMILIES

from editors.kn import KnowledgeNeurons
from editors.kn_attribution import coarse_neurons, ffn_activations, integrated_gradients, refine_neurons

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attribution_finds_a_planted_neuron(family):
    vlm = FAMILIES[family]()
    vlm.requires_grad_(False)
    probe = make_case(0).edit
    batch = vlm.build_batch([probe])
    position = vlm.token_groups(batch)[0].last
    n = vlm.num_language_layers
    layer = n - 1
    acts = ffn_activations(vlm, batch, range(n))
    unit = int(acts[layer][0, position].abs().argmax())
    a = float(acts[layer][0, position, unit])
    embeddings = vlm.lm_head().weight
    token = 7  # any token: the planted neuron writes its embedding, scaled to dominate
    with torch.no_grad():
        value = embeddings[token] / embeddings[token].pow(2).sum() * 6.0 / a
        vlm.ffn_ports(layer).value_linear.weight[:, unit] = value
    attributions = integrated_gradients(vlm, probe, position, token, list(range(n)), steps=20)
    best = max(
        ((lay, int(a.argmax()), float(a.max())) for lay, a in attributions.items()), key=lambda x: x[2]
    )
    assert best[:2] == (layer, unit), family
    assert (layer, unit) in coarse_neurons(attributions, 0.2)


def test_refinement_keeps_neurons_a_share_of_prompts_agree_on():
    sets = [{(0, 1), (1, 2)}, {(0, 1)}, {(0, 1), (1, 2), (2, 3)}]
    assert refine_neurons(sets, 1.0) == [(0, 1)]
    assert refine_neurons(sets, 0.6) == [(0, 1), (1, 2)]
    assert refine_neurons(sets, 0.3) == [(0, 1), (1, 2), (2, 3)]
    attributions = {0: torch.tensor([1.0, 0.1, 0.3]), 1: torch.tensor([-2.0, 0.25])}
    assert coarse_neurons(attributions, 0.2) == {(0, 0), (0, 2), (1, 1)}
    assert coarse_neurons({0: torch.tensor([-1.0, -0.5])}, 0.2) == set()


def test_kn_edit_raises_the_new_answer_and_restores(vlm):
    case = make_case(0)
    before = state_copy(vlm)
    batch = vlm.build_batch([case.edit])
    start, _ = batch.answer_spans[0]
    new = int(batch.inputs["input_ids"][0, start])
    with torch.no_grad():
        p_before = vlm.model(**batch.inputs).logits[0, start - 1].softmax(-1)[new].item()
    editor = KnowledgeNeurons(steps=8, add_scale=8.0, erase_scale=2.0)
    handle = editor.apply(vlm, [case])
    with torch.no_grad():
        p_after = vlm.model(**batch.inputs).logits[0, start - 1].softmax(-1)[new].item()
    assert handle.stats["neurons"] > 0
    touched = changed(vlm, before)
    assert touched and all("down_proj" in k for k in touched)
    assert p_after > p_before
    handle.restore()
    assert changed(vlm, before) == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"threshold": 1.5}, "threshold"),
        ({"share": 0.0}, "share"),
        ({"max_neurons": 0}, "max_neurons"),
        ({"add_scale": -1.0}, "add_scale"),
        ({"layers": [1, 1]}, "layers"),
    ],
)
def test_bad_settings_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KnowledgeNeurons(**kwargs)


def test_layers_outside_the_model_are_refused(vlm):
    with pytest.raises(ValueError, match="layers"):
        KnowledgeNeurons(layers=[vlm.num_language_layers]).apply(vlm, [make_case(0)])
