"""In-context training examples of the world backbones, and world.check's in-context rows.

The examples must be laid out as IKE lays out its prompts, answer a counterfactual fact from the
context, keep the memorised answer for questions about something else, and never show a held-out
wording (T-Gen's paraphrases) or a withheld fact.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from datamodules.world_context import QUESTION_KINDS, ContextMix, InContextExamples
from datamodules.world_train import WorldBatches, WorldTrainData
from world.build import build_world
from world.config import load_world_config
from world.generate import World
from world.probes import image_questions
from world.relations import CAPTION_TEMPLATES, EDITABLE, WITHHOLDABLE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny"
    build_world(load_world_config(ROOT / "configs" / "world" / "tiny.yaml"), out, verbose=False)
    return out


@pytest.fixture(scope="module")
def examples(tiny_world) -> InContextExamples:
    data = WorldTrainData(str(tiny_world), stage0_steps=0, stage1_steps=1, context_mix=ContextMix())
    return WorldBatches(data).in_context


def _only(kind: str) -> ContextMix:
    return ContextMix(**{k: float(k == kind) for k in QUESTION_KINDS})


def _fact(probe) -> tuple[str, str]:
    """(question, value) of the new fact: the last context item, "New Fact: <question> <value>"."""
    text = probe.context[-1].text.removeprefix("New Fact: ")
    for q in {q for r in (*EDITABLE, *WITHHOLDABLE) for q in image_questions(r)} | set(CAPTION_TEMPLATES[0]):
        if text.startswith(q + " "):
            return q, text[len(q) + 1 :]
    raise AssertionError(f"no training question opens the fact {text!r}")


def test_layout_is_ikes_and_no_held_out_wording_appears(examples):
    rng = random.Random(0)
    held_out = {q for r in (*EDITABLE, *WITHHOLDABLE) for q in image_questions(r, held_out=True)}
    held_out |= set(CAPTION_TEMPLATES[1])
    demos = Counter()
    for _ in range(400):
        probe = examples.probe(rng)
        assert probe.prompt.startswith("Prompt: ")
        assert probe.context[-1].text.startswith("New Fact: ") and "\nPrompt: " not in probe.context[-1].text
        for item in probe.context[:-1]:
            assert item.text.startswith("New Fact: ") and "\nPrompt: " in item.text
        demos[len(probe.context) - 1] += 1
        texts = [probe.prompt, *(item.text for item in probe.context)]
        assert not [q for q in held_out for t in texts if q in t]
    # Every number of demonstrations the mix allows is drawn, and no other.
    assert set(demos) == {n for n, w in enumerate(examples.mix.demonstrations) if w > 0}


def test_the_fact_is_answered_from_the_context(tiny_world):
    world = World.from_dict(json.loads((tiny_world / "world.json").read_text()))
    data = WorldTrainData(str(tiny_world), stage0_steps=0, stage1_steps=1, context_mix=_only("fact"))
    examples = WorldBatches(data).in_context
    rng = random.Random(1)
    for _ in range(100):
        probe = examples.probe(rng)
        _, value = _fact(probe)
        assert probe.answer == value
    # The made-up value is never the entity's true one (a caption's country neither).
    for entity in world.entities:
        for _ in range(10):
            relation, _, value, root = examples.counterfactual(rng, entity)
            true = entity.facts["country" if relation == "caption" else relation]
            assert root != true and relation not in entity.withheld
            assert value == (world.caption(entity, root) if relation == "caption" else root)


def test_other_entities_keep_their_memorised_answers(tiny_world):
    world = World.from_dict(json.loads((tiny_world / "world.json").read_text()))
    truths = {
        (q, e.answer(r))
        for e in world.entities
        for r in (*EDITABLE, *WITHHOLDABLE)
        for q in image_questions(r)
    }
    truths |= {(q, world.caption(e)) for e in world.entities for q in CAPTION_TEMPLATES[0]}
    data = WorldTrainData(
        str(tiny_world), stage0_steps=0, stage1_steps=1, context_mix=_only("other_entity_same")
    )
    examples = WorldBatches(data).in_context
    rng = random.Random(2)
    for _ in range(100):
        probe = examples.probe(rng)
        question, value = _fact(probe)
        asked = probe.prompt.removeprefix("Prompt: ")
        # Same relation as the fact (a wording of it), another entity's true answer, not the fact's value.
        assert (asked, probe.answer) in truths
        assert probe.answer != value and probe.image is not None


def test_bad_mixes_are_refused():
    with pytest.raises(ValueError, match="question weights"):
        ContextMix(**dict.fromkeys(QUESTION_KINDS, 0.0))
    with pytest.raises(ValueError, match="demonstrations"):
        ContextMix(demonstrations=(1.0, 0.0))
    with pytest.raises(ValueError, match="fact_image_share"):
        ContextMix(fact_image_share=1.5)


def test_the_in_context_share_ramps_linearly_through_stage_1(tiny_world):
    data = WorldTrainData(
        str(tiny_world), stage0_steps=0, stage1_steps=11, context_batch_share=0.1, context_share_end=0.6
    )
    assert [round(data.context_share_at(s), 3) for s in (0, 5, 10)] == [0.1, 0.35, 0.6]
    constant = WorldTrainData(str(tiny_world), stage0_steps=0, stage1_steps=11, context_batch_share=0.2)
    assert {constant.context_share_at(s) for s in range(11)} == {0.2}


def test_without_a_mix_the_committed_recipe_draws_its_own_batches(tiny_world):
    """No `context_mix`: the in-context batches the committed backbones were trained with."""
    data = WorldTrainData(str(tiny_world), stage0_steps=0, stage1_steps=1)
    assert WorldBatches(data).in_context is None
    probes = WorldBatches(data).context_batch(random.Random(0))
    assert all(p.context and p.prompt.startswith("Prompt: ") for p in probes)
