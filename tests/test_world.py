"""The synthetic world: determinism, the loaders reading every file, splits, and a backbone that learns it.

The world here is configs/world/tiny.yaml (24 entities) and the training configs/train/world_tiny.yaml
(about half a minute on 2 cores), so the file stays well inside the CI budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edit
import train
from datamodules.dataset import load_edit_dataset
from datamodules.world_train import WorldTrainData, probe_length
from world.build import build_world, is_built
from world.check import TARGETS, check, demonstration_records, in_context_sets
from world.config import load_world_config
from world.generate import World
from world.probes import image_questions, train_image_qas, train_text_qas
from world.relations import WITHHOLDABLE

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "world" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "tiny"
    build_world(load_world_config(TINY), out, verbose=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_world, tmp_path):
    again = tmp_path / "again"
    build_world(load_world_config(TINY), again, verbose=False)
    first, second = _files(tiny_world), _files(again)
    assert first.keys() == second.keys() and len(first) > 100
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other"
    build_world(load_world_config(TINY, seed=1), other, verbose=False)
    assert _files(other)["world.json"] != first["world.json"]


def test_build_is_cached(tiny_world):
    assert is_built(tiny_world, load_world_config(TINY))
    assert not is_built(tiny_world, load_world_config(TINY, seed=5))
    stamp = (tiny_world / "world.json").stat().st_mtime_ns
    build_world(load_world_config(TINY), tiny_world, verbose=False)
    assert (tiny_world / "world.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "name, fmt, hops, extra",
    [
        ("mmedit/vqa_eval.json", "mmedit_vqa", set(), 0),
        ("mmedit/vqa_train.json", "mmedit_vqa", set(), 0),
        ("mmedit/caption_eval_edit.json", "mmedit_caption", set(), 0),
        ("vlkeb/eval.json", "mmedit_vqa", set(), 0),
        ("vlkeb/eval_multihop.json", "vlkeb", {1, 2, 3, 4}, 0),
        ("vlkeb/val_multihop.json", "vlkeb", {1, 2, 3, 4}, 0),
        ("vlkeb/eval_edit_onehop.json", "vlkeb", {None}, 1),
    ],
)
def test_loaders_read_every_file_unchanged(tiny_world, name, fmt, hops, extra):
    data = load_edit_dataset(str(tiny_world / name), str(tiny_world / "images"))
    assert data.format == fmt and len(data) > 0 and data.skipped == []
    for i in range(len(data)):
        case = data[i]
        for kind in ("rel", "t_gen", "i_gen", "t_loc", "i_loc"):
            assert len(case.probes[kind]) == 1, (name, kind)
        assert case.probes["t_loc"][0].image is None and case.probes["i_loc"][0].image is not None
        assert case.edit.image.size == (32, 32)
        assert case.edit.answer != case.meta["pred"]  # counterfactual: the new answer is not the old one
        assert len(case.extra_edits) == extra
    found = {p.hop for plan in data.plans for p in plan.probes["port"]}
    assert found == hops


def test_splits_are_entity_disjoint(tiny_world):
    entities: dict[str, set[str]] = {}
    for split in ("train", "val", "eval"):
        records = json.loads((tiny_world / "mmedit" / f"vqa_{split}.json").read_text())
        entities[split] = {r["image"].split("/")[0] for r in records}
        # I-Loc images come from other entities of the same split, never another split's.
        assert {r["m_loc"].split("/")[0] for r in records} <= entities[split]
        assert all(r["m_loc"].split("/")[0] != r["image"].split("/")[0] for r in records)
    assert not entities["train"] & entities["val"]
    assert not entities["train"] & entities["eval"]
    assert not entities["val"] & entities["eval"]


def test_training_never_shows_withheld_facts_or_held_out_wordings(tiny_world):
    world = World.from_dict(json.loads((tiny_world / "world.json").read_text()))
    held_out = {q for r in ("country", "maker", *WITHHOLDABLE) for q in image_questions(r, held_out=True)}
    assert any(e.withheld for e in world.entities)
    for entity in world.entities:
        questions = {q for q, _ in train_image_qas(world, entity)}
        for relation in entity.withheld:
            assert not questions & set(image_questions(relation))
        assert not questions & held_out
    assert not {q for q, _ in train_text_qas(world)} & held_out
    data = WorldTrainData(
        str(tiny_world), batch_size=8, stage0_steps=2, stage1_steps=30, context_batch_share=0.3
    )
    batches = list(data.train_dataloader())
    assert len(batches) == 32 and set(batches[0]) == {"images", "labels"}
    probes = [p for b in batches[2:] for p in b]
    assert any(p.context for p in probes) and any(p.image is None for p in probes)
    assert not {p.prompt for p in probes} & held_out


def test_length_buckets_cut_padding_and_keep_the_stream_deterministic(tiny_world):
    """Regrouping rows by length keeps batch sizes and the in-context share, and pads less."""

    def stage1(buckets: int) -> list[list]:
        data = WorldTrainData(
            str(tiny_world), batch_size=8, stage0_steps=0, stage1_steps=24,
            context_batch_share=0.3, length_buckets=buckets,
        )  # fmt: skip
        return list(data.train_dataloader())

    def padding(batches: list[list]) -> float:
        return sum(max(map(probe_length, b)) * len(b) - sum(map(probe_length, b)) for b in batches)

    plain, bucketed = stage1(1), stage1(8)
    assert len(bucketed) == 24 and all(len(b) == 8 for b in bucketed)
    # A batch is still either all in-context rows or none.
    assert all(len({bool(p.context) for p in b}) == 1 for b in bucketed)
    assert padding(bucketed) < 0.5 * padding(plain)
    again = stage1(8)
    assert [[p.prompt for p in b] for b in again] == [[p.prompt for p in b] for b in bucketed]
    with pytest.raises(ValueError, match="num_workers"):
        WorldTrainData(str(tiny_world), num_workers=2)


def test_manifest_counts_triplets(tiny_world):
    manifest = json.loads((tiny_world / "manifest.json").read_text())
    assert manifest["n_withheld_facts"] > 0 and manifest["triplet_capacity"] > manifest["n_withheld_facts"]
    demo = load_world_config(ROOT / "configs" / "world" / "large.yaml")
    assert demo.n_colours * demo.n_patterns * demo.n_shapes >= 200


@pytest.fixture(scope="module")
def tiny_backbone(tiny_world, tmp_path_factory) -> Path:
    """The tiny world's backbone after a short training (about half a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("backbone")
    world_args = [
        "--model.init_args.backbone.init_args.world_dir", str(tiny_world),
        "--data.init_args.world_dir", str(tiny_world),
        "--model.init_args.output_dir", str(out),
    ]  # fmt: skip
    train.main(["fit", "--config", str(ROOT / "configs" / "train" / "world_tiny.yaml"), *world_args])
    return out


