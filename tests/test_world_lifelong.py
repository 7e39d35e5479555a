"""The lifelong world's options: every fact of an entity edited, and locality that no edit changes.

`configs/world/lifelong.yaml` itself is checked for its count of evaluation edits without writing a
picture (the world is generated, not built); a tiny world with the same options is built and read.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from datamodules.dataset import load_edit_dataset
from world.build import build_world
from world.config import load_world_config
from world.generate import World, generate_world
from world.relations import ATTRIBUTES, IMAGE_TEMPLATES

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "world" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_lifelong(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny_lifelong"
    build_world(load_world_config(TINY, edits_per_entity=4, unedited_locality=True), out, verbose=False)
    return out


def test_the_lifelong_config_has_over_1000_distinct_evaluation_edits():
    world = generate_world(load_world_config(ROOT / "configs" / "world" / "lifelong.yaml"))
    eval_ids = {e.id for e in world.split("eval")}
    edits = [x for x in world.edits if x.entity in eval_ids]
    assert len(edits) >= 1000
    assert len({(x.entity, x.relation) for x in edits}) == len(edits)  # no fact edited twice
    assert all(x.new != x.old for x in edits)


def test_locality_questions_ask_only_what_no_edit_changes(tiny_lifelong):
    world = World.from_dict(json.loads((tiny_lifelong / "world.json").read_text()))
    attribute_questions = {q for r in ATTRIBUTES for q in IMAGE_TEMPLATES[r][0]}
    for split in ("train", "val", "eval"):
        records = json.loads((tiny_lifelong / "vlkeb" / f"{split}.json").read_text())
        assert {r["id"].rsplit("-", 1)[1] for r in records} == {"country", "maker", "owner", "material"}
        assert all(r["m_loc_q"] in attribute_questions for r in records)
    assert len(world.edits) == 4 * len(world.entities)


def test_fact_edits_without_a_chain_load_without_portability(tiny_lifelong):
    data = load_edit_dataset(
        str(tiny_lifelong / "vlkeb" / "eval_multihop.json"), str(tiny_lifelong / "images")
    )
    assert data.skipped == [] and len(data) > 0
    by_relation = {data[i].case_id.rsplit("-", 1)[-1]: data[i] for i in range(len(data))}
    ports = {rel: len(case.probes.get("port", [])) for rel, case in by_relation.items()}
    assert ports["owner"] == ports["material"] == 0 and ports["country"] == 4 and ports["maker"] == 2


def test_later_options_at_their_default_keep_a_world_digest():
    plain = load_world_config(TINY)
    assert "unedited_locality" not in plain.to_dict()
    assert load_world_config(TINY, unedited_locality=True).digest() != plain.digest()


def test_backbone_training_puts_every_edited_relation_in_context(tiny_lifelong):
    """The in-context facts training shows cover owner and material when the world edits them."""
    from datamodules.world_train import WorldBatches, WorldTrainData

    data = WorldTrainData(str(tiny_lifelong), batch_size=8, stage0_steps=0, stage1_steps=1)
    batches = WorldBatches(data)
    rng = random.Random(0)
    entity = data.world.entities[0]
    drawn = {batches.counterfactual(rng, entity)[0] for _ in range(200)}
    assert drawn == {"country", "maker", "owner", "material", "caption"}
