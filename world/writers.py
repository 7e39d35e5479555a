"""Write a world as the benchmarks' files: MMEdit E-VQA / E-IC and VLKEB JSON, plus PNG images.

Layout under OUT (the image root of every file is OUT/images):

    world.json                      the world (config, values, links, entities, edits): training reads it
    manifest.json                   config digest, counts, file list (the build cache key)
    mmedit/vqa_{train,val,eval}.json            E-VQA records, one per counterfactual edit
    mmedit/caption_{train,val,eval}_edit.json   E-IC records (captions), one per country edit
    vlkeb/{train,val,eval}.json                 VLKEB core records
    vlkeb/{val,eval}_multihop.json              port_new with 1..4-hop questions
    vlkeb/{val,eval}_edit_onehop.json           port_new with {port_q, port_a, port_edit_q, port_edit_a}
    withheld.jsonl                  questions on withheld facts (UniKE triplet sources), with images
    images/<entity>/<rendering>.png

Questions are written raw (no "Question: ... Short answer:" template): the world's data configs set
`prompt_template: "{}"` so the backbone sees the same wording in every file. Every record carries an
`id` that names split, entity and relation. Each record draws fresh renderings (ids from
`render.FRESH_ID`), never a training rendering.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from world.generate import SPLITS, Edit, Entity, World
from world.probes import composite_questions, image_questions, known_relations, text_question, withheld_qas
from world.relations import CAPTION_TEMPLATES, CHAINS, TEXT_TEMPLATES
from world.render import FRESH_ID, render


class ImageWriter:
    """Draws and saves fresh renderings; ids count up per entity so every written picture is new."""

    def __init__(self, world: World, root: Path) -> None:
        self.world, self.root = world, root
        self.next_id: dict[str, int] = {}
        self.files: list[str] = []

    def fresh(self, entity: Entity) -> str:
        rid = self.next_id.get(entity.id, FRESH_ID)
        self.next_id[entity.id] = rid + 1
        rel = f"{entity.id}/{rid}.png"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # optimize=False and no metadata: the bytes depend on the pixels alone.
        render(entity.look, self.world.config, entity.id, rid).save(path, "PNG", optimize=False)
        self.files.append(rel)
        return rel


def _core(world: World, images: ImageWriter, rng: random.Random, edit: Edit, split_entities: list[Entity]):
    """The fields every MMEdit / VLKEB record shares, for one counterfactual edit."""
    entity = world.entity(edit.entity)
    src = rng.choice(image_questions(edit.relation))
    rel, subject, loc_ans = rng.choice(world.text_facts())
    other = rng.choice([e for e in split_entities if e.id != entity.id])
    loc_relation = rng.choice(locality_relations(world, other))
    return entity, {
        "id": "",
        "src": src,
        "alt": edit.new,
        "pred": edit.old,
        "rephrase": image_questions(edit.relation, held_out=True)[0],
        "image": images.fresh(entity),
        "image_rephrase": images.fresh(entity),
        "loc": text_question(rel, subject, rng.randrange(len(TEXT_TEMPLATES[rel][1]))),
        "loc_ans": loc_ans,
        "m_loc": images.fresh(other),
        "m_loc_q": rng.choice(image_questions(loc_relation)),
        "m_loc_a": other.answer(loc_relation),
    }


def locality_relations(world: World, other: Entity) -> list[str]:
    """The relations an image-locality question about `other` may ask (see `unedited_locality`)."""
    known = known_relations(other)
    if not world.config.unedited_locality:
        return known
    return [r for r in known if r not in world.config.edited_relations]


def _port_new(world: World, entity: Entity, edit: Edit, style: str) -> list[dict]:
    if edit.relation not in CHAINS:  # owner and material edits: nothing follows from them
        return []
    roots = {edit.relation: edit.new}
    composites = {(root, hops): (q, a) for q, a, root, hops in composite_questions(world, entity, **roots)}
    depth = len(CHAINS[edit.relation])
    if style == "multihop":
        return [
            {
                "port_type": f"{h}-hop",
                "Q&A": {
                    "Question": composites[edit.relation, h][0],
                    "Answer": composites[edit.relation, h][1],
                },
            }
            for h in range(1, depth + 1)
        ]
    edit_q, edit_a = composites[edit.relation, 1]
    port_q, port_a = composites[edit.relation, 2]
    return [{"port_q": port_q, "port_a": port_a, "port_edit_q": edit_q, "port_edit_a": edit_a}]


def split_records(world: World, images: ImageWriter, split: str) -> dict[str, list[dict]]:
    """Every file's records of one split."""
    rng = random.Random(f"{world.config.seed}/records/{split}")
    entities = world.split(split)
    ids = {e.id for e in entities}
    out: dict[str, list[dict]] = {"vqa": [], "caption": [], "vlkeb": [], "multihop": [], "onehop": []}
    edits = [x for x in world.edits if x.entity in ids]
    # Rendering the pictures is the slow part of a build (seconds to minutes for large worlds).
    for edit in tqdm(edits, desc=f"world: {split} records", unit="edit", leave=False):
        entity, core = _core(world, images, rng, edit, entities)
        core["id"] = f"{split}-{entity.id}-{edit.relation}"
        out["vqa"].append(core)
        out["vlkeb"].append(dict(core))
        out["multihop"].append({**core, "port_new": _port_new(world, entity, edit, "multihop")})
        out["onehop"].append({**core, "port_new": _port_new(world, entity, edit, "onehop")})
        if edit.relation == "country":
            out["caption"].append(
                {
                    **core,
                    "id": f"{split}-{entity.id}-caption",
                    "src": rng.choice(CAPTION_TEMPLATES[0]),
                    "rephrase": CAPTION_TEMPLATES[1][0],
                    "alt": world.caption(entity, country=edit.new),
                    "pred": world.caption(entity),
                }
            )
    return out


