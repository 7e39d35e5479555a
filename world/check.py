"""`python -m world.check --backbone checkpoints/world_llava --world data/world/demo`: what a backbone knows.

Loads the backbone through the family adapter's `pretrained=` path (as `edit.py` does) and scores it
on the evaluation split, teacher-forced token accuracy (TF) and greedy exact match (EM), with the
same functions the edit metrics use. Rows and the issue's targets:

- image questions on renderings never seen in training, held-out paraphrase wordings, text-only
  facts, the I-Loc questions of vqa_eval.json, and 1-hop composite questions: TF >= 95, EM >= 90;
- withheld facts (never trained): wrong >= 80% of the time (EM <= 20);
- the counterfactual edit targets of vqa_eval.json before any edit: Rel (TF) <= 5.

Further rows (2..4-hop composites, captions, in-context facts as IKE lays them out) are reported
without a target. `--json FILE` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from backbones import Blip2OptVLM, LlavaVLM
from backbones.base import VLM
from core.case import ContextItem, Probe
from datamodules.dataset import load_edit_dataset
from datamodules.world_train import FACT_FORMAT, QUERY_FORMAT
from metrics.functional import exact_match, token_accuracy
from world.backbones import load_world
from world.generate import World
from world.probes import composite_questions, image_questions, known_relations, text_question, withheld_qas
from world.relations import CAPTION_TEMPLATES, EDITABLE, TEXT_TEMPLATES, WITHHOLDABLE
from world.render import FRESH_ID, render

#: Renderings for checking start here: above the pool and above every id the writers use.
CHECK_ID = FRESH_ID + 50_000
#: row -> (score, comparison, bound) for the rows with a target.
TARGETS = {
    "image questions (new renderings)": [("tf", ">=", 95), ("em", ">=", 90)],
    "held-out paraphrases": [("tf", ">=", 95), ("em", ">=", 90)],
    "text-only facts": [("tf", ">=", 95), ("em", ">=", 90)],
    "image locality (I-Loc)": [("tf", ">=", 95), ("em", ">=", 90)],
    "composite 1-hop": [("tf", ">=", 95), ("em", ">=", 90)],
    "withheld facts": [("em", "<=", 20)],
    "edit targets before editing (Rel)": [("tf", "<=", 5)],
}


def load_backbone(path: str) -> VLM:
    """The family adapter for a saved backbone, read off its config.json (`llava` or `blip-2`)."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        return LlavaVLM(pretrained=path)
    if model_type == "blip-2":
        return Blip2OptVLM(pretrained=path)
    raise ValueError(f"{path}: model_type {model_type!r} is neither 'llava' nor 'blip-2'")


def probe_sets(world: World, world_dir: str, split: str = "eval") -> dict[str, list[Probe]]:
    """Every row's probes. Each entity question gets its own fresh rendering."""
    next_id = {}

    def image(entity):
        rid = next_id.get(entity.id, CHECK_ID)
        next_id[entity.id] = rid + 1
        return render(entity.look, world.config, entity.id, rid)

    entities = world.split(split)
    sets: dict[str, list[Probe]] = {k: [] for k in TARGETS}
    for hops in (2, 3, 4):
        sets[f"composite {hops}-hop"] = []
    sets["captions"] = []
    for e in entities:
        for r in known_relations(e):
            sets["image questions (new renderings)"] += [
                Probe(q, e.answer(r), image(e)) for q in image_questions(r)
            ]
            if r in (*EDITABLE, *WITHHOLDABLE):
                held = image_questions(r, held_out=True)
                sets["held-out paraphrases"] += [Probe(q, e.answer(r), image(e)) for q in held]
        for q, a, _, hops in composite_questions(world, e):
            sets["composite 1-hop" if hops == 1 else f"composite {hops}-hop"].append(Probe(q, a, image(e)))
        sets["withheld facts"] += [Probe(q, a, image(e)) for q, a, _ in withheld_qas(e)]
        sets["captions"] += [Probe(q, world.caption(e), image(e)) for q in CAPTION_TEMPLATES[0]]
    for rel, s, a in world.text_facts():
        sets["text-only facts"] += [
            Probe(text_question(rel, s, v), a) for v in range(len(TEXT_TEMPLATES[rel][1]))
        ]
    data = load_edit_dataset(
        str(Path(world_dir) / "mmedit" / f"vqa_{split}.json"),
        str(Path(world_dir) / "images"),
        prompt_template="{}",
        loc_image_template="{}",
    )
    cases = [data[i] for i in range(len(data))]
    sets["image locality (I-Loc)"] = [p for c in cases for p in c.probes["i_loc"]]
    sets["edit targets before editing (Rel)"] = [c.edit for c in cases]
    # IKE's layout: the new fact with its image, then "Prompt: ..." (k = 0 demonstrations).
    sets["in-context new fact (IKE layout)"] = [
        Probe(QUERY_FORMAT.format(prompt=p.prompt), c.edit.answer, p.image, context=(fact,))
        for c in cases
        for fact in [
            ContextItem(FACT_FORMAT.format(prompt=c.edit.prompt, target=c.edit.answer), c.edit.image)
        ]
        for p in (c.probes["t_gen"][0], c.probes["i_gen"][0])
    ]
    sets["in-context, unrelated question"] = [
        Probe(QUERY_FORMAT.format(prompt=p.prompt), p.answer, p.image, context=(fact,))
        for c in cases
        for fact in [
            ContextItem(FACT_FORMAT.format(prompt=c.edit.prompt, target=c.edit.answer), c.edit.image)
        ]
        for p in c.locality_probes()
    ]
    return sets


def score(vlm: VLM, probes: list[Probe]) -> dict[str, float]:
    tf = vlm.teacher_forced(probes)
    gen = vlm.generate(probes, teacher_forced=tf)
    n = max(1, len(probes))
    return {
        "n": len(probes),
        "tf": 100 * sum(token_accuracy(o.pred, o.labels) for o in tf) / n,
        "em": 100 * sum(exact_match(g, p.answer) for g, p in zip(gen, probes, strict=True)) / n,
    }


def passes(name: str, row: dict[str, float]) -> bool | None:
    if name not in TARGETS:
        return None
    return all(row[k] >= b if op == ">=" else row[k] <= b for k, op, b in TARGETS[name])


def check(backbone: str, world_dir: str, split: str = "eval") -> dict[str, dict]:
    vlm = load_backbone(backbone)
    world = load_world(world_dir)
    rows = {}
    for name, probes in probe_sets(world, world_dir, split).items():
        row = score(vlm, probes)
        row["pass"] = passes(name, row)
        rows[name] = row
    return rows


def format_rows(rows: dict[str, dict]) -> str:
    lines = [f"{'probe set':36} {'n':>5} {'TF':>6} {'EM':>6}  target", "-" * 72]
    for name, row in rows.items():
        target = ", ".join(f"{k.upper()} {op} {b}" for k, op, b in TARGETS.get(name, []))
        mark = "" if row["pass"] is None else ("  ok" if row["pass"] else "  MISSED")
        lines.append(f"{name:36} {row['n']:>5} {row['tf']:>6.1f} {row['em']:>6.1f}  {target}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="checkpoints/world_llava", help="a saved world backbone folder")
    parser.add_argument("--world", default="data/world/demo", help="the world folder it was trained on")
    parser.add_argument("--split", default="eval", choices=("train", "val", "eval"))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = check(args.backbone, args.world, args.split)
    print(
        f"backbone {args.backbone} on {args.world} ({args.split} split), {time.perf_counter() - start:.0f}s"
    )
    print(format_rows(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