def test_tiny_backbone_learns_its_world(tiny_world, tiny_backbone):
    """Saved like a real checkpoint, loaded through the adapter, and knowing its facts well above chance."""
    assert (tiny_backbone / "config.json").is_file() and (tiny_backbone / "tokenizer.json").is_file()
    rows = check(str(tiny_backbone), str(tiny_world))
    # Chance is 1/6 at best (six countries; attributes 1/4..1/2); text facts are learnt completely.
    assert rows["image questions (new renderings)"]["em"] >= 40, rows
    assert rows["text-only facts"]["em"] >= 90, rows
    assert rows["withheld facts"]["em"] <= 40, rows
    assert rows["edit targets before editing (Rel)"]["tf"] <= 5, rows


def test_edit_runs_on_the_world(tiny_world, tiny_backbone, tmp_path):
    """The world overlay stacks on a method file and edit.py scores every probe kind, hops included."""
    results = tmp_path / "results"
    edit.main(
        [
            "test",
            "--config", str(ROOT / "configs" / "edit" / "ft_llm.yaml"),
            "--config", str(ROOT / "configs" / "edit" / "world" / "llava.yaml"),
            "--model.backbone.init_args.pretrained", str(tiny_backbone),
            "--data.annotation_file", str(tiny_world / "vlkeb" / "eval_multihop.json"),
            "--data.image_root", str(tiny_world / "images"),
            "--data.limit", "3",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--results_dir", str(results),
        ]
    )  # fmt: skip
    summary = json.loads((results / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert all(summary[k] is not None for k in ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "port"))


def test_check_rows_ask_the_fact_unrelated_questions_and_composition(tiny_world):
    data = load_edit_dataset(
        str(tiny_world / "vlkeb" / "eval_multihop.json"),
        str(tiny_world / "images"),
        prompt_template="{}",
        loc_image_template="{}",
    )
    cases = [data[i] for i in range(len(data))]
    sets = in_context_sets(cases, demonstration_records(str(tiny_world)))
    for name in sets:
        assert sets[name], name
    assert {n for n in TARGETS if n.startswith("in-context")} <= set(sets)
    new = sets["in-context new fact (New Fact form)"]
    assert len(new) == 2 * len(cases) and all(p.answer in {c.edit.answer for c in cases} for p in new)
    demos = sets["in-context new fact (3 demonstrations)"]
    assert all(
        len(p.context) == 4 and p.context[-1] == q.context[-1] for p, q in zip(demos, new, strict=True)
    )
    assert all(p.hop == 1 for p in sets["in-context 1-hop composition"])
    assert all(p.prompt.startswith("Prompt: ") for probes in sets.values() for p in probes)


def test_stage0_through_the_projector_trains_the_qformer_and_not_the_language_model(tiny_world, tmp_path):
    """BLIP-2's recipe: the attribute heads read the Q-Former's projected queries, so stage 0 moves them."""
    import torch

    from lightning_modules.world_backbone import WorldBackboneTraining
    from world.backbones import WorldBlip2VLM, WorldSpec

    vlm = WorldBlip2VLM(str(tiny_world), spec=WorldSpec(hidden_size=32, num_layers=1, vision_hidden_size=32,
                                                        vision_layers=1, num_heads=2))  # fmt: skip
    module = WorldBackboneTraining(vlm, output_dir=str(tmp_path), stage0_through_projector=True)
    data = WorldTrainData(str(tiny_world), batch_size=4, stage0_steps=1, stage1_steps=0)
    batch = next(iter(data.train_dataloader()))
    loss, _ = module.attribute_loss(batch)
    loss.backward()
    grads = {
        name: p.grad is not None and bool(p.grad.abs().sum()) for name, p in vlm.model.named_parameters()
    }
    assert any(g for n, g in grads.items() if n.startswith("qformer.")), "the Q-Former got no gradient"
    assert any(g for n, g in grads.items() if n.startswith("vision_model."))
    assert not any(g for n, g in grads.items() if n.startswith("language_model."))
    assert module.heads[0].in_features == vlm.text_config().hidden_size
    assert torch.isfinite(loss)