def _dump(path: Path, data: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=True) + "\n")
    return str(path)


def write_world(world: World, out: Path) -> dict:
    """Write every file of `world` under `out`; returns the manifest (also written)."""
    images = ImageWriter(world, out / "images")
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    for split in SPLITS:
        recs = split_records(world, images, split)
        names = {
            "vqa": f"mmedit/vqa_{split}.json",
            "caption": f"mmedit/caption_{split}_edit.json",
            "vlkeb": f"vlkeb/{split}.json",
        }
        if split != "train":
            names |= {"multihop": f"vlkeb/{split}_multihop.json", "onehop": f"vlkeb/{split}_edit_onehop.json"}
        for key, name in names.items():
            _dump(out / name, recs[key])
            files[f"{key}_{split}"] = name
            counts[name] = len(recs[key])
    rows = []
    for entity in world.entities:
        for question, answer, held_out in withheld_qas(entity):
            rows.append(
                {
                    "entity": entity.id,
                    "split": entity.split,
                    "image": images.fresh(entity),
                    "question": question,
                    "answer": answer,
                    "held_out_wording": held_out,
                }
            )
    (out / "withheld.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _dump(out / "world.json", world.to_dict())
    n_withheld = sum(len(e.withheld) for e in world.entities)
    templates = len(rows) // max(1, n_withheld)
    manifest = {
        "digest": world.config.digest(),
        "config": world.config.to_dict(),
        "n_entities": {s: len(world.split(s)) for s in SPLITS},
        "n_withheld_facts": n_withheld,
        # (question, true answer, hallucinated answer) triplets the world can supply: every withheld fact
        # in every wording on every training-pool rendering (fresh renderings add more on demand).
        "triplet_capacity": n_withheld * templates * world.config.pool_size,
        "records": counts,
        "files": files,
        "n_images": len(images.files),
    }
    _dump(out / "manifest.json", manifest)
    return manifest
